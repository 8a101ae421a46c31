"""``python -m chat_billing`` serves (migrating first unless MIGRATE_ON_START=false);
``python -m chat_billing migrate`` applies the migrations and exits (chat_common.entry)."""
from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from chat_billing.app import create_app
from chat_billing.settings import BillingSettings
from chat_common.db import apply_migrations
from chat_common.entry import run_service
from chat_common.serve import serve


def migrate(settings: BillingSettings) -> list[str]:
    return asyncio.run(apply_migrations(settings.database_url, settings.db_schema, "chat_billing"))


def serve_billing(settings: BillingSettings) -> None:
    if settings.migrate_on_start:
        migrate(settings)
    serve(create_app(settings), settings.service)


def main(argv: Sequence[str] | None = None) -> int:
    return run_service("billing", argv, load=BillingSettings.from_env, serve=serve_billing, migrate=migrate)


if __name__ == "__main__":
    sys.exit(main())
