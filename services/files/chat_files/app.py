from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.di import Provide

from chat_common.app import ServicePlugin
from chat_common.errors import register_unavailable
from chat_common.periodic import every
from chat_files.files.admin import FilesAdmin, FilesAdminController
from chat_files.files.controllers import FilesController
from chat_files.files.services import FilesService
from chat_files.files.storage import ObjectStorage, StorageError
from chat_files.settings import FilesSettings

logger = logging.getLogger(__name__)

# an unreachable bucket is an outage (503), like an unreachable database
register_unavailable(StorageError)

# How long a starting service waits for an object store that starts beside it.
BUCKET_WAIT_SECONDS = 30.0


async def _sweep_once(service: FilesService) -> None:
    result = await service.sweep()
    if result.stale_removed or result.orphans_removed:
        logger.info("file sweep", extra={"stale_removed": result.stale_removed, "orphans_removed": result.orphans_removed})


async def _ensure_bucket(storage: ObjectStorage, bucket: str) -> None:
    """Create the bucket, waiting a while for an object store that starts beside us; then
    serve anyway (readiness reports the bucket until it is reachable)."""
    deadline = time.monotonic() + BUCKET_WAIT_SECONDS
    while True:
        try:
            await storage.ensure_bucket()
            return
        except StorageError as exc:
            if time.monotonic() > deadline:
                logger.warning("could not ensure bucket %s: %s", bucket, exc)
                return
            await asyncio.sleep(1.0)


def create_app(settings: FilesSettings | None = None) -> Litestar:
    settings = settings or FilesSettings.from_env()
    storage = ObjectStorage(settings)
    service = FilesService(settings.database_url, settings.db_schema, storage, settings)
    admin = FilesAdmin(service)

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        await service.start()
        await _ensure_bucket(storage, settings.s3_bucket)
        sweeper = None
        if settings.file_sweep_seconds > 0:
            sweeper = asyncio.create_task(every(settings.file_sweep_seconds, lambda: _sweep_once(service), "file sweep"))
        try:
            yield
        finally:
            if sweeper is not None:
                sweeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sweeper
            storage.close()
            await service.close()

    plugin = ServicePlugin(
        name="files",
        service_token=settings.service.service_token,
        readiness_checks={"database": service.ping, "bucket": storage.ping},
    )
    app = Litestar(
        route_handlers=[FilesController, FilesAdminController],
        dependencies={
            "files": Provide(lambda: service, sync_to_thread=False),
            "files_admin": Provide(lambda: admin, sync_to_thread=False),
        },
        plugins=[plugin],
        lifespan=[lifespan],
        debug=False,
    )
    app.state.settings = settings
    app.state.files = service
    return app
