"""The retention endpoints on a real PostgreSQL: an expired session is removed exactly once
however many sweepers race, with its entries, while its outbox rows stay; a fresh one is kept;
removals are listed until acknowledged."""
from __future__ import annotations

import asyncio

import httpx
from litestar.testing import AsyncTestClient

from .conftest import append_turn, create_session, fetch, new_id


async def age(database_url: str, session_ids: list[str], days: float) -> None:
    await fetch(
        database_url,
        "UPDATE sessions SET updated_at = now() - make_interval(secs => $2) WHERE id = ANY($1::uuid[]) RETURNING id",
        session_ids, days * 86400,
    )


async def test_expire_once_keep_fresh_and_outbox(
    client: AsyncTestClient, concurrent_client: httpx.AsyncClient, database_url: str
) -> None:
    user = new_id()
    old = [(await create_session(client, user))["session_id"] for _ in range(30)]
    fresh = (await create_session(client, user))["session_id"]
    for sid in (*old[:2], fresh):
        await append_turn(client, sid, user, charge={"cost_nanos": 5})
    await age(database_url, old, 40)
    cutoff = 30 * 86400.0

    async def expire() -> list[str]:
        reply = await concurrent_client.post("/v1/retention/expire", json={"older_than_seconds": cutoff, "limit": 7})
        assert reply.status_code == 200, reply.text
        return [item["session_id"] for item in reply.json()["items"]]

    removed: list[str] = []
    while True:
        rounds = await asyncio.gather(*(expire() for _ in range(4)))
        got = [sid for batch in rounds for sid in batch]
        removed += got
        if not got:
            break
    assert sorted(removed) == sorted(old)  # each exactly once
    assert len(set(removed)) == len(removed)
    left = await fetch(database_url, "SELECT id::text FROM sessions WHERE user_id = $1::uuid", user)
    assert [row[0] for row in left] == [fresh]
    assert await fetch(database_url, "SELECT 1 FROM entries WHERE session_id = ANY($1::uuid[])", old) == []
    # money owed stays owed
    owed = await fetch(database_url, "SELECT session_id::text FROM outbox WHERE session_id = ANY($1::uuid[])", old)
    assert sorted(row[0] for row in owed) == sorted(old[:2])

    # listed (for the files) until acknowledged
    page = (await client.get("/v1/retention/expired", params={"older_than_seconds": 0, "limit": 500})).json()["items"]
    mine = {item["session_id"] for item in page if item["user_id"] == user}
    assert mine == set(old)
    acked = await client.post("/v1/retention/ack", json={"session_ids": old})
    assert acked.json() == {"acked": len(old)}
    page = (await client.get("/v1/retention/expired", params={"older_than_seconds": 0, "limit": 500})).json()["items"]
    assert not [item for item in page if item["user_id"] == user]
    # the fresh session works on
    await append_turn(client, fresh, user)


async def test_bad_requests(client: AsyncTestClient) -> None:
    for body in ({}, {"older_than_seconds": -1}, {"older_than_seconds": 1, "limit": 0}, {"older_than_seconds": 1, "x": 1}):
        reply = await client.post("/v1/retention/expire", json=body)
        assert reply.status_code == 400, (body, reply.text)
    reply = await client.post("/v1/retention/ack", json={"session_ids": ["nope"]})
    assert reply.status_code == 400
