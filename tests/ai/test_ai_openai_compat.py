"""The OpenAI-compatible provider through the gRPC server, against a stand-in chat-completions
server: what it sends, how it prices the reported usage, and how failures map to gRPC codes."""
from __future__ import annotations

import base64
import json
from collections.abc import Callable

import grpc
import pytest

from chat_common.aiproto import ai_service_pb2 as pb
from devstack.servers import free_port

from .ai_helpers import Reply, StandIn

HISTORY = [
    {"role": "user", "content": "My cat is called Miso."},
    {"role": "assistant", "content": "Miso is a lovely name."},
    {"role": "file", "content": "miso.jpg"},
]


def completion(text: str, prompt_tokens: int = 1234, completion_tokens: int = 567) -> Reply:
    return Reply(200, {
        "id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    })


def turn(**fields: object) -> pb.Request:
    base: dict[str, object] = {
        "user_id": "u1", "session_id": "s1", "chat_message": "What is my cat called?",
        "model_name": "gpt-4", "model_provider": "openai", "session_prompt": "Be brief.",
        "chat_summary": "The user has a cat.", "chat_history": json.dumps(HISTORY),
        "input_price_nanos_per_1k": 10_000_000, "output_price_nanos_per_1k": 30_000_000,
    }
    base.update(fields)
    return pb.Request(**base)  # type: ignore[arg-type]


async def test_process_sends_the_whole_context_and_prices_the_reported_usage(
    ai: Callable, stand_in: Callable[..., StandIn]
) -> None:
    api = stand_in(lambda request: completion("Your cat is called Miso."))
    async with ai(openai_base_url=f"{api.url}/v1", openai_api_key="sk-test-123") as (stub, _, _):
        reply = await stub.Process(turn(), timeout=10)

    assert len(api.requests) == 1
    sent = api.requests[0]
    assert (sent.method, sent.path) == ("POST", "/v1/chat/completions")
    assert sent.headers["authorization"] == "Bearer sk-test-123"
    body = sent.json()
    assert body["model"] == "gpt-4"
    assert body["messages"] == [
        {"role": "system", "content": "Be brief.\n\nSummary of the earlier conversation:\nThe user has a cat."},
        {"role": "user", "content": "My cat is called Miso."},
        {"role": "assistant", "content": "Miso is a lovely name."},
        {"role": "user", "content": "[attached file: miso.jpg]"},
        {"role": "user", "content": "What is my cat called?"},
    ]

    assert reply.response_text == "Your cat is called Miso."
    assert (reply.input_tokens, reply.output_tokens) == (1234, 567)
    # 1234 * 10_000_000 / 1000 + 567 * 30_000_000 / 1000
    assert reply.cost_nanos == 12_340_000 + 17_010_000
    assert reply.cost == pytest.approx(0.02935, rel=1e-6)


async def test_catalogue_prices_apply_when_the_request_has_none(ai: Callable, stand_in: Callable[..., StandIn]) -> None:
    api = stand_in(lambda request: completion("ok", prompt_tokens=1000, completion_tokens=2000))
    async with ai(openai_api_key="sk-x", openai_base_url=f"{api.url}/v1") as (stub, _, _):
        reply = await stub.Process(turn(input_price_nanos_per_1k=0, output_price_nanos_per_1k=0), timeout=10)
    # gpt-4 in the original catalogue: $0.03 / $0.06 per 1K tokens.
    assert reply.cost_nanos == 30_000_000 + 120_000_000


async def test_missing_usage_means_zero_tokens(ai: Callable, stand_in: Callable[..., StandIn]) -> None:
    api = stand_in(lambda request: Reply(200, {"choices": [{"message": {"role": "assistant", "content": "hi"}}]}))
    async with ai(openai_base_url=f"{api.url}/v1") as (stub, _, _):
        reply = await stub.Process(turn(), timeout=10)
    assert (reply.response_text, reply.input_tokens, reply.output_tokens, reply.cost_nanos) == ("hi", 0, 0, 0)


async def test_images_are_sent_inline_and_other_files_by_url(
    ai: Callable, stand_in: Callable[..., StandIn], file_host: Callable[[dict[str, Reply]], StandIn]
) -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(200))
    files = file_host({
        "/uploads/miso.png": Reply(200, png, {"Content-Type": "image/png"}),
        "/uploads/notes.txt": Reply(200, b"notes"),
    })
    api = stand_in(lambda request: completion("A cat."))
    image_url, text_url = f"{files.url}/uploads/miso.png", f"{files.url}/uploads/notes.txt"
    async with ai(openai_base_url=f"{api.url}/v1") as (stub, _, _):
        await stub.Process(turn(chat_message="What is in the picture?", file_name=[image_url, text_url]), timeout=10)

    user = api.requests[0].json()["messages"][-1]
    assert user["role"] == "user"
    text_part, image_part = user["content"]
    assert text_part["type"] == "text"
    assert text_part["text"].startswith("What is in the picture?\n\nAttached files:\n")
    assert f"- {image_url} (image, attached)" in text_part["text"]
    assert f"- {text_url}" in text_part["text"]
    assert image_part == {
        "type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}
    }
    # Only the image is downloaded; the text file is named, not fetched.
    assert [r.path for r in files.requests] == ["/uploads/miso.png"]


async def test_summarize_sends_a_progressive_summary_prompt(ai: Callable, stand_in: Callable[..., StandIn]) -> None:
    api = stand_in(lambda request: completion("The user has a cat named Miso.", 300, 20))
    entries = [{"role": "user", "content": "My cat is Miso."}, {"role": "assistant", "content": "Nice name."}]
    async with ai(openai_api_key="sk-s", openai_base_url=f"{api.url}/v1") as (stub, _, _):
        reply = await stub.Summarize(pb.SummaryRequest(
            model_name="gpt-4", model_provider="openai", previous_summary="The user likes animals.",
            chat_entries=json.dumps(entries), input_price_nanos_per_1k=1_000_000, output_price_nanos_per_1k=2_000_000,
        ), timeout=10)
    body = api.requests[0].json()
    assert body["model"] == "gpt-4"
    system, user = body["messages"]
    assert system["role"] == "system" and "summar" in system["content"].lower()
    assert user["role"] == "user"
    assert "The user likes animals." in user["content"]
    assert "user: My cat is Miso.\nassistant: Nice name." in user["content"]
    assert reply.response_text == "The user has a cat named Miso."
    assert (reply.input_tokens, reply.output_tokens, reply.cost_nanos) == (300, 20, 300_000 + 40_000)


async def test_other_providers_use_the_compatible_endpoint_without_a_key(
    ai: Callable, stand_in: Callable[..., StandIn]
) -> None:
    api = stand_in(lambda request: completion("from vllm"))
    async with ai(openai_base_url=f"{api.url}/v1") as (stub, _, _):
        reply = await stub.Process(turn(model_name="mistral-7b", model_provider="vllm"), timeout=10)
    assert reply.response_text == "from vllm"
    assert "authorization" not in api.requests[0].headers
    assert api.requests[0].json()["model"] == "mistral-7b"


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (401, grpc.StatusCode.UNAUTHENTICATED),
        (403, grpc.StatusCode.PERMISSION_DENIED),
        (429, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (404, grpc.StatusCode.NOT_FOUND),
        (400, grpc.StatusCode.INVALID_ARGUMENT),
        (500, grpc.StatusCode.UNAVAILABLE),
        (503, grpc.StatusCode.UNAVAILABLE),
    ],
)
async def test_provider_statuses_map_to_grpc_codes(
    ai: Callable, stand_in: Callable[..., StandIn], status: int, code: grpc.StatusCode
) -> None:
    api = stand_in(lambda request: Reply(status, {"error": {"message": f"stand-in says {status}", "type": "x"}}))
    async with ai(openai_api_key="sk-bad", openai_base_url=f"{api.url}/v1") as (stub, _, _):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Process(turn(), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as summary_info:
            await stub.Summarize(pb.SummaryRequest(model_name="gpt-4", model_provider="openai"), timeout=10)
    assert info.value.code() == code
    assert f"stand-in says {status}" in (info.value.details() or "")
    assert summary_info.value.code() == code


async def test_unreachable_provider_is_unavailable(ai: Callable) -> None:
    async with ai(openai_base_url=f"http://127.0.0.1:{free_port()}/v1") as (stub, _, _):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Process(turn(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_slow_provider_is_deadline_exceeded(ai: Callable, stand_in: Callable[..., StandIn]) -> None:
    api = stand_in(lambda request: Reply(200, {"choices": []}, delay=3))
    async with ai(openai_base_url=f"{api.url}/v1", provider_timeout_seconds=0.5) as (stub, _, _):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Process(turn(), timeout=10)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "0.5s" in (info.value.details() or "")


async def test_the_callers_deadline_bounds_the_provider_call(ai: Callable, stand_in: Callable[..., StandIn]) -> None:
    api = stand_in(lambda request: Reply(200, {"choices": []}, delay=3))
    async with ai(openai_base_url=f"{api.url}/v1", provider_timeout_seconds=120) as (stub, _, _):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Process(turn(), timeout=1.0)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # Our own status (with its message) beat the client's deadline: the provider call was cut
    # at the caller's remaining time, not left to run for the configured 120 s.
    assert "did not answer within" in (info.value.details() or "")


@pytest.mark.parametrize(
    "reply",
    [
        Reply(200, "<html>proxy error</html>"),
        Reply(200, {"choices": []}),
        Reply(200, ["not", "an", "object"]),
    ],
)
async def test_answers_that_are_not_the_api_are_unavailable(
    ai: Callable, stand_in: Callable[..., StandIn], reply: Reply
) -> None:
    api = stand_in(lambda request: reply)
    async with ai(openai_base_url=f"{api.url}/v1") as (stub, _, _):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Process(turn(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE

