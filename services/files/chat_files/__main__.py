from __future__ import annotations

import asyncio
import logging
import sys
import time

from chat_common.db import apply_migrations
from chat_common.logging import configure_logging
from chat_common.serve import serve
from chat_files.app import create_app
from chat_files.files.storage import ObjectStorage, StorageError
from chat_files.settings import FilesSettings

logger = logging.getLogger("chat_files")

BUCKET_WAIT_SECONDS = 30.0


def migrate(settings: FilesSettings) -> list[str]:
    return asyncio.run(apply_migrations(settings.database_url, settings.db_schema, "chat_files"))


def ensure_bucket(settings: FilesSettings) -> None:
    """Create the bucket, waiting a while for an object store that starts beside us."""

    async def run() -> None:
        storage = ObjectStorage(settings)
        deadline = time.monotonic() + BUCKET_WAIT_SECONDS
        try:
            while True:
                try:
                    await storage.ensure_bucket()
                    return
                except StorageError as exc:
                    if time.monotonic() > deadline:
                        # Serve anyway; readiness stays failed until the bucket is reachable.
                        logger.warning("bucket %s not reachable: %s", settings.s3_bucket, exc)
                        return
                    await asyncio.sleep(1.0)
        finally:
            storage.close()

    asyncio.run(run())


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    settings = FilesSettings.from_env()
    configure_logging(settings.service.name, settings.service.log_level)
    if args[:1] == ["migrate"]:
        migrate(settings)
        return
    if args:
        sys.exit(f"usage: python -m chat_files [migrate]  (unknown argument {args[0]!r})")
    if settings.migrate_on_start:
        migrate(settings)
    ensure_bucket(settings)
    serve(create_app(settings), settings.service)


if __name__ == "__main__":
    main()
