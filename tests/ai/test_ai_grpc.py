"""The service through a real gRPC server on a free port, called with the generated stub:
the original ``Process`` contract, the ``Summarize`` extension, health, prices and errors."""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import threading
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chat_ai.server import start_server, stop_server
from chat_common.aiproto import ai_service_pb2 as pb
from chat_common.aiproto import ai_service_pb2_grpc
from chat_common.logging import JsonFormatter
from chat_common.money import dollars_to_nanos
from devstack.servers import port_is_free

from .ai_helpers import Recorded, Reply, StandIn, base_settings, running_ai

HISTORY = json.dumps([
    {"role": "user", "content": "My cat is called Miso."},
    {"role": "assistant", "content": "Miso is a lovely name for a cat."},
    {"role": "file", "content": "miso.jpg"},
])


def turn(**fields: object) -> pb.Request:
    base: dict[str, object] = {
        "user_id": "u1", "session_id": "s1", "chat_message": "What is my cat called?",
        "model_name": "llama3.1:8b", "model_provider": "ollama", "session_prompt": "Be brief.",
        "chat_summary": "The user has a cat.", "chat_history": HISTORY, "balance": 1.0,
    }
    base.update(fields)
    return pb.Request(**base)  # type: ignore[arg-type]


async def test_process_answers_offline_with_every_input_visible(ai: Callable) -> None:
    async with ai() as (stub, _, _):
        reply = await stub.Process(turn(), timeout=10)
    lines = reply.response_text.splitlines()
    assert lines[:5] == [
        "Echo: What is my cat called?",
        "Prompt: Be brief.",
        "History: 3 entries; last: file: miso.jpg",
        "Summary: The user has a cat.",
        "Files: (none)",
    ]
    assert reply.timestamp.seconds > 0
    # 2 + 5 + 5 + 8 + 1 + 5 words of prompt, summary, history and message.
    assert reply.input_tokens == 26
    assert reply.output_tokens == len(reply.response_text.split())


async def test_process_is_deterministic(ai: Callable) -> None:
    async with ai() as (stub, _, _):
        first = await stub.Process(turn(), timeout=10)
        second = await stub.Process(turn(), timeout=10)
    assert (first.response_text, first.input_tokens, first.output_tokens, first.cost_nanos) == (
        second.response_text, second.input_tokens, second.output_tokens, second.cost_nanos
    )


async def test_cost_uses_the_prices_in_the_request(ai: Callable) -> None:
    async with ai() as (stub, _, _):
        reply = await stub.Process(
            turn(input_price_nanos_per_1k=1_000_000, output_price_nanos_per_1k=3_000_000), timeout=10
        )
    expected = -(-(reply.input_tokens * 1_000_000 + reply.output_tokens * 3_000_000) // 1000)
    assert reply.cost_nanos == expected > 0
    assert reply.cost == pytest.approx(expected / 1e9, rel=1e-6)


async def test_cost_falls_back_to_the_original_catalogue(ai: Callable) -> None:
    async with ai() as (stub, _, _):
        gpt4 = await stub.Process(turn(model_name="gpt-4", model_provider="openai"), timeout=10)
        unknown = await stub.Process(turn(model_name="home-made-model", model_provider="openai"), timeout=10)
    # gpt-4: $0.03 in / $0.06 out per 1K tokens (the original catalogue, billing migration 0001).
    expected = -(-(gpt4.input_tokens * dollars_to_nanos("0.03") + gpt4.output_tokens * dollars_to_nanos("0.06")) // 1000)
    assert gpt4.cost_nanos == expected > 0
    # A model priced nowhere is still answered, at no cost.
    assert unknown.response_text.startswith("Echo: ")
    assert (unknown.cost_nanos, unknown.cost) == (0, 0.0)
    assert unknown.input_tokens > 0


async def test_process_fetches_the_attached_file(ai: Callable, file_host: Callable[[dict[str, Reply]], StandIn]) -> None:
    content = b"%PDF-1.4 pretend this is a report\n" * 500
    host = file_host({"/uploads/report.pdf": Reply(200, content, {"Content-Type": "application/pdf"})})
    url = f"{host.url}/uploads/report.pdf"
    async with ai() as (stub, _, _):
        # The original gateway sends [""] for "no file"; it must not count as one.
        reply = await stub.Process(turn(file_name=[url, ""]), timeout=10)
    lines = reply.response_text.splitlines()
    assert "Files: 1" in lines
    assert f"- {url}: fetched {len(content)} bytes sha256 {hashlib.sha256(content).hexdigest()}" in lines
    assert [(r.method, r.path) for r in host.requests] == [("GET", "/uploads/report.pdf")]


async def test_summarize_covers_the_given_entries(ai: Callable) -> None:
    entries = [
        {"role": "user", "content": "Plan a trip to Lisbon."},
        {"role": "assistant", "content": "Day 1: Alfama. Day 2: Belem."},
    ]
    async with ai() as (stub, _, _):
        reply = await stub.Summarize(
            pb.SummaryRequest(
                user_id="u1", session_id="s1", model_name="gpt-4", model_provider="openai",
                previous_summary="The user likes travel.", chat_entries=json.dumps(entries),
                input_price_nanos_per_1k=2_000_000, output_price_nanos_per_1k=2_000_000,
            ),
            timeout=10,
        )
    assert reply.response_text.splitlines() == [
        "The user likes travel.",
        "user: Plan a trip to Lisbon.",
        "assistant: Day 1: Alfama. Day 2: Belem.",
    ]
    assert reply.input_tokens == 4 + 5 + 6
    assert reply.cost_nanos == -(-((reply.input_tokens + reply.output_tokens) * 2_000_000) // 1000)


async def test_health_is_serving(ai: Callable) -> None:
    async with ai() as (_, channel, _):
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "ai_service.AIService"):
            answer = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_listens_on_the_port_it_was_given() -> None:
    settings = base_settings()
    server, port = await start_server(settings)
    try:
        assert port == settings.port
        # A second server on the same port must fail loudly, not share it.
        with pytest.raises(OSError):
            await start_server(settings)
    finally:
        await stop_server(server, 0)


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"chat_message": ""}, "chat_message is empty"),
        ({"chat_message": "   \n"}, "chat_message is empty"),
        ({"model_name": ""}, "model_name is empty"),
        ({"chat_history": "[{\"role\": \"user\""}, "chat_history is not valid JSON"),
        ({"chat_history": "{\"role\": \"user\"}"}, "chat_history must be a JSON array"),
        ({"chat_history": "[\"hello\"]"}, "chat_history[0] must be an object"),
        ({"chat_history": "[{\"content\": \"x\"}]"}, "chat_history[0].role"),
        ({"chat_history": "[{\"role\": \"user\", \"content\": 5}]"}, "chat_history[0].content"),
        ({"file_name": [f"http://127.0.0.1/{i}" for i in range(17)]}, "at most 16 files"),
    ],
)
async def test_bad_requests_are_invalid_argument_without_traceback(
    ai: Callable, caplog: pytest.LogCaptureFixture, fields: dict[str, object], fragment: str
) -> None:
    caplog.set_level(logging.INFO, logger="chat_ai")
    async with ai() as (stub, _, _):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Process(turn(**fields), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in (info.value.details() or "")
    failures = [r for r in caplog.records if r.name.startswith("chat_ai") and r.levelno >= logging.WARNING]
    assert failures and all(r.exc_info is None and r.levelno == logging.WARNING for r in failures)


async def test_history_may_be_empty_or_null(ai: Callable) -> None:
    async with ai() as (stub, _, _):
        for history in ("", "null", "[]"):
            reply = await stub.Process(turn(chat_history=history), timeout=10)
            assert "History: 0 entries" in reply.response_text.splitlines()


async def test_summarize_rejects_bad_entries(ai: Callable) -> None:
    async with ai() as (stub, _, _):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Summarize(pb.SummaryRequest(model_name="gpt-4", chat_entries="not json"), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "chat_entries" in (info.value.details() or "")


async def test_request_and_turn_ids_reach_the_log_lines(ai: Callable) -> None:
    # Formatted as each line is emitted, as configure_logging's handler does in production.
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("ai"))
    logger = logging.getLogger("chat_ai")
    logger.addHandler(handler)
    previous_level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        async with ai() as (stub, _, _):
            await stub.Process(turn(), metadata=(("x-request-id", "req-42"), ("x-turn-id", "turn-7")), timeout=10)
            await stub.Process(turn(), timeout=10)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    answered = [line for line in lines if line["msg"] == "Process answered"]
    assert len(answered) == 2
    assert (answered[0]["request_id"], answered[0]["turn_id"]) == ("req-42", "turn-7")
    assert answered[0]["provider"] == "offline" and answered[0]["model"] == "llama3.1:8b"
    assert answered[0]["service"] == "ai" and answered[0]["input_tokens"] == 26
    # The ids belong to that call only.
    assert "request_id" not in answered[1] and "turn_id" not in answered[1]


async def test_calls_are_served_concurrently(ai: Callable, stand_in: Callable[..., StandIn]) -> None:
    # The file host answers no fetch until all five are waiting at once: calls served one after
    # another would break the barrier (its timeout is only a guard against hanging forever).
    together = threading.Barrier(5, timeout=8)

    def respond(request: Recorded) -> Reply:
        try:
            together.wait()
        except threading.BrokenBarrierError:
            return Reply(503, "the fetches did not overlap")
        return Reply(200, b"slow")

    host = stand_in(respond)
    async with ai() as (stub, _, _):
        replies = await asyncio.gather(*(
            stub.Process(turn(chat_message=f"message {i}", file_name=[f"{host.url}/slow.txt"]), timeout=10)
            for i in range(5)
        ))
    assert [r.response_text.splitlines()[0] for r in replies] == [f"Echo: message {i}" for i in range(5)]
    for reply in replies:
        assert "fetched 4 bytes" in reply.response_text, reply.response_text


async def test_running_ai_helper_stops_cleanly() -> None:
    settings = base_settings()
    async with running_ai(settings) as (stub, _, port):
        assert port == settings.port
        await stub.Process(turn(), timeout=10)
    # Stopped: the port is free again.
    assert port_is_free(settings.port)


async def test_stop_lets_calls_in_flight_finish(stand_in: Callable[..., StandIn]) -> None:
    api = stand_in(lambda request: Reply(200, {
        "choices": [{"message": {"role": "assistant", "content": "finished"}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1},
    }, delay=1.0))
    server, port = await start_server(base_settings(openai_base_url=f"{api.url}/v1"))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = ai_service_pb2_grpc.AIServiceStub(channel)
        call = asyncio.ensure_future(stub.Process(turn(model_name="gpt-4", model_provider="openai"), timeout=10))
        while not api.requests:  # the call is now waiting on the provider
            await asyncio.sleep(0.02)
        await stop_server(server, grace=5)
        reply = await call
    assert reply.response_text == "finished"
    assert port_is_free(port)
