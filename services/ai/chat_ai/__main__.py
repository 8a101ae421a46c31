"""``python -m chat_ai``: serve until SIGTERM/SIGINT, then drain calls in flight for
``SHUTDOWN_GRACE_SECONDS`` (chat_common.entry: the same arguments and exit codes as every
service; it owns no tables, so it has no ``migrate`` command)."""
from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from chat_ai.server import start_server, stop_server
from chat_ai.settings import AISettings
from chat_common.entry import run_service
from chat_common.tracing import configure_tracing, shutdown_tracing

logger = logging.getLogger("chat_ai")


async def serve(settings: AISettings) -> None:
    server, port = await start_server(settings)
    logger.info(
        "AI service listening",
        extra={"bind": settings.bind, "port": port, "provider_mode": settings.provider_mode,
               "openai_configured": settings.openai_configured, "ollama_configured": settings.ollama_configured},
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    logger.info("AI service stopping", extra={"grace_seconds": settings.shutdown_grace_seconds})
    await stop_server(server, settings.shutdown_grace_seconds)
    logger.info("AI service stopped")


def serve_ai(settings: AISettings) -> None:
    configure_tracing("ai")
    try:
        asyncio.run(serve(settings))
    finally:
        shutdown_tracing()


def main(argv: Sequence[str] | None = None) -> int:
    return run_service("ai", argv, load=AISettings.from_env, serve=serve_ai)


if __name__ == "__main__":
    sys.exit(main())
