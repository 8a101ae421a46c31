"""asyncpg's errors answered like the rest of the services' (chat_common.errors handles the
SQLAlchemy ones): a PostgreSQL restart is a 503 the caller retries, after which the service
works again without a restart of its own; constraint and value errors are 409 and 400."""
from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest
from litestar.testing import AsyncTestClient

from chat_common.db import apply_migrations
from chat_common.errors import classify_unexpected
from chat_sessions.app import create_app
from devstack.servers import PostgresServer, free_port

from .conftest import append_turn, create_session, make_settings, new_id


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (asyncpg.exceptions.UniqueViolationError("dup"), 409),
        (asyncpg.exceptions.NumericValueOutOfRangeError("big"), 400),
        (asyncpg.exceptions.DeadlockDetectedError("deadlock"), 503),
        (asyncpg.exceptions.SerializationError("retry"), 503),
        (asyncpg.exceptions.AdminShutdownError("bye"), 503),
        (asyncpg.exceptions.ConnectionDoesNotExistError("gone"), 503),
        (asyncpg.exceptions.TooManyConnectionsError("full"), 503),
        (asyncpg.InterfaceError("connection is closed"), 503),
    ],
)
def test_classification(exc: Exception, status: int) -> None:
    known = classify_unexpected(exc)
    assert known is not None and known.status_code == status


def test_a_bug_stays_a_bug() -> None:
    assert classify_unexpected(asyncpg.exceptions.UndefinedTableError("no table")) is None


async def test_postgres_restart_is_a_503_then_works(private_dir: Path, service_token: str) -> None:
    postgres = PostgresServer("own-pg", free_port(), private_dir / "pg", durable=False).start()
    try:
        postgres.create_database("s")
        url = f"postgresql://postgres@127.0.0.1:{postgres.port}/s"
        await apply_migrations(url, "sessions", "chat_sessions")
        async with AsyncTestClient(create_app(make_settings(url, service_token))) as client:
            client.headers["X-Service-Token"] = service_token
            user = new_id()
            session_id = (await create_session(client, user))["session_id"]
            await append_turn(client, session_id, user, expected_entry_count=0)

            postgres.restart()
            statuses = []
            for _ in range(5):
                response = await client.get(f"/v1/sessions/{session_id}", params={"user_id": user})
                statuses.append(response.status_code)
                if response.status_code == 200:
                    break
                assert response.status_code == 503 and response.json()["error"]["code"] == "unavailable"
            assert statuses[-1] == 200, statuses
            result = await append_turn(client, session_id, user, expected_entry_count=2)
            assert result["entry_count"] == 4
            assert (await client.get("/ready")).json()["checks"] == {"database": "ok"}
    finally:
        postgres.stop()
