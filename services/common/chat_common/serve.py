"""Running a service under uvicorn the same way everywhere (local run, containers, tests)."""
from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable

import uvicorn

from chat_common.logging import configure_logging
from chat_common.settings import ServiceSettings

BeforeShutdown = Callable[[], Awaitable[None]]


class GracefulServer(uvicorn.Server):
    """uvicorn, with a hook between "stop accepting connections" and uvicorn's own shutdown
    (which would cut open WebSockets at once with 1012)."""

    def __init__(self, config: uvicorn.Config, before_shutdown: BeforeShutdown | None) -> None:
        super().__init__(config)
        self.before_shutdown = before_shutdown

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        if self.before_shutdown is not None:
            try:
                await self.before_shutdown()
            except Exception:
                logging.getLogger(__name__).exception("graceful shutdown hook failed")
        await super().shutdown(sockets=sockets)


def serve(
    app: object,
    settings: ServiceSettings,
    *,
    before_shutdown: BeforeShutdown | None = None,
    **uvicorn_options: object,
) -> None:
    configure_logging(settings.name, settings.log_level)
    config = uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
        **uvicorn_options,  # type: ignore[arg-type]
    )
    GracefulServer(config, before_shutdown).run()
