"""Round trips to PostgreSQL per call, counted on the wire: the app talks to the database
through a small TCP proxy that parses the frontend protocol and counts the messages that make
the server answer (Sync ends an extended-protocol exchange, Query is a simple one). Counted
after a warm-up (asyncpg prepares a statement on its first use on a connection), so the
figures are the steady state; a reset query on pool release would show as one more."""
from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from chat_sessions.app import create_app

from .conftest import create_session, make_settings, new_id

_UNTYPED = {80877103, 80877104}  # SSLRequest, GSSENCRequest: another untyped message follows


class CountingProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.round_trips = 0
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def backend() -> None:
            try:
                while data := await server_r.read(65536):
                    client_w.write(data)
                    await client_w.drain()
            finally:
                client_w.close()

        task = asyncio.create_task(backend())
        try:
            # untyped start-up messages: [int32 length][int32 code]...
            while True:
                head = await client_r.readexactly(8)
                length, code = struct.unpack("!ii", head)
                server_w.write(head + await client_r.readexactly(length - 8))
                await server_w.drain()
                if code not in _UNTYPED:
                    break
            while True:
                head = await client_r.readexactly(5)
                kind, length = head[:1], struct.unpack("!i", head[1:])[0]
                server_w.write(head + await client_r.readexactly(length - 4))
                await server_w.drain()
                if kind in (b"S", b"Q"):
                    self.round_trips += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            server_w.close()
            task.cancel()


@pytest.fixture(scope="module")
async def proxied(database_url: str, service_token: str) -> AsyncIterator[tuple[httpx.AsyncClient, CountingProxy]]:
    parts = urlsplit(database_url)
    proxy = CountingProxy(parts.port or 5432)
    port = await proxy.start()
    url = urlunsplit((parts.scheme, f"{parts.username}@127.0.0.1:{port}", parts.path, "", ""))
    # sslmode=disable keeps the start-up exchange plain for the parser above
    app = create_app(make_settings(url + "?sslmode=disable", service_token))
    await app.state.sessions_service.start()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=cast(Any, app)), base_url="http://sessions.test",  # litestar types ASGI scopes as TypedDicts, httpx as MutableMappings
        headers={"X-Service-Token": service_token},
    ) as http:
        yield http, proxy
    await app.state.sessions_service.close()
    await proxy.close()


async def test_round_trips_per_call(proxied: tuple[httpx.AsyncClient, CountingProxy]) -> None:
    http, proxy = proxied
    user = new_id()
    session_id = (await create_session(http, user))["session_id"]
    count = 0

    async def append(charge: bool) -> httpx.Response:
        nonlocal count
        body: dict = {"user_id": user, "turn_id": new_id(), "expected_entry_count": count,
                      "entries": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
        if charge:
            body["charge"] = {"cost_nanos": 5, "reservation_id": new_id(), "model_name": "m"}
        reply = await http.post(f"/v1/sessions/{session_id}/turns", json=body)
        assert reply.status_code == 201, reply.text
        count = reply.json()["entry_count"]
        return reply

    calls = {
        "append with charge": lambda: append(True),
        "append": lambda: append(False),
        "stale append": lambda: http.post(f"/v1/sessions/{session_id}/turns", json={
            "user_id": user, "turn_id": new_id(), "expected_entry_count": 0,
            "entries": [{"role": "user", "content": "q"}]}),
        "context": lambda: http.get(f"/v1/sessions/{session_id}/context", params={"user_id": user, "window": 10}),
        "entries": lambda: http.get(f"/v1/sessions/{session_id}/entries", params={"user_id": user}),
        "get": lambda: http.get(f"/v1/sessions/{session_id}", params={"user_id": user}),
        "list": lambda: http.get("/v1/sessions", params={"user_id": user}),
        "summary with charge": lambda: http.put(f"/v1/sessions/{session_id}/summary", json={
            "user_id": user, "summary": "s", "summarized_upto": count, "turn_id": new_id(),
            "charge": {"cost_nanos": 3}}),
        "turn lookup": lambda: http.get(f"/v1/sessions/{session_id}/turns/{new_id()}", params={"user_id": user}),
        "outbox page": lambda: http.get("/v1/outbox"),
        "outbox ack": lambda: http.post("/v1/outbox/ack", json={"outbox_ids": [1, 2]}),
        "create": lambda: http.post("/v1/sessions", json={"user_id": user, "name": "n", "model_name": "m"}),
    }
    for call in calls.values():  # warm-up: each statement prepared on the (one) pooled connection
        await call()
    measured = {}
    for name, call in calls.items():
        before = proxy.round_trips
        reply = await call()
        assert reply.status_code < 500, (name, reply.text)
        measured[name] = proxy.round_trips - before
    assert measured == {name: 1 for name in calls}, measured


async def test_the_counter_sees_asyncpgs_reset_query(database_url: str) -> None:
    """The measurement itself: a pool with asyncpg's default release reset costs one more
    round trip per call than the service's pool, which skips it."""
    import asyncpg

    from chat_common.db import _no_reset

    parts = urlsplit(database_url)
    proxy = CountingProxy(parts.port or 5432)
    port = await proxy.start()
    dsn = f"postgresql://{parts.username}@127.0.0.1:{port}{parts.path}?sslmode=disable"
    try:
        for reset, expected in ((None, 2), (_no_reset, 1)):
            pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1, reset=reset)
            try:
                await pool.fetchval("SELECT 1")
                before = proxy.round_trips
                await pool.fetchval("SELECT 1")
                assert proxy.round_trips - before == expected, reset
            finally:
                await pool.close()
    finally:
        await proxy.close()
