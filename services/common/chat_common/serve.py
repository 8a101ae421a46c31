"""Running a service under uvicorn the same way everywhere (local run, containers, tests).

What is chosen here, deliberately (docs/security.md, "Connections"):

* the event loop and HTTP parser: uvloop and httptools when installed (pinned in
  pyproject.toml), else asyncio and h11; the gateway, the public edge, asks for h11 (see its
  ``__main__``), and ``HTTP_PARSER`` overrides either;
* the WebSocket implementation: websockets' sans-I/O protocol (``websockets`` is pinned), in the
  subclass below, which answers what uvicorn's leaves unanswered: a handshake over the header
  limits gets its 414/431 (uvicorn logged it and sent nothing), a text frame that is not UTF-8
  is closed with 1007 and logged in one line (not an ERROR with a traceback each), and a
  shutdown with handshakes still half-open closes them instead of failing an assertion;
* a deadline for every request head (the whole head, not per byte: a slow-loris client that
  sends a byte a second gets no longer than one that sends nothing) and a size limit for it;
* forwarded headers (X-Forwarded-For, X-Forwarded-Proto) trusted only from the addresses in
  ``TRUSTED_PROXIES``: by default from none, so no client picks its own address.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import signal
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import uvicorn
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.server import ServerProtocol

from chat_common.logging import configure_logging
from chat_common.settings import ServiceSettings, env_float, env_int, env_list, env_str

BeforeShutdown = Callable[[], Awaitable[None]]
logger = logging.getLogger(__name__)

# Defaults; each can be changed by the environment variable of the same name.
HTTP_HEADER_TIMEOUT_SECONDS = 10.0
HTTP_KEEPALIVE_SECONDS = 5
MAX_REQUEST_HEAD_BYTES = 16 * 1024
_HEAD_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain\r\n"
    b"connection: close\r\ncontent-length: 32\r\n\r\nrequest header fields too large\n"
)
_HEAD_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\n"
    b"connection: close\r\ncontent-length: 16\r\n\r\nrequest timeout\n"
)


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def loop_choice() -> str:
    return "uvloop" if installed("uvloop") else "asyncio"


def http_base(parser: str = "auto") -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol on httptools (fast) or h11. ``parser`` "auto" is httptools when
    installed."""
    if parser == "httptools" or (parser == "auto" and installed("httptools")):
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    from uvicorn.protocols.http.h11_impl import H11Protocol

    return H11Protocol


class HardenedWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol with the gaps closed (see the module docstring).

    Compression is offered without context takeover: a socket then holds no zlib state
    between messages (about 40 KB per socket with it), which is what lets an idle socket
    cost a few KB.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        extensions = []
        if self.config.ws_per_message_deflate:
            extensions = [
                ServerPerMessageDeflateFactory(
                    server_no_context_takeover=True,
                    client_no_context_takeover=True,
                    server_max_window_bits=12,
                    client_max_window_bits=12,
                    compress_settings={"memLevel": 5},
                )
            ]
        self.conn = ServerProtocol(
            extensions=extensions,
            max_size=self.config.ws_max_size,
            logger=logging.getLogger("uvicorn.error"),
        )

    def data_received(self, data: bytes) -> None:
        if self.handshake_initiated:
            super().data_received(data)
            return
        self.conn.receive_data(data)
        if self.conn.handshake_exc is not None:
            self._refuse_handshake()
            return
        self.handle_events()

    def _refuse_handshake(self) -> None:
        # websockets wrote its 414/431 (or nothing, for a request it could not read) to
        # data_to_send; uvicorn's protocol never sent it
        output = b"".join(self.conn.data_to_send())
        self.handshake_initiated = self.handshake_complete = self.close_sent = True
        logger.info("WebSocket handshake refused: %s", self.conn.handshake_exc)
        if output and not self.transport.is_closing():
            self.transport.write(output)
        self.transport.close()

    def send_receive_event_to_app(self) -> None:
        if self.curr_msg_data_type == "text" and not self.close_sent:
            data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
            try:
                bytes(data).decode("utf-8")
            except UnicodeDecodeError:
                self.frames = []
                logger.info("WebSocket text frame is not UTF-8: closed with 1007")
                self.conn.send_close(1007, "invalid UTF-8")
                self.handle_parser_exception()
                return
        super().send_receive_event_to_app()

    def send_500_response(self) -> None:
        if self.conn.eof_sent or self.transport.is_closing():
            return
        try:
            super().send_500_response()
        except Exception as exc:  # the handshake state did not allow a response any more
            logger.debug("no 500 for a WebSocket handshake: %s", type(exc).__name__)

    def shutdown(self) -> None:
        if not self.handshake_initiated or self.conn.eof_sent:
            # a handshake still being received (or already refused): nothing to say to it
            self.stop_keepalive()
            self.handshake_complete = self.close_sent = True
            self.transport.close()
            return
        try:
            super().shutdown()
        except Exception as exc:
            logger.debug("WebSocket shutdown: %s", type(exc).__name__)
            self.transport.close()


class HeadGuard:
    """Mixed into uvicorn's HTTP protocol: a deadline and a size limit for every request head.

    The deadline starts with the connection (and, on a kept-alive connection, with the first
    byte of the next request) and is not renewed by more bytes.
    """

    head_timeout: float = HTTP_HEADER_TIMEOUT_SECONDS
    max_head_bytes: int = MAX_REQUEST_HEAD_BYTES

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._head_bytes = 0
        self._head_deadline: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        self._head_deadline = self.loop.call_later(self.head_timeout, self._head_timed_out)  # type: ignore[attr-defined]

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None
        self._head_bytes = 0

    def _waiting_for_head(self) -> bool:
        transport = self.transport  # type: ignore[attr-defined]
        if transport is None or transport.is_closing() or transport.get_protocol() is not self:
            return False  # closed, or upgraded to a WebSocket
        cycle = self.cycle  # type: ignore[attr-defined]
        # Answered early (a 413 while the body is still coming, say): what arrives now is the
        # rest of that body, not the head of a next request.
        return cycle is None or (cycle.response_complete and not cycle.more_body)

    def data_received(self, data: bytes) -> None:
        waiting = self._waiting_for_head()
        if waiting:
            self._head_bytes += len(data)
            if self._head_deadline is None:
                self._arm()
        super().data_received(data)  # type: ignore[misc]
        if not waiting:
            return
        if not self._waiting_for_head():
            self._disarm()  # the head is complete (what came with it is the body)
        elif self._head_bytes > self.max_head_bytes:
            self._refuse(_HEAD_TOO_LARGE, "request head too large")

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self._waiting_for_head():
            self._refuse(_HEAD_TIMEOUT if self._head_bytes else b"", "request head not received in time")

    def _refuse(self, response: bytes, why: str) -> None:
        self._disarm()
        transport = self.transport  # type: ignore[attr-defined]
        logger.info("connection closed: %s", why)
        if response and not transport.is_closing():
            transport.write(response)
        transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]


def http_protocol(head_timeout: float, max_head_bytes: int, parser: str = "auto") -> type[asyncio.Protocol]:
    base = http_base(parser)
    return type(
        f"Guarded{base.__name__}",
        (HeadGuard, base),
        {"head_timeout": head_timeout, "max_head_bytes": max_head_bytes},
    )


class GracefulServer(uvicorn.Server):
    """uvicorn, with a hook between "stop accepting connections" and uvicorn's own shutdown
    (which would cut open WebSockets at once with 1012)."""

    def __init__(self, config: uvicorn.Config, before_shutdown: BeforeShutdown | None) -> None:
        super().__init__(config)
        self.before_shutdown = before_shutdown

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            # A SIGTERM that ended in a clean shutdown is not re-raised: the process exits 0
            # (uvicorn re-raises it, and the exit status would read -15 to an orchestrator).
            self._captured_signals = [s for s in self._captured_signals if s not in (signal.SIGTERM, signal.SIGINT)]

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        if self.before_shutdown is not None:
            try:
                await self.before_shutdown()
            except Exception:
                logging.getLogger(__name__).exception("graceful shutdown hook failed")
        await super().shutdown(sockets=sockets)


def connection_options(http_parser: str = "auto") -> dict[str, Any]:
    """The uvicorn options every service runs with (see the module docstring). ``HTTP_PARSER``
    (``auto``, ``httptools``, ``h11``) overrides the service's choice of HTTP parser."""
    trusted = env_list("TRUSTED_PROXIES", []) or env_list("FORWARDED_ALLOW_IPS", [])
    return {
        "loop": loop_choice(),
        "http": http_protocol(
            env_float("HTTP_HEADER_TIMEOUT_SECONDS", HTTP_HEADER_TIMEOUT_SECONDS),
            env_int("MAX_REQUEST_HEAD_BYTES", MAX_REQUEST_HEAD_BYTES),
            env_str("HTTP_PARSER", http_parser),
        ),
        "ws": HardenedWebSocketProtocol,
        "timeout_keep_alive": env_int("HTTP_KEEPALIVE_SECONDS", HTTP_KEEPALIVE_SECONDS),
        "h11_max_incomplete_event_size": env_int("MAX_REQUEST_HEAD_BYTES", MAX_REQUEST_HEAD_BYTES),
        "proxy_headers": bool(trusted),
        "forwarded_allow_ips": trusted or None,
        "server_header": False,
    }


def serve(
    app: object,
    settings: ServiceSettings,
    *,
    before_shutdown: BeforeShutdown | None = None,
    http_parser: str = "auto",
    **uvicorn_options: object,
) -> None:
    configure_logging(settings.name, settings.log_level)
    options = {**connection_options(http_parser), **uvicorn_options}
    config = uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
        **options,
    )
    GracefulServer(config, before_shutdown).run()
