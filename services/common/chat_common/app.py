"""The plugin every Litestar service is built with: health and readiness, OpenAPI, error
handlers, request ids, the service-token check for internal services, and /metrics."""
from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from litestar import Response, get
from litestar.config.app import AppConfig
from litestar.openapi import OpenAPIConfig
from litestar.plugins import InitPluginProtocol
from litestar.types import ASGIApp, Receive, Scope, Send
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

from chat_common.errors import EXCEPTION_HANDLERS
from chat_common.logging import request_id_var, turn_id_var
from chat_common.tracing import configure_tracing, shutdown_tracing

ReadinessCheck = Callable[[], Awaitable[object]]

SERVICE_TOKEN_HEADER = "x-service-token"
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
    refuses internal calls without the service token."""

    def __init__(self, app: ASGIApp, service: str, service_token: str | None) -> None:
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
            # Exact paths, not prefixes: "/health/../v1/..." or a later "/metrics-admin" route
            # must not slip past the token because of how it begins.
            if self.service_token is not None and scope["path"].rstrip("/") not in OPEN_PATHS:
                if not tokens_match(_header(scope, SERVICE_TOKEN_HEADER.encode()), self.service_token):
                    await _send_json(send, 401, b'{"error":{"code":"unauthorized","message":"missing or wrong service token"}}')
                    return
            if scope["type"] != "http":
                await self.app(scope, receive, send)
                return
            started = time.perf_counter()
            status_holder = {"status": 500}

            async def send_wrapper(message: dict) -> None:  # type: ignore[type-arg]
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


async def _send_json(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


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

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        if self.service_token is not None and not self.service_token:
            raise RuntimeError("SERVICE_TOKEN must be set for an internal service")
        plugin = self

        @get("/health", sync_to_thread=False)
        def health() -> dict[str, str]:
            return {"status": "ok", "service": plugin.name}

        @get("/ready")
        async def ready() -> Response[dict[str, object]]:
            results = await plugin.check_readiness()
            ok = all(value == "ok" for value in results.values())
            return Response(
                {"status": "ready" if ok else "not ready", "service": plugin.name, "checks": results},
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
        if configure_tracing(self.name) is not None:
            from litestar.plugins.opentelemetry import OpenTelemetryConfig

            otel = OpenTelemetryConfig(exclude=["/health", "/ready", "/metrics"])
            app_config.middleware.insert(0, otel.middleware)
            app_config.on_shutdown.append(shutdown_tracing)
        return app_config

    async def check_readiness(self) -> dict[str, str]:
        async def run(check: ReadinessCheck) -> str:
            try:
                await asyncio.wait_for(check(), self.readiness_timeout)
                return "ok"
            except Exception as exc:  # a failed dependency is an answer here, not an error
                return f"failed: {type(exc).__name__}: {exc}"[:300]

        names: Sequence[str] = list(self.readiness_checks)
        outcomes = await asyncio.gather(*(run(self.readiness_checks[n]) for n in names))
        return dict(zip(names, outcomes))
