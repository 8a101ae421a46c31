"""Helpers for the AI service tests: stand-in HTTP servers (a model API, a file host) running in
threads on free ports, and the service as a real gRPC server on a free port."""
from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc

from chat_ai.server import start_server, stop_server
from chat_ai.settings import AISettings
from chat_common.aiproto import ai_service_pb2_grpc
from devstack.servers import free_port


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Reply:
    status: int = 200
    body: bytes | dict | list | str = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


class StandIn:
    """An HTTP server in a thread that records every request and answers with ``respond``."""

    def __init__(self, respond: Callable[[Recorded], Reply]) -> None:
        self.respond = respond
        self.requests: list[Recorded] = []
        self.port = free_port()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                recorded = Recorded(
                    self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                    self.rfile.read(length) if length else b"",
                )
                stand_in.requests.append(recorded)
                reply = stand_in.respond(recorded)
                if reply.delay:
                    time.sleep(reply.delay)
                body = reply.body
                content_type = "application/octet-stream"
                if isinstance(body, (dict, list)):
                    body, content_type = json.dumps(body).encode(), "application/json"
                elif isinstance(body, str):
                    body, content_type = body.encode(), "text/plain; charset=utf-8"
                try:
                    self.send_response(reply.status)
                    headers = {"Content-Type": content_type, "Content-Length": str(len(body)), **reply.headers}
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test); nothing to answer

            do_GET = do_POST = do_HEAD = _handle

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "StandIn":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def base_settings(**overrides: Any) -> AISettings:
    """Settings as an unconfigured environment gives them, on a free port."""
    return replace(AISettings(), port=free_port(), **overrides)


@contextlib.asynccontextmanager
async def running_ai(settings: AISettings) -> AsyncIterator[tuple[ai_service_pb2_grpc.AIServiceStub, grpc.aio.Channel, int]]:
    server, port = await start_server(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield ai_service_pb2_grpc.AIServiceStub(channel), channel, port
    finally:
        await stop_server(server, 0)
