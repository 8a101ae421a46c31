"""The gRPC server: the AI service plus the standard ``grpc.health.v1`` service, usable in-process
(tests) and from ``python -m chat_ai``."""
from __future__ import annotations

import logging
import weakref

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from chat_ai.service import AIService
from chat_ai.settings import AISettings
from chat_common.aiproto import ai_service_pb2_grpc

logger = logging.getLogger("chat_ai.server")

SERVICE_NAME = "ai_service.AIService"
# Room for long chat histories and summaries; gRPC's default cap is 4 MB.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

_running: "weakref.WeakKeyDictionary[grpc.aio.Server, tuple[AIService, health_aio.HealthServicer]]" = (
    weakref.WeakKeyDictionary()
)


def _address(bind: str, port: int) -> str:
    host = f"[{bind}]" if ":" in bind and not bind.startswith("[") else bind
    return f"{host}:{port}"


async def start_server(settings: AISettings) -> tuple[grpc.aio.Server, int]:
    """Start serving on ``settings.bind:settings.port`` (port 0 picks a free one).

    Returns the server and the port it listens on; stop it with :func:`stop_server` so health
    turns NOT_SERVING first and the HTTP client is closed.
    """
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # Without this a second instance could silently share the port (SO_REUSEPORT).
        ("grpc.so_reuseport", 0),
    ])
    service = AIService(settings)
    ai_service_pb2_grpc.add_AIServiceServicer_to_server(service, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    address = _address(settings.bind, settings.port)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        await service.aclose()
        raise OSError(f"cannot listen on {address}: {exc}") from exc
    if port == 0:
        await service.aclose()
        raise OSError(f"cannot listen on {address}")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    _running[server] = (service, health)
    return server, port


async def stop_server(server: grpc.aio.Server, grace: float | None = None) -> None:
    """Report NOT_SERVING, let calls in flight finish for ``grace`` seconds, then stop."""
    service, health = _running.pop(server, (None, None))
    if health is not None:
        await health.enter_graceful_shutdown()
    await server.stop(grace)
    if service is not None:
        await service.aclose()
