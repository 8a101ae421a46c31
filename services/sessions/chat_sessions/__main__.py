"""``python -m chat_sessions`` serves (migrating first unless MIGRATE_ON_START=false);
``python -m chat_sessions migrate`` applies the migrations and exits (chat_common.entry)."""
from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from chat_common.db import apply_migrations
from chat_common.entry import run_service
from chat_common.serve import serve
from chat_sessions.app import create_app
from chat_sessions.settings import SessionsSettings


def migrate(settings: SessionsSettings) -> list[str]:
    return asyncio.run(apply_migrations(settings.database_url, settings.db_schema, "chat_sessions"))


def serve_sessions(settings: SessionsSettings) -> None:
    if settings.migrate_on_start:
        # Before uvicorn starts its loop: asyncio.run needs no running loop, and a replica
        # should not report ready on a schema it has not migrated.
        migrate(settings)
    serve(create_app(settings), settings.service)


def main(argv: Sequence[str] | None = None) -> int:
    return run_service("sessions", argv, load=SessionsSettings.from_env, serve=serve_sessions, migrate=migrate)


if __name__ == "__main__":
    sys.exit(main())
