"""An app on a freshly migrated database per test module, and helpers to drive it."""
from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import asyncpg
import httpx
import pytest
from litestar.testing import AsyncTestClient

from chat_common.db import apply_migrations, plain_dsn
from chat_common.settings import ServiceSettings
from chat_sessions.app import create_app
from chat_sessions.settings import SessionsSettings

SCHEMA = "sessions"


def make_settings(database_url: str, service_token: str, schema: str = SCHEMA) -> SessionsSettings:
    return SessionsSettings(
        service=ServiceSettings(name="sessions", host="127.0.0.1", port=0, service_token=service_token),
        database_url=database_url,
        db_schema=schema,
    )


@pytest.fixture(scope="module")
async def database_url(fresh_database: str) -> str:
    await apply_migrations(fresh_database, SCHEMA, "chat_sessions")
    return fresh_database


@pytest.fixture(scope="module")
async def client(database_url: str, service_token: str) -> AsyncIterator[AsyncTestClient]:
    app = create_app(make_settings(database_url, service_token))
    async with AsyncTestClient(app) as test_client:
        test_client.headers["X-Service-Token"] = service_token
        yield test_client


@pytest.fixture(scope="module")
async def concurrent_client(database_url: str, service_token: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client whose requests really overlap. AsyncTestClient hands each request to its portal
    thread and blocks until the reply, so `asyncio.gather` over it runs them one at a time and
    a race could never show; httpx's ASGITransport runs the app in the test's own loop."""
    app = create_app(make_settings(database_url, service_token))
    # Not `app.lifespan()`: its task group would be exited by another task at teardown. The only
    # lifespan work of this app is opening and closing its pool, done here.
    await app.state.sessions_service.start()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=cast(Any, app)),  # litestar types ASGI scopes as TypedDicts, httpx as MutableMappings
        base_url="http://sessions.test",
        headers={"X-Service-Token": service_token},
    ) as http:
        yield http
    await app.state.sessions_service.close()


def new_id() -> str:
    return str(uuid.uuid4())


async def create_session(client: AsyncTestClient | httpx.AsyncClient, user_id: str, **fields: Any) -> dict[str, Any]:
    body = {"user_id": user_id, "name": "a session", "model_name": "gpt-4", "prompt": "be brief", **fields}
    response = await client.post("/v1/sessions", json=body)
    assert response.status_code == 201, response.text
    return response.json()


async def append_turn(
    client: AsyncTestClient | httpx.AsyncClient,
    session_id: str,
    user_id: str,
    turn_id: str | None = None,
    entries: list[dict[str, str]] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    body = {
        "user_id": user_id,
        "turn_id": turn_id or new_id(),
        "entries": entries or [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        **fields,
    }
    response = await client.post(f"/v1/sessions/{session_id}/turns", json=body)
    assert response.status_code == 201, response.text
    return response.json()


async def fetch(database_url: str, sql: str, *args: Any, schema: str = SCHEMA) -> list[Any]:
    """Read the tables directly, to check what the API does not show (cascades, no writes)."""
    connection = await asyncpg.connect(plain_dsn(database_url), server_settings={"search_path": schema})
    try:
        return await connection.fetch(sql, *args)
    finally:
        await connection.close()
