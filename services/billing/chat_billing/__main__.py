"""``python -m chat_billing`` serves (migrating first unless MIGRATE_ON_START=false);
``python -m chat_billing migrate`` applies the migrations and exits."""
from __future__ import annotations

import asyncio
import logging
import sys

from chat_billing.app import create_app
from chat_billing.settings import BillingSettings
from chat_common.db import apply_migrations
from chat_common.logging import configure_logging
from chat_common.serve import serve
from chat_common.settings import env_bool

logger = logging.getLogger("chat_billing")


def migrate(settings: BillingSettings) -> list[str]:
    return asyncio.run(apply_migrations(settings.database_url, settings.db_schema, "chat_billing"))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args not in ([], ["migrate"]):
        print("usage: python -m chat_billing [migrate]", file=sys.stderr)
        return 2
    settings = BillingSettings.from_env()
    configure_logging(settings.service.name, settings.service.log_level)
    if args == ["migrate"]:
        applied = migrate(settings)
        logger.info("migrations up to date", extra={"applied_now": applied})
        return 0
    if env_bool("MIGRATE_ON_START", True):
        migrate(settings)
    serve(create_app(settings), settings.service)
    return 0


if __name__ == "__main__":
    sys.exit(main())
