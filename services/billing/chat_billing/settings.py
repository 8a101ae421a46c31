from __future__ import annotations

from dataclasses import dataclass

from chat_common.db import check_schema_name
from chat_common.settings import (
    ServiceSettings,
    database_url,
    env_bool,
    env_float,
    env_int,
    env_str,
)


@dataclass(frozen=True)
class BillingSettings:
    service: ServiceSettings
    database_url: str
    db_schema: str = "billing"
    # A turn's hold is a lease: the gateway renews it every ttl/3 while the AI call runs, so a dead
    # gateway's hold is back within ttl + sweep interval.
    reservation_ttl_seconds: int = 30
    # A float so tests can sweep several times a second; operators set whole seconds.
    reservation_sweep_seconds: float = 5.0
    db_pool_size: int = 20
    db_max_overflow: int = 0
    migrate_on_start: bool = True

    def __post_init__(self) -> None:
        check_schema_name(self.db_schema)
        if self.reservation_ttl_seconds <= 0:
            raise ValueError("RESERVATION_TTL_SECONDS must be positive")
        if self.reservation_sweep_seconds <= 0:
            raise ValueError("RESERVATION_SWEEP_SECONDS must be positive")
        if self.db_pool_size <= 0 or self.db_max_overflow < 0:
            raise ValueError("BILLING_DB_POOL_SIZE must be positive and BILLING_DB_MAX_OVERFLOW not negative")

    @classmethod
    def from_env(cls) -> "BillingSettings":
        return cls(
            service=ServiceSettings.from_env("billing", 8003),
            database_url=database_url(),
            db_schema=env_str("BILLING_DB_SCHEMA", "billing"),
            reservation_ttl_seconds=env_int("RESERVATION_TTL_SECONDS", 30),
            reservation_sweep_seconds=env_float("RESERVATION_SWEEP_SECONDS", 5.0),
            db_pool_size=env_int("BILLING_DB_POOL_SIZE", 20),
            db_max_overflow=env_int("BILLING_DB_MAX_OVERFLOW", 0),
            migrate_on_start=env_bool("MIGRATE_ON_START", True),
        )
