"""``python -m chat_ai``: serve until SIGTERM/SIGINT, then drain calls in flight for
``SHUTDOWN_GRACE_SECONDS``."""
from __future__ import annotations

import asyncio
import logging
import signal
import sys

from chat_ai.server import start_server, stop_server
from chat_ai.settings import AISettings
from chat_common.logging import configure_logging
from chat_common.tracing import configure_tracing, shutdown_tracing
from chat_common.settings import env_str

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


def main() -> int:
    try:
        configure_logging("ai", env_str("LOG_LEVEL", "INFO"))
        settings = AISettings.from_env()
    except ValueError as exc:
        configure_logging("ai", "INFO")
        logger.error("invalid configuration: %s", exc)
        return 2
    configure_tracing("ai")
    try:
        asyncio.run(serve(settings))
    except OSError as exc:
        logger.error("cannot start: %s", exc)
        return 1
    finally:
        shutdown_tracing()
    return 0


if __name__ == "__main__":
    sys.exit(main())
