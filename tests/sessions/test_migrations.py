"""Migrations apply once, re-applying is a no-op, and the schema name is configurable (the app
then works inside that schema only)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from litestar.testing import AsyncTestClient

import chat_sessions
from chat_common.db import apply_migrations, plain_dsn
from chat_sessions.app import create_app

from .conftest import append_turn, create_session, fetch, make_settings, new_id

TABLES = {"schema_migrations", "sessions", "entries", "turns", "outbox", "expired_sessions", "erasures"}
# Every file of the package's migrations folder, in name order (the first ones by name, so a
# lost file fails too).
VERSIONS = sorted(path.stem for path in (Path(chat_sessions.__file__).parent / "migrations").glob("*.sql"))
assert VERSIONS[:9] == [
    "0001_init", "0002_outbox_and_turn_functions", "0003_search", "0004_retention", "0005_search_plan",
    "0007_outbox_receipt", "0008_erase", "0009_search_words", "0010_store_summary_receipt",
]


async def _tables(database_url: str, schema: str) -> set[str]:
    rows = await fetch(
        database_url, "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema
    )
    return {row["table_name"] for row in rows}


async def test_applying_twice_is_a_no_op(fresh_database: str) -> None:
    assert await apply_migrations(fresh_database, "sessions", "chat_sessions") == VERSIONS
    assert await _tables(fresh_database, "sessions") == TABLES
    assert await apply_migrations(fresh_database, "sessions", "chat_sessions") == []
    versions = await fetch(fresh_database, "SELECT version FROM schema_migrations")
    assert [row["version"] for row in versions] == VERSIONS


async def test_migrate_command_with_own_schema(fresh_database: str, service_token: str) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": plain_dsn(fresh_database),  # the plain form operators write
        "SESSIONS_DB_SCHEMA": "chat_sessions_alt",
        "SERVICE_TOKEN": service_token,
    }
    done = subprocess.run(
        [sys.executable, "-m", "chat_sessions", "migrate"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert await _tables(fresh_database, "chat_sessions_alt") == TABLES
    assert await apply_migrations(fresh_database, "chat_sessions_alt", "chat_sessions") == []
    versions = await fetch(fresh_database, "SELECT version FROM schema_migrations", schema="chat_sessions_alt")
    assert [row["version"] for row in versions] == VERSIONS

    app = create_app(make_settings(fresh_database, service_token, schema="chat_sessions_alt"))
    async with AsyncTestClient(app) as client:
        client.headers["X-Service-Token"] = service_token
        user = new_id()
        session_id = (await create_session(client, user))["session_id"]
        await append_turn(client, session_id, user)
    rows = await fetch(fresh_database, "SELECT entry_count FROM sessions", schema="chat_sessions_alt")
    assert [row["entry_count"] for row in rows] == [2]

