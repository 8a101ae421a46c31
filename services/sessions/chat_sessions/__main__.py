from __future__ import annotations

import asyncio
import sys

from chat_common.db import apply_migrations
from chat_common.logging import configure_logging
from chat_common.serve import serve
from chat_sessions.app import create_app
from chat_sessions.settings import SessionsSettings


def migrate(settings: SessionsSettings) -> list[str]:
    return asyncio.run(apply_migrations(settings.database_url, settings.db_schema, "chat_sessions"))


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args not in ([], ["migrate"]):
        sys.exit(f"usage: python -m chat_sessions [migrate]  (got {' '.join(args)!r})")
    settings = SessionsSettings.from_env()
    configure_logging(settings.service.name, settings.service.log_level)
    if args == ["migrate"]:
        migrate(settings)
        return
    if settings.migrate_on_start:
        # Before uvicorn starts its loop: asyncio.run needs no running loop, and a replica
        # should not report ready on a schema it has not migrated.
        migrate(settings)
    serve(create_app(settings), settings.service)


if __name__ == "__main__":
    main()
