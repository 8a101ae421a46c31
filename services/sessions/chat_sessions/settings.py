from __future__ import annotations

from dataclasses import dataclass

from chat_common.db import check_schema_name
from chat_common.settings import ServiceSettings, database_url, env_bool, env_str


@dataclass(frozen=True)
class SessionsSettings:
    service: ServiceSettings
    database_url: str
    db_schema: str = "sessions"
    migrate_on_start: bool = True

    @classmethod
    def from_env(cls) -> "SessionsSettings":
        return cls(
            service=ServiceSettings.from_env("sessions", 8001),
            database_url=database_url(),
            # Validated here so a bad value fails at start-up, not on the first query.
            db_schema=check_schema_name(env_str("SESSIONS_DB_SCHEMA", "sessions")),
            migrate_on_start=env_bool("MIGRATE_ON_START", True),
        )
