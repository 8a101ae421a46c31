"""The plugin every Litestar service is built with: health and readiness, OpenAPI, error
handlers, request ids, the service-token check for internal services, and /metrics."""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import msgspec
from litestar import Litestar, Response, get
from litestar.config.app import AppConfig
from litestar.enums import ScopeType
from litestar.openapi import OpenAPIConfig
from litestar.plugins import InitPluginProtocol
from litestar.types import (
    ASGIApp,
    HTTPResponseStartEvent,
    Message,
    Receive,
    Scope,
    Send,
)
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

from chat_common.errors import EXCEPTION_HANDLERS
from chat_common.logging import request_id_var, turn_id_var
from chat_common.tracing import configure_tracing, shutdown_tracing

ReadinessCheck = Callable[[], Awaitable[object]]
logger = logging.getLogger(__name__)

SERVICE_TOKEN_HEADER = "x-service-token"  # noqa: S105 - the header's name, not a secret
REQUEST_ID_HEADER = "x-request-id"
TURN_ID_HEADER = "x-turn-id"
OPEN_PATHS = ("/health", "/ready", "/metrics")

HTTP_REQUESTS = Counter(
    "http_requests_total", "HTTP requests served", ["service", "method", "status"]
)
HTTP_LATENCY = Histogram("http_request_seconds", "HTTP request latency", ["service", "method"])


def tokens_match(given: str | None, expected: str) -> bool:
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


class ContextMiddleware:
    """Carries request and turn ids from headers into the log context; counts requests;
    refuses internal calls without the service token (first checked in front of routing, by
    GuardMiddleware)."""

    def __init__(self, app: ASGIApp, service: str, service_token: str | None = None) -> None:
        self.app = app
        self.service = service
        self.service_token = service_token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = _header(scope, REQUEST_ID_HEADER.encode()) or uuid.uuid4().hex
        request_token = request_id_var.set(request_id[:64])
        turn_token = turn_id_var.set((_header(scope, TURN_ID_HEADER.encode()) or "")[:64])
        try:
            # Also checked here, at the route, for an app run without its lifespan (which is
            # when GuardMiddleware is put in front of the router).
            if self.service_token is not None and scope["path"].rstrip("/") not in OPEN_PATHS:
                if not tokens_match(_header(scope, SERVICE_TOKEN_HEADER.encode()), self.service_token):
                    await _send_json(send, 401, _UNAUTHORIZED)
                    return
            if scope["type"] != ScopeType.HTTP:
                await self.app(scope, receive, send)
                return
            started = time.perf_counter()
            status_holder = {"status": 500}

            async def send_wrapper(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status_holder["status"] = message["status"]
                    headers = list(message.get("headers", []))
                    headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                    message["headers"] = headers
                await send(message)

            try:
                await self.app(scope, receive, send_wrapper)
            finally:
                HTTP_REQUESTS.labels(self.service, scope["method"], str(status_holder["status"])).inc()
                HTTP_LATENCY.labels(self.service, scope["method"]).observe(time.perf_counter() - started)
        finally:
            request_id_var.reset(request_token)
            turn_id_var.reset(turn_token)


async def _send_json(send: Send, status: int, body: bytes, *, close: bool = False) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    start: HTTPResponseStartEvent = {"type": "http.response.start", "status": status, "headers": headers}
    await send(start)
    await send({"type": "http.response.body", "body": body, "more_body": False})


_LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
_FORWARDING_HEADERS = (b"forwarded", b"x-forwarded-for", b"x-real-ip")
_UNAUTHORIZED = b'{"error":{"code":"unauthorized","message":"missing or wrong service token"}}'
_AMBIGUOUS_BODY = (
    b'{"error":{"code":"bad_request","message":"a request may carry Content-Length or Transfer-Encoding, not both"}}'
)


class GuardMiddleware:
    """Wraps the whole application, in front of routing (Litestar's own middleware runs only
    once a route matched, so an unknown path or method would be answered 404/405 before the
    service token was looked at, telling a stranger which routes exist):

    * a request with both Content-Length and Transfer-Encoding is refused (400, connection
      closed): two framings are how request smuggling between a proxy and a server works;
    * an internal service refuses every path but the open ones without the service token;
    * /metrics and /schema of a public service are served only to ``private_from`` (loopback
      by default) when the request did not come through a proxy, or with ``metrics_token``.
    """

    def __init__(
        self,
        app: ASGIApp,
        service_token: str | None,
        *,
        private_from: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] | None = None,
        metrics_token: str = "",
    ) -> None:
        self.app = app
        self.service_token = service_token
        self.private_from = tuple(_LOOPBACK if private_from is None else private_from)
        self.metrics_token = metrics_token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = scope["path"].rstrip("/")
        if scope["type"] == ScopeType.HTTP:
            names = {key for key, _ in scope.get("headers", [])}
            if b"transfer-encoding" in names and b"content-length" in names:
                await _send_json(send, 400, _AMBIGUOUS_BODY, close=True)
                return
        if self.service_token is not None:
            # Exact paths, not prefixes: "/health/../v1/..." or a later "/metrics-admin" route
            # must not slip past the token because of how it begins.
            if path not in OPEN_PATHS and not tokens_match(_header(scope, SERVICE_TOKEN_HEADER.encode()), self.service_token):
                await _send_json(send, 401, _UNAUTHORIZED)
                return
        elif _is_private_path(path) and not self._private_allowed(scope):
            await _send_json(send, 404, b'{"error":{"code":"not_found","message":"Not Found"}}')
            return
        await self.app(scope, receive, send)

    def _private_allowed(self, scope: Scope) -> bool:
        if self.metrics_token:
            authorization = _header(scope, b"authorization") or ""
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() == "bearer" and tokens_match(value.strip(), self.metrics_token):
                return True
        if any(key in _FORWARDING_HEADERS for key, _ in scope.get("headers", [])):
            return False  # came through a proxy: the public
        client = scope.get("client")
        try:
            address = ipaddress.ip_address(client[0]) if client else None
        except ValueError:
            return False
        return address is not None and any(address in network for network in self.private_from)


PRIVATE_PREFIXES = ("/metrics", "/schema")


def _is_private_path(path: str) -> bool:
    return any(path == prefix or path.startswith(prefix + "/") for prefix in PRIVATE_PREFIXES)


def parse_networks(items: Sequence[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(item.strip(), strict=False) for item in items if item.strip()]


class Health(msgspec.Struct):
    """``GET /health``: the process answers."""

    status: str
    service: str


class Readiness(msgspec.Struct):
    """``GET /ready``: each named check ``ok`` or ``failed``; 503 unless all are ``ok``."""

    status: str
    service: str
    checks: dict[str, str]


@dataclass(eq=False)
class ServicePlugin(InitPluginProtocol):
    """Register with ``Litestar(plugins=[ServicePlugin(...)])``.

    ``service_token`` set means an internal service: every path but health, readiness and
    metrics needs the ``X-Service-Token`` header. ``None`` means a public service (the gateway).
    """

    name: str
    version: str = "0.1.0"
    service_token: str | None = None
    readiness_checks: dict[str, ReadinessCheck] = field(default_factory=dict)
    readiness_timeout: float = 2.0
    # public services only: who may read /metrics and /schema (GuardMiddleware)
    private_from: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] | None = None
    metrics_token: str = ""

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        if self.service_token is not None and not self.service_token:
            raise RuntimeError("SERVICE_TOKEN must be set for an internal service")
        plugin = self

        @get("/health", sync_to_thread=False)
        def health() -> Health:
            return Health(status="ok", service=plugin.name)

        @get("/ready")
        async def ready() -> Response[Readiness]:
            results = await plugin.check_readiness()
            ok = all(value == "ok" for value in results.values())
            return Response(
                Readiness(status="ready" if ok else "not ready", service=plugin.name, checks=results),
                status_code=200 if ok else 503,
            )

        @get("/metrics", include_in_schema=False, sync_to_thread=False)
        def metrics() -> Response[bytes]:
            return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

        app_config.route_handlers.extend([health, ready, metrics])
        for exc_type, handler in EXCEPTION_HANDLERS.items():
            app_config.exception_handlers.setdefault(exc_type, handler)
        app_config.openapi_config = OpenAPIConfig(title=f"chat-backend {self.name}", version=self.version)
        app_config.middleware.insert(
            0, lambda app: ContextMiddleware(app, plugin.name, plugin.service_token)
        )

        def guard(app: Litestar) -> None:
            # in front of the router (see GuardMiddleware); at startup, once the app is built
            if not isinstance(app.asgi_handler, GuardMiddleware):
                app.asgi_handler = GuardMiddleware(
                    app.asgi_handler,
                    plugin.service_token,
                    private_from=plugin.private_from,
                    metrics_token=plugin.metrics_token,
                )

        app_config.on_startup.insert(0, guard)
        if configure_tracing(self.name) is not None:
            from litestar.plugins.opentelemetry import OpenTelemetryConfig

            otel = OpenTelemetryConfig(exclude=["/health", "/ready", "/metrics"])
            app_config.middleware.insert(0, otel.middleware)
            app_config.on_shutdown.append(shutdown_tracing)
        return app_config

    async def check_readiness(self) -> dict[str, str]:
        async def run(name: str, check: ReadinessCheck) -> str:
            try:
                await asyncio.wait_for(check(), self.readiness_timeout)
                return "ok"
            except Exception as exc:  # a failed dependency is an answer here, not an error
                # the public answer says only "failed"; what failed, and how, is for the log
                logger.warning(
                    "readiness check failed", extra={"check": name, "error": f"{type(exc).__name__}: {exc}"[:300]}
                )
                return "failed"

        names: Sequence[str] = list(self.readiness_checks)
        outcomes = await asyncio.gather(*(run(n, self.readiness_checks[n]) for n in names))
        return dict(zip(names, outcomes, strict=True))
