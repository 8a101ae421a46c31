"""Running a service under uvicorn the same way everywhere (local run, containers, tests)."""
from __future__ import annotations

import uvicorn

from chat_common.logging import configure_logging
from chat_common.settings import ServiceSettings


def serve(app: object, settings: ServiceSettings, **uvicorn_options: object) -> None:
    configure_logging(settings.name, settings.log_level)
    uvicorn.run(
        app,  # type: ignore[arg-type]
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
        **uvicorn_options,  # type: ignore[arg-type]
    )
