"""Billing test fixtures: the app in-process against a real PostgreSQL database of its own per
test module, migrated the way the service migrates itself."""
from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from chat_billing.app import create_app
from chat_billing.settings import BillingSettings
from chat_common.app import SERVICE_TOKEN_HEADER
from chat_common.db import apply_migrations
from chat_common.settings import ServiceSettings

SCHEMA = "billing"


def billing_settings(database_url: str, service_token: str, **overrides: Any) -> BillingSettings:
    values: dict[str, Any] = {
        "service": ServiceSettings(name="billing", host="127.0.0.1", port=0, service_token=service_token),
        "database_url": database_url,
        "db_schema": SCHEMA,
        "reservation_ttl_seconds": 300,
        # Tests that want the sweep start an app of their own with a short interval; here it
        # stays out of the way so POST /v1/reservations/expire is observable.
        "reservation_sweep_seconds": 3600,
    }
    values.update(overrides)
    return BillingSettings(**values)


@pytest.fixture(scope="module")
async def billing_database(fresh_database: str) -> str:
    await apply_migrations(fresh_database, SCHEMA, "chat_billing")
    return fresh_database


@pytest.fixture(scope="module")
async def billing(billing_database: str, service_token: str) -> AsyncIterator[AsyncTestClient]:
    app = create_app(billing_settings(billing_database, service_token))
    async with AsyncTestClient(app) as client:
        client.headers[SERVICE_TOKEN_HEADER] = service_token
        yield client


@pytest.fixture(autouse=True)
def no_error_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Whatever a test sends, the service must not log an error (a 500, a traceback)."""
    caplog.set_level(logging.INFO)
    yield
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [f"{r.name}: {r.getMessage()}" for r in errors]


async def create_user(
    client: AsyncTestClient, *, balance: str | int | None = "1", models: list[int] | None = None, **extra: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "username": f"user-{uuid.uuid4().hex[:8]}",
        "models": [4, 5, 8] if models is None else models,
    }
    body["balance"] = balance
    body.update(extra)
    response = await client.post("/v1/users", json=body)
    assert response.status_code == 201, response.text
    return response.json()


async def ledger_of(client: AsyncTestClient, user_id: str) -> list[dict[str, Any]]:
    """Every ledger row of a user, oldest first."""
    rows: list[dict[str, Any]] = []
    while True:
        response = await client.get(f"/v1/users/{user_id}/ledger", params={"limit": 500, "offset": len(rows)})
        assert response.status_code == 200, response.text
        page = response.json()
        rows.extend(page["items"])
        if len(rows) >= page["total"]:
            return list(reversed(rows))


async def balance_of(client: AsyncTestClient, user_id: str) -> dict[str, Any]:
    response = await client.get(f"/v1/users/{user_id}/balance")
    assert response.status_code == 200, response.text
    return response.json()


def assert_ledger_explains(rows: list[dict[str, Any]], balance_nanos: int) -> None:
    """Each row moves the balance by its amount, never below zero, ending at the balance."""
    running = 0
    for row in rows:
        running += row["amount_nanos"]
        assert row["balance_after_nanos"] == running, row
        assert running >= 0
    assert running == balance_nanos
