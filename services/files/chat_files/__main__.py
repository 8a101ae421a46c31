"""``python -m chat_files`` serves (migrating first unless MIGRATE_ON_START=false; the bucket
is made by the app as it starts); ``python -m chat_files migrate`` applies the migrations and
exits (chat_common.entry)."""
from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from chat_common.db import apply_migrations
from chat_common.entry import run_service
from chat_common.serve import serve
from chat_files.app import create_app
from chat_files.settings import FilesSettings


def migrate(settings: FilesSettings) -> list[str]:
    return asyncio.run(apply_migrations(settings.database_url, settings.db_schema, "chat_files"))


def serve_files(settings: FilesSettings) -> None:
    if settings.migrate_on_start:
        migrate(settings)
    serve(create_app(settings), settings.service)


def main(argv: Sequence[str] | None = None) -> int:
    return run_service("files", argv, load=FilesSettings.from_env, serve=serve_files, migrate=migrate)


if __name__ == "__main__":
    sys.exit(main())
