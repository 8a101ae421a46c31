"""``Request.max_output_tokens`` (field 102, a balance-aware turn's cap): the offline provider
cuts its reply to that many tokens by its own counting, the OpenAI-compatible provider sends
``max_tokens`` and Ollama ``options.num_predict``, unary and streamed; unset, nothing changes."""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import grpc
import httpx
import pytest

from chat_ai.providers.base import ChatCall, count_tokens
from chat_ai.providers.offline import OfflineProvider, first_tokens
from chat_common.aiproto import ai_service_pb2 as pb

from .ai_helpers import Reply, StandIn

LONG = " ".join(f"word{i}" for i in range(200))


def turn(**fields: object) -> pb.Request:
    base: dict[str, object] = {
        "user_id": "u1", "session_id": "s1", "chat_message": LONG,
        "model_name": "llama3.1:8b", "model_provider": "", "session_prompt": "Be brief.",
        "input_price_nanos_per_1k": 1_500_000, "output_price_nanos_per_1k": 2_000_000,
    }
    base.update(fields)
    return pb.Request(**base)  # type: ignore[arg-type]


def test_first_tokens_keeps_whole_words_and_their_inner_whitespace() -> None:
    text = "Echo: one two\nPrompt:  three"
    assert first_tokens(text, 3) == "Echo: one two"
    assert first_tokens(text, 4) == "Echo: one two\nPrompt:"
    assert first_tokens(text, 5) == text and first_tokens(text, 50) == text
    assert count_tokens(first_tokens(text, 2)) == 2


async def test_offline_reply_is_cut_to_the_limit_and_priced_for_what_it_produced() -> None:
    async with httpx.AsyncClient() as client:
        provider = OfflineProvider(client)
        whole = await provider.chat(ChatCall(model="m", message=LONG), timeout=5)
        cut = await provider.chat(ChatCall(model="m", message=LONG, max_output_tokens=50), timeout=5)
        roomy = await provider.chat(ChatCall(model="m", message=LONG, max_output_tokens=10_000), timeout=5)
    assert whole.output_tokens > 200
    assert cut.output_tokens == 50 == count_tokens(cut.text)
    assert whole.text.startswith(cut.text) and cut.input_tokens == whole.input_tokens
    assert roomy == whole


async def test_process_and_process_stream_honour_the_field_offline(ai: Callable) -> None:
    async with ai() as (stub, _, _):
        whole = await stub.Process(turn(), timeout=10)
        cut = await stub.Process(turn(max_output_tokens=40), timeout=10)
        chunks = [c async for c in stub.ProcessStream(turn(max_output_tokens=40), timeout=10)]
    assert cut.output_tokens == 40 < whole.output_tokens
    assert len(cut.response_text.split()) == 40
    # ceil((input * 1_500_000 + 40 * 2_000_000) / 1000)
    assert cut.cost_nanos == cut.input_tokens * 1_500 + 40 * 2_000
    assert "".join(c.delta for c in chunks) == cut.response_text
    assert chunks[-1].done and chunks[-1].output_tokens == 40 and chunks[-1].cost_nanos == cut.cost_nanos


async def test_an_unset_field_is_not_zero_and_zero_is_refused(ai: Callable) -> None:
    request = turn()
    assert not request.HasField("max_output_tokens")
    async with ai() as (stub, _, _):
        reply = await stub.Process(request, timeout=10)
        assert reply.output_tokens > 200
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Process(turn(max_output_tokens=0), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_output_tokens" in (info.value.details() or "")


def test_the_field_is_wire_compatible_with_a_request_built_for_the_original() -> None:
    """An AI service built for the original (fields 1-11) skips field 102; ours reads a request
    without it as unset."""
    sent = turn(max_output_tokens=77).SerializeToString()
    parsed = pb.Request.FromString(sent)
    assert parsed.HasField("max_output_tokens") and parsed.max_output_tokens == 77
    stripped = pb.Request(user_id="u1", chat_message="hi", model_name="m").SerializeToString()
    assert not pb.Request.FromString(stripped).HasField("max_output_tokens")


def openai_completion(text: str) -> Reply:
    return Reply(200, {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 12},
    })


def sse(*events: dict[str, Any]) -> Reply:
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    return Reply(200, body, headers={"Content-Type": "text/event-stream"})


async def test_openai_compatible_sends_max_tokens(ai: Callable, stand_in: Callable[..., StandIn]) -> None:
    def respond(request: Any) -> Reply:
        if request.json().get("stream"):
            return sse({"choices": [{"index": 0, "delta": {"content": "short"}}]},
                       {"choices": [], "usage": {"prompt_tokens": 100, "completion_tokens": 12}})
        return openai_completion("short")

    api = stand_in(respond)
    async with ai(openai_base_url=f"{api.url}/v1") as (stub, _, _):
        await stub.Process(turn(model_name="gpt-4", model_provider="openai", max_output_tokens=12), timeout=10)
        [c async for c in stub.ProcessStream(
            turn(model_name="gpt-4", model_provider="openai", max_output_tokens=12), timeout=10)]
        await stub.Process(turn(model_name="gpt-4", model_provider="openai"), timeout=10)
    unary, streamed, unlimited = (r.json() for r in api.requests)
    assert unary["max_tokens"] == 12 and streamed["max_tokens"] == 12 and streamed["stream"] is True
    assert "max_tokens" not in unlimited


async def test_ollama_sends_num_predict(ai: Callable, stand_in: Callable[..., StandIn]) -> None:
    def respond(request: Any) -> Reply:
        if request.json().get("stream"):
            return Reply(200, json.dumps({"message": {"content": "hi"}, "done": True, "prompt_eval_count": 5,
                                          "eval_count": 1}) + "\n", headers={"Content-Type": "application/x-ndjson"})
        return Reply(200, {"message": {"role": "assistant", "content": "hi"}, "done": True,
                           "prompt_eval_count": 5, "eval_count": 1})

    api = stand_in(respond)
    async with ai(ollama_base_url=api.url) as (stub, _, _):
        await stub.Process(turn(model_provider="ollama", max_output_tokens=30), timeout=10)
        [c async for c in stub.ProcessStream(turn(model_provider="ollama", max_output_tokens=30), timeout=10)]
        await stub.Process(turn(model_provider="ollama"), timeout=10)
    unary, streamed, unlimited = (r.json() for r in api.requests)
    assert unary["options"] == {"num_predict": 30} and streamed["options"] == {"num_predict": 30}
    assert "options" not in unlimited
