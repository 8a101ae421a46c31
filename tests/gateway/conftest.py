"""Gateway tests against the real system: every service a process, real PostgreSQL, Redis and S3.

``stack`` is the session-wide ``system`` of the root conftest (one stack for the whole run). Tests that must see or steer what the AI receives start a stand-in AI (the generated
servicer in a thread of this process, recording every request) and a gateway process of their
own pointed at it; everything else goes through the real AI service (offline provider).
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Self

import grpc
import pytest
import websockets

from chat_common.aiproto import ai_service_pb2 as pb
from chat_common.aiproto import ai_service_pb2_grpc as pb_grpc
from devstack.servers import ServiceProcess, free_port
from devstack.stack import Stack

RECV_TIMEOUT = 30.0
PROCESS_COST_NANOS = 1_000
SUMMARY_COST_NANOS = 500


# --------------------------------------------------------------------------------------------
# the system


@pytest.fixture(scope="session")
def stack(system: Stack) -> Stack:
    """The shared system (tests/conftest.py): all five services as processes."""
    return system


def new_user(stack: Stack, *, models: list[int] | None = None, balance: float = 1.0) -> str:
    return stack.create_user(f"user-{uuid.uuid4().hex[:6]}", models if models is not None else [4, 5, 8], balance)


def balance_of(stack: Stack, user_id: str) -> dict[str, Any]:
    return stack.admin("GET", f"/v1/users/{user_id}/balance")


def start_gateway(stack: Stack, ai_port: int | None = None, **env: str) -> ServiceProcess:
    """Another gateway process on the same Redis and services (optionally its own AI)."""
    extra = {key: str(value) for key, value in env.items()}
    if ai_port is not None:
        extra["AI_SERVER_PORT"] = str(ai_port)
    key = f"gateway-{uuid.uuid4().hex[:6]}"
    return stack.start_service("gateway", port=free_port(), env=extra, key=key)


def ws_url(process: ServiceProcess) -> str:
    return f"ws://127.0.0.1:{process.port}/ws"


# --------------------------------------------------------------------------------------------
# a WebSocket client


class Client:
    def __init__(self, socket: Any) -> None:
        self.socket = socket

    async def send(self, type_: Any, **data: Any) -> None:
        await self.socket.send(json.dumps({"type": type_, "data": data}))

    async def send_raw(self, text: str) -> None:
        await self.socket.send(text)

    async def recv(self, timeout: float = RECV_TIMEOUT) -> dict[str, Any]:
        return json.loads(await asyncio.wait_for(self.socket.recv(), timeout))

    async def request(self, type_: Any, **data: Any) -> dict[str, Any]:
        await self.send(type_, **data)
        return await self.recv()

    async def chat(self, user_id: str, session_id: str, message: str, **extra: Any) -> dict[str, Any]:
        data = {
            "user_id": user_id,
            "session_id": session_id,
            "model_name": "llama3.1:8b",
            "message": message,
            "session_prompt": "be brief",
            "file_name": "",
        }
        data.update(extra)
        return await self.request(3, **data)

    async def close(self) -> None:
        await self.socket.close()


class connect:
    """``async with connect(url) as client``"""

    def __init__(self, url: str) -> None:
        self.url = url

    async def __aenter__(self) -> Client:
        self._socket = await websockets.connect(self.url, max_size=None, open_timeout=10)
        return Client(self._socket)

    async def __aexit__(self, *exc: object) -> None:
        await self._socket.close()


def assert_ok(reply: dict[str, Any], type_: int) -> dict[str, Any]:
    assert "error" not in reply, reply
    assert reply["type"] == type_, reply
    return reply["data"]


def assert_error(reply: dict[str, Any], code: int, type_: int | None, text: str | None = None) -> None:
    assert reply.get("code") == code, reply
    assert reply.get("type") == type_, reply
    assert "data" not in reply
    if text is not None:
        assert text in reply["error"], reply


# --------------------------------------------------------------------------------------------
# the stand-in AI


@dataclass
class Seen:
    session_id: str
    message: str
    history: list[dict[str, str]]
    summary: str
    prompt: str
    files: list[str]
    model: str
    provider: str
    balance: float
    input_price: int
    metadata: dict[str, str]


@dataclass
class StandInAI(pb_grpc.AIServiceServicer):
    """Records what the gateway sends. Messages steer it: ``slow:<seconds> ...`` sleeps first,
    ``fail ...`` answers UNAVAILABLE. Summaries are the previous summary plus one
    ``role: content`` line per folded entry, so a test can tell exactly what was folded."""

    summarize: bool = True
    fail_summaries: bool = False
    seen: list[Seen] = field(default_factory=list)
    summaries: list[dict[str, Any]] = field(default_factory=list)
    fallback_summaries: int = 0
    failed_summaries: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    port: int = 0
    server: Any = None

    def start(self) -> Self:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
        pb_grpc.add_AIServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop(grace=None)

    def Process(self, request: pb.Request, context: grpc.ServicerContext) -> pb.Response:
        if request.chat_message.startswith("Current summary:\n"):
            return self._fallback_summary(request)
        with self.lock:
            self.seen.append(
                Seen(
                    session_id=request.session_id,
                    message=request.chat_message,
                    history=json.loads(request.chat_history or "[]"),
                    summary=request.chat_summary,
                    prompt=request.session_prompt,
                    files=list(request.file_name),
                    model=request.model_name,
                    provider=request.model_provider,
                    balance=request.balance,
                    input_price=request.input_price_nanos_per_1k,
                    metadata={k: v for k, v in context.invocation_metadata()},
                )
            )
        if request.chat_message.startswith("slow:"):
            time.sleep(float(request.chat_message.split()[0].split(":")[1]))
        if request.chat_message.startswith("fail"):
            context.abort(grpc.StatusCode.UNAVAILABLE, "the model is down")
        return pb.Response(response_text=f"reply to: {request.chat_message}", cost_nanos=PROCESS_COST_NANOS)

    def Summarize(self, request: pb.SummaryRequest, context: grpc.ServicerContext) -> pb.Response:
        if not self.summarize:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "no Summarize here")
        if self.fail_summaries:
            with self.lock:
                self.failed_summaries.append(request.session_id)
            context.abort(grpc.StatusCode.UNAVAILABLE, "summaries are down")
        entries = json.loads(request.chat_entries)
        with self.lock:
            self.summaries.append(
                {"session_id": request.session_id, "previous": request.previous_summary, "entries": entries}
            )
        lines = [request.previous_summary] if request.previous_summary else []
        lines += [f"{e['role']}: {e['content']}" for e in entries]
        return pb.Response(response_text="\n".join(lines), cost_nanos=SUMMARY_COST_NANOS)

    def _fallback_summary(self, request: pb.Request) -> pb.Response:
        text = request.chat_message
        previous = text.split("Current summary:\n", 1)[1].split("\n\nNew lines of conversation:\n", 1)[0]
        new = text.split("\n\nNew lines of conversation:\n", 1)[1].rsplit("\n\nNew summary:", 1)[0]
        with self.lock:
            self.fallback_summaries += 1
        summary = f"{previous}\n{new}" if previous else new
        return pb.Response(response_text=summary, cost_nanos=SUMMARY_COST_NANOS)

    def summaries_for(self, session_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [s for s in self.summaries if s["session_id"] == session_id]

    def seen_for(self, session_id: str) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if s.session_id == session_id]


@pytest.fixture(scope="session")
def stand_in_ai() -> Iterator[StandInAI]:
    server = StandInAI().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def stand_in_gateway(stack: Stack, stand_in_ai: StandInAI) -> ServiceProcess:
    return start_gateway(stack, stand_in_ai.port, MAX_CHAT_HISTORY_CONTEXT="10")


@pytest.fixture(scope="session")
def original_ai() -> Iterator[StandInAI]:
    """An AI service built for the original: no Summarize RPC."""
    server = StandInAI(summarize=False).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def original_ai_gateway(stack: Stack, original_ai: StandInAI) -> ServiceProcess:
    return start_gateway(stack, original_ai.port, MAX_CHAT_HISTORY_CONTEXT="10")


def summary_lines(entries: list[dict[str, str]]) -> str:
    return "\n".join(f"{e['role']}: {e['content']}" for e in entries)


def internal(stack: Stack, service: str, method: str, path: str, body: Any = None, raw: bytes | None = None) -> Any:
    """A call to an internal service API with the service token (synchronous)."""
    import urllib.request

    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(
        f"{stack.url(service)}{path}",
        method=method,
        data=data,
        headers={"content-type": "application/json" if raw is None else "application/octet-stream",
                 "x-service-token": stack.service_token},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        payload = response.read()
    return json.loads(payload) if payload else None


def summarized_count(summary: str) -> int:
    """How many entries a stand-in summary covers (one ``role: content`` line each)."""
    return len(summary.splitlines()) if summary else 0


def assert_ai_saw_exact_window(ai: StandInAI, session_id: str, final: list[dict[str, str]], window: int) -> int:
    """Every AI call of the session got exactly the ``window`` entries before its message as
    history and a summary of the session's first entries that leaves no gap before that window
    (folded ahead, it may overlap the window, never reach past the message); returns how many
    calls were checked."""
    positions = {e["content"]: i for i, e in enumerate(final) if e["role"] == "user"}
    seen = ai.seen_for(session_id)
    for call in seen:
        p = positions[call.message]
        start = max(0, p - window)
        assert call.history == final[start:p], f"history of {call.message!r}"
        covered = summarized_count(call.summary)
        assert start <= covered <= p, f"summary of {call.message!r} covers {covered} of {p} entries"
        assert call.summary == summary_lines(final[:covered]), f"summary of {call.message!r}"
    return len(seen)


def assert_coherent(final: list[dict[str, str]]) -> None:
    """user, assistant, user, assistant...; each reply answers the message right before it."""
    assert [e["role"] for e in final] == ["user", "assistant"] * (len(final) // 2)
    for question, answer in zip(final[::2], final[1::2], strict=True):
        assert answer["content"] == f"reply to: {question['content']}"
