"""``ProcessStream`` through the real gRPC server: the offline provider's word-sized deltas (and
their pacing), the OpenAI-compatible provider's server-sent events with the usage report,
Ollama's NDJSON stream, failures as statuses, and a cancelled call closing the upstream request."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest

from chat_common.aiproto import ai_service_pb2 as pb
from devstack.servers import free_port

from .ai_helpers import Reply, StandIn


def turn(**fields: object) -> pb.Request:
    base: dict[str, object] = {
        "user_id": "u1", "session_id": "s1", "chat_message": "What is my cat called?",
        "model_name": "gpt-4", "model_provider": "openai", "session_prompt": "Be brief.",
        "input_price_nanos_per_1k": 10_000_000, "output_price_nanos_per_1k": 30_000_000,
    }
    base.update(fields)
    return pb.Request(**base)  # type: ignore[arg-type]


async def chunks_of(stub: Any, request: pb.Request) -> list[pb.StreamChunk]:
    return [chunk async for chunk in stub.ProcessStream(request, timeout=10)]


async def test_offline_streams_words_whose_concatenation_is_the_process_reply(ai: Callable) -> None:
    async with ai() as (stub, _, _):
        request = turn(model_provider="", model_name="llama3.1:8b")
        chunks = await chunks_of(stub, request)
        whole = await stub.Process(request, timeout=10)
    *deltas, last = chunks
    assert last.done and last.delta == "" and not any(c.done for c in deltas)
    assert "".join(c.delta for c in deltas) == whole.response_text
    assert len(deltas) == len(whole.response_text.split())  # one word (and its whitespace) each
    assert all(c.delta.strip() for c in deltas)
    # usage is reported as it grows; the last chunk's is the whole call's, priced like Process
    outputs = [c.output_tokens for c in deltas]
    assert outputs == sorted(outputs) and outputs[0] == 1
    assert (last.input_tokens, last.output_tokens, last.cost_nanos) == (
        whole.input_tokens, whole.output_tokens, whole.cost_nanos
    )
    assert 0 < deltas[0].cost_nanos < last.cost_nanos


async def test_offline_waits_the_configured_delay_before_each_delta(ai: Callable) -> None:
    async with ai(offline_stream_delay_ms=40) as (stub, _, _):
        started = time.monotonic()
        stamps = []
        async for _chunk in stub.ProcessStream(turn(model_provider="", chat_message="one two"), timeout=10):
            stamps.append(time.monotonic() - started)
    words = len(stamps) - 1
    assert stamps[-1] >= words * 0.04
    assert stamps[0] >= 0.035


def sse(*events: dict[str, Any]) -> Reply:
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    return Reply(200, body, headers={"Content-Type": "text/event-stream"})


def openai_delta(text: str) -> dict[str, Any]:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]}


async def test_openai_streams_server_sent_events_and_prices_the_usage_report(
    ai: Callable, stand_in: Callable[..., StandIn]
) -> None:
    api = stand_in(lambda request: sse(
        {"choices": [{"index": 0, "delta": {"role": "assistant"}}]},
        openai_delta("Your cat "), openai_delta("is called "), openai_delta("Miso."),
        {"choices": [], "usage": {"prompt_tokens": 1000, "completion_tokens": 2000}},
    ))
    async with ai(openai_base_url=f"{api.url}/v1", openai_api_key="sk-t") as (stub, _, _):
        chunks = await chunks_of(stub, turn())
    body = api.requests[0].json()
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert api.requests[0].headers["authorization"] == "Bearer sk-t"
    assert [c.delta for c in chunks if c.delta] == ["Your cat ", "is called ", "Miso."]
    last = chunks[-1]
    assert last.done and (last.input_tokens, last.output_tokens) == (1000, 2000)
    assert last.cost_nanos == 10_000_000 + 60_000_000


async def test_openai_stream_errors_are_statuses(ai: Callable, stand_in: Callable[..., StandIn]) -> None:
    api = stand_in(lambda request: Reply(429, {"error": {"message": "slow down"}}))
    async with ai(openai_base_url=f"{api.url}/v1") as (stub, _, _):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await chunks_of(stub, turn())
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "slow down" in info.value.details()


async def test_ollama_streams_ndjson_with_the_final_counts(ai: Callable, stand_in: Callable[..., StandIn]) -> None:
    lines = [
        {"message": {"role": "assistant", "content": "Hel"}, "done": False},
        {"message": {"role": "assistant", "content": "lo!"}, "done": False},
        {"message": {"role": "assistant", "content": ""}, "done": True, "prompt_eval_count": 300, "eval_count": 40},
    ]
    api = stand_in(lambda request: Reply(200, "".join(json.dumps(x) + "\n" for x in lines),
                                         headers={"Content-Type": "application/x-ndjson"}))
    async with ai(ollama_base_url=api.url) as (stub, _, _):
        chunks = await chunks_of(stub, turn(model_name="llama3.1:8b", model_provider="ollama",
                                            input_price_nanos_per_1k=1_500_000, output_price_nanos_per_1k=2_000_000))
    assert api.requests[0].path == "/api/chat" and api.requests[0].json()["stream"] is True
    assert "".join(c.delta for c in chunks) == "Hello!"
    assert (chunks[-1].input_tokens, chunks[-1].output_tokens, chunks[-1].cost_nanos) == (300, 40, 450_000 + 80_000)


class Trickle:
    """A model API answering with one SSE delta every 50 ms for a long time; it records whether
    the client hung up (a write failing) before the answer was complete."""

    def __init__(self) -> None:
        self.port = free_port()
        self.hung_up = threading.Event()
        self.sent = 0
        trickle = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                try:
                    for _ in range(400):
                        self.wfile.write(f"data: {json.dumps(openai_delta('word '))}\n\n".encode())
                        self.wfile.flush()
                        trickle.sent += 1
                        time.sleep(0.05)
                except (BrokenPipeError, ConnectionResetError):
                    trickle.hung_up.set()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def trickle() -> Iterator[Trickle]:
    server = Trickle()
    yield server
    server.stop()


async def test_a_cancelled_call_stops_the_upstream_request(ai: Callable, trickle: Trickle) -> None:
    async with ai(openai_base_url=f"http://127.0.0.1:{trickle.port}/v1") as (stub, _, _):
        call = stub.ProcessStream(turn(), timeout=30)
        got = 0
        async for _chunk in call:
            got += 1
            if got == 3:
                break
        call.cancel()
        deadline = time.monotonic() + 5
        while not trickle.hung_up.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    assert trickle.hung_up.is_set(), "the model API was still asked for text after the call was cancelled"
    assert trickle.sent < 100
