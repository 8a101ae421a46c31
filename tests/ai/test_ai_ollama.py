"""The Ollama provider through the gRPC server, against a stand-in for Ollama's native API."""
from __future__ import annotations

import base64
import json
from collections.abc import Callable

import grpc
import pytest

from chat_common.aiproto import ai_service_pb2 as pb
from devstack.servers import free_port

from .ai_helpers import Reply, StandIn


def ollama_reply(text: str, prompt_eval_count: int = 321, eval_count: int = 45) -> Reply:
    return Reply(200, {
        "model": "llama3.1:8b", "created_at": "2024-07-23T00:00:00Z",
        "message": {"role": "assistant", "content": text}, "done": True, "done_reason": "stop",
        "prompt_eval_count": prompt_eval_count, "eval_count": eval_count,
    })


def turn(**fields: object) -> pb.Request:
    base: dict[str, object] = {
        "user_id": "u1", "session_id": "s1", "chat_message": "And the second?",
        "model_name": "llama3.1:8b", "model_provider": "ollama", "session_prompt": "You are a tutor.",
        "chat_summary": "",
        "chat_history": json.dumps([
            {"role": "user", "content": "Name two planets."},
            {"role": "assistant", "content": "Mars is one."},
        ]),
        "input_price_nanos_per_1k": 1_500_000, "output_price_nanos_per_1k": 2_000_000,
    }
    base.update(fields)
    return pb.Request(**base)  # type: ignore[arg-type]


async def test_process_calls_api_chat_and_prices_eval_counts(ai: Callable, stand_in: Callable[..., StandIn]) -> None:
    api = stand_in(lambda request: ollama_reply("Venus."))
    async with ai(ollama_base_url=api.url) as (stub, _, _):
        reply = await stub.Process(turn(), timeout=10)

    sent = api.requests[0]
    assert (sent.method, sent.path) == ("POST", "/api/chat")
    assert sent.json() == {
        "model": "llama3.1:8b",
        "stream": False,
        "messages": [
            {"role": "system", "content": "You are a tutor."},
            {"role": "user", "content": "Name two planets."},
            {"role": "assistant", "content": "Mars is one."},
            {"role": "user", "content": "And the second?"},
        ],
    }
    assert reply.response_text == "Venus."
    assert (reply.input_tokens, reply.output_tokens) == (321, 45)
    # ceil((321 * 1_500_000 + 45 * 2_000_000) / 1000)
    assert reply.cost_nanos == 481_500 + 90_000


async def test_images_travel_base64_in_the_message(
    ai: Callable, stand_in: Callable[..., StandIn], file_host: Callable[[dict[str, Reply]], StandIn]
) -> None:
    jpeg = b"\xff\xd8\xff\xe0" + b"fake jpeg body" * 10
    files = file_host({"/u/photo.JPG": Reply(200, jpeg, {"Content-Type": "image/jpeg"})})
    api = stand_in(lambda request: ollama_reply("A photo."))
    async with ai(ollama_base_url=api.url) as (stub, _, _):
        await stub.Process(turn(file_name=[f"{files.url}/u/photo.JPG"]), timeout=10)
    user = api.requests[0].json()["messages"][-1]
    assert user["images"] == [base64.b64encode(jpeg).decode()]
    assert user["content"] == f"And the second?\n\nAttached files:\n- {files.url}/u/photo.JPG (image, attached)"


async def test_an_image_that_cannot_be_fetched_is_named_not_attached(
    ai: Callable, stand_in: Callable[..., StandIn], file_host: Callable[[dict[str, Reply]], StandIn]
) -> None:
    files = file_host({})
    api = stand_in(lambda request: ollama_reply("?"))
    async with ai(ollama_base_url=api.url) as (stub, _, _):
        await stub.Process(turn(file_name=[f"{files.url}/gone.png"]), timeout=10)
    user = api.requests[0].json()["messages"][-1]
    assert "images" not in user
    assert user["content"].endswith(f"- {files.url}/gone.png (image could not be fetched: HTTP 404)")


async def test_summarize_goes_through_api_chat(ai: Callable, stand_in: Callable[..., StandIn]) -> None:
    api = stand_in(lambda request: ollama_reply("Planets: Mars, Venus.", 50, 6))
    async with ai(ollama_base_url=api.url) as (stub, _, _):
        reply = await stub.Summarize(pb.SummaryRequest(
            model_name="llama3.1:8b", model_provider="ollama",
            chat_entries=json.dumps([{"role": "user", "content": "Name two planets."}]),
        ), timeout=10)
    body = api.requests[0].json()
    assert body["stream"] is False
    assert "user: Name two planets." in body["messages"][-1]["content"]
    assert "Current summary:\n(none)" in body["messages"][-1]["content"]
    # No prices in the request: llama3.1:8b's catalogue prices ($0.0015 / $0.002 per 1K).
    assert (reply.response_text, reply.input_tokens, reply.output_tokens) == ("Planets: Mars, Venus.", 50, 6)
    assert reply.cost_nanos == 75_000 + 12_000


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (404, grpc.StatusCode.NOT_FOUND),
        (429, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (500, grpc.StatusCode.UNAVAILABLE),
        (401, grpc.StatusCode.UNAUTHENTICATED),
    ],
)
async def test_ollama_errors_map_to_grpc_codes(
    ai: Callable, stand_in: Callable[..., StandIn], status: int, code: grpc.StatusCode
) -> None:
    api = stand_in(lambda request: Reply(status, {"error": "model \"llama3.1:8b\" not found, try pulling it first"}))
    async with ai(ollama_base_url=api.url) as (stub, _, _):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Process(turn(), timeout=10)
    assert info.value.code() == code
    assert "try pulling it first" in (info.value.details() or "")


async def test_unreachable_ollama_is_unavailable(ai: Callable) -> None:
    async with ai(ollama_base_url=f"http://127.0.0.1:{free_port()}") as (stub, _, _):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Process(turn(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_reply_without_a_message_is_unavailable(ai: Callable, stand_in: Callable[..., StandIn]) -> None:
    api = stand_in(lambda request: Reply(200, {"done": True}))
    async with ai(ollama_base_url=api.url) as (stub, _, _):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Process(turn(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_unconfigured_ollama_models_are_answered_offline(ai: Callable) -> None:
    async with ai() as (stub, _, _):
        reply = await stub.Process(turn(), timeout=10)
    assert reply.response_text.startswith("Echo: And the second?\n")
