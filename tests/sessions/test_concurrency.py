"""Concurrent writers against one session: appends serialize in the database, replays collapse
into the first result, and summaries only move forward."""
from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest

from .conftest import append_turn, create_session, fetch, new_id

N = 20


@pytest.fixture(scope="module")
def client(concurrent_client: httpx.AsyncClient) -> httpx.AsyncClient:
    return concurrent_client


async def test_concurrent_replays_of_one_turn_apply_it_once(client: httpx.AsyncClient, database_url: str) -> None:
    user = new_id()
    session_id = (await create_session(client, user))["session_id"]
    await append_turn(client, session_id, user)  # so the turn does not start at seq 0
    turn = new_id()
    entries = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "file", "content": "f.pdf"}]

    results = await asyncio.gather(*(append_turn(client, session_id, user, turn, entries) for _ in range(N)))

    assert sum(result["created"] for result in results) == 1
    assert {(r["first_seq"], r["count"], r["entry_count"]) for r in results} == {(2, 3, 5)}
    rows = await fetch(database_url, "SELECT seq, role, turn_id FROM entries WHERE session_id = $1 ORDER BY seq",
                       uuid.UUID(session_id))
    assert [row["seq"] for row in rows] == [0, 1, 2, 3, 4]
    assert [str(row["turn_id"]) for row in rows[2:]] == [turn] * 3
    turns = await fetch(database_url, "SELECT count(*) AS n FROM turns WHERE session_id = $1", uuid.UUID(session_id))
    assert turns[0]["n"] == 2
    session = (await client.get(f"/v1/sessions/{session_id}", params={"user_id": user})).json()
    assert session["entry_count"] == 5


async def test_concurrent_distinct_turns_get_contiguous_seqs(client: httpx.AsyncClient) -> None:
    user = new_id()
    session_id = (await create_session(client, user))["session_id"]
    turns = [new_id() for _ in range(N)]

    results = await asyncio.gather(*(
        append_turn(client, session_id, user, turn, [
            {"role": "user", "content": f"q-{turn}"}, {"role": "assistant", "content": f"a-{turn}"}
        ])
        for turn in turns
    ))

    assert all(result["created"] for result in results)
    assert sorted(result["first_seq"] for result in results) == list(range(0, 2 * N, 2))
    assert sorted(result["entry_count"] for result in results) == list(range(2, 2 * N + 1, 2))

    items = (await client.get(f"/v1/sessions/{session_id}/entries", params={"user_id": user})).json()["items"]
    assert [item["seq"] for item in items] == list(range(2 * N))  # no gaps, no duplicates
    # Each turn's entries are adjacent and in the order sent, at the seq its reply named.
    by_turn = {result["turn_id"]: result["first_seq"] for result in results}
    for turn, first in by_turn.items():
        assert (items[first]["turn_id"], items[first]["role"], items[first]["content"]) == (turn, "user", f"q-{turn}")
        assert (items[first + 1]["turn_id"], items[first + 1]["role"]) == (turn, "assistant")
    session = (await client.get(f"/v1/sessions/{session_id}", params={"user_id": user})).json()
    assert session["entry_count"] == 2 * N


async def test_concurrent_summaries_keep_the_newest(client: httpx.AsyncClient) -> None:
    user = new_id()
    session_id = (await create_session(client, user))["session_id"]
    uptos = list(range(1, N + 1))
    uptos.reverse()  # the newest is sent first, so the older ones all arrive "late"

    async def put(upto: int) -> int:
        response = await client.put(f"/v1/sessions/{session_id}/summary", json={
            "user_id": user, "summary": f"upto {upto}", "summarized_upto": upto, "turn_id": new_id()
        })
        return response.status_code

    assert set(await asyncio.gather(*(put(upto) for upto in uptos))) == {200}
    session = (await client.get(f"/v1/sessions/{session_id}", params={"user_id": user})).json()
    assert (session["summary"], session["summarized_upto"]) == (f"upto {N}", N)


async def test_concurrent_creates_with_one_key_make_one_session(client: httpx.AsyncClient) -> None:
    user = new_id()
    created = await asyncio.gather(*(
        create_session(client, user, idempotency_key="create:same-turn") for _ in range(N)
    ))
    assert len({session["session_id"] for session in created}) == 1
    listing = (await client.get("/v1/sessions", params={"user_id": user})).json()
    assert listing["total"] == 1


async def test_concurrent_creates_with_one_session_id_make_one_session(client: httpx.AsyncClient) -> None:
    user, session_id = new_id(), new_id()
    created = await asyncio.gather(*(create_session(client, user, session_id=session_id) for _ in range(N)))
    assert {session["session_id"] for session in created} == {session_id}
    listing = (await client.get("/v1/sessions", params={"user_id": user})).json()
    assert listing["total"] == 1


async def _fenced(client: httpx.AsyncClient, session_id: str, user: str, turn: str, expected: int,
                  charge: int | None = None) -> httpx.Response:
    body: dict = {"user_id": user, "turn_id": turn, "expected_entry_count": expected,
                  "entries": [{"role": "user", "content": f"q-{turn}"}, {"role": "assistant", "content": f"a-{turn}"}]}
    if charge is not None:
        body["charge"] = {"cost_nanos": charge}
    return await client.post(f"/v1/sessions/{session_id}/turns", json=body)


async def test_concurrent_fenced_appends_store_exactly_one(client: httpx.AsyncClient, database_url: str) -> None:
    """N turns that all saw the same count (each believed it held the lock): one is stored,
    the others are refused as stale and leave nothing behind, not even an outbox row."""
    user = new_id()
    session_id = (await create_session(client, user))["session_id"]
    await append_turn(client, session_id, user)
    turns = [new_id() for _ in range(N)]

    replies = await asyncio.gather(*(_fenced(client, session_id, user, turn, 2, charge=10) for turn in turns))

    statuses = sorted(reply.status_code for reply in replies)
    assert statuses == [201] + [409] * (N - 1)
    assert {reply.json()["error"]["code"] for reply in replies if reply.status_code == 409} == {"stale_turn"}
    winner = next(reply.json() for reply in replies if reply.status_code == 201)
    assert (winner["first_seq"], winner["entry_count"], winner["created"]) == (2, 4, True)
    rows = await fetch(database_url, "SELECT seq, turn_id FROM entries WHERE session_id = $1 ORDER BY seq",
                       uuid.UUID(session_id))
    assert [row["seq"] for row in rows] == [0, 1, 2, 3]
    assert {str(row["turn_id"]) for row in rows[2:]} == {winner["turn_id"]}
    outbox = await fetch(database_url, "SELECT key FROM outbox WHERE session_id = $1", uuid.UUID(session_id))
    assert [row["key"] for row in outbox] == [f"turn:{winner['turn_id']}"]


async def test_concurrent_fenced_writers_retrying_keep_order_and_replays(client: httpx.AsyncClient) -> None:
    """Writers that re-read the count after a refusal all get stored, each exactly once, with
    contiguous seqs; a replay of a stored turn racing them is still answered with its result."""
    user = new_id()
    session_id = (await create_session(client, user))["session_id"]
    turns = [new_id() for _ in range(8)]
    refusals = 0

    async def writer(turn: str) -> dict:
        nonlocal refusals
        while True:
            count = (await client.get(f"/v1/sessions/{session_id}", params={"user_id": user})).json()["entry_count"]
            reply = await _fenced(client, session_id, user, turn, count)
            if reply.status_code == 201:
                return reply.json()
            assert reply.status_code == 409 and reply.json()["error"]["code"] == "stale_turn", reply.text
            refusals += 1

    results = await asyncio.gather(*(writer(turn) for turn in turns))
    assert all(result["created"] for result in results)
    assert sorted(result["first_seq"] for result in results) == list(range(0, 16, 2))

    # Replays of every stored turn, with a count now long stale, racing one more fenced append.
    replays = await asyncio.gather(
        *(_fenced(client, session_id, user, result["turn_id"], 0) for result in results),
        _fenced(client, session_id, user, new_id(), 16),
    )
    assert [reply.status_code for reply in replays] == [201] * 9
    assert [reply.json() for reply in replays[:-1]] == [{**result, "created": False} for result in results]
    assert replays[-1].json()["first_seq"] == 16
    items = (await client.get(f"/v1/sessions/{session_id}/entries", params={"user_id": user})).json()["items"]
    assert [item["seq"] for item in items] == list(range(18))
