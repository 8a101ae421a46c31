"""The fenced append, the charge outbox written in the same transaction as the turn or the
summary it is owed for, the outbox's paging and acks, and the turn lookup. Replies are decoded
with the shared contract structs, as the gateway decodes them."""
from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import httpx
import msgspec
from litestar.testing import AsyncTestClient

from chat_common import contracts
from chat_common.errors import StaleTurnError, error_class_for

from .conftest import append_turn, create_session, fetch, new_id

TWO = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


async def _post_turn(client: AsyncTestClient[Any], session_id: str, body: dict[str, Any]) -> httpx.Response:
    return await client.post(f"/v1/sessions/{session_id}/turns", json={"entries": TWO, **body})


async def _outbox_rows(database_url: str, **where: Any) -> list[dict[str, Any]]:
    (column, value), = where.items()
    rows = await fetch(database_url, f"SELECT * FROM outbox WHERE {column} = $1 ORDER BY id", value)
    return [dict(row) for row in rows]


async def _drain(client: AsyncTestClient) -> None:
    while items := (await client.get("/v1/outbox", params={"limit": 500})).json()["items"]:
        await client.post("/v1/outbox/ack", json={"outbox_ids": [item["outbox_id"] for item in items]})


async def test_stale_append_is_refused_and_writes_nothing(client: AsyncTestClient, database_url: str) -> None:
    user = new_id()
    session_id = (await create_session(client, user))["session_id"]
    first = await append_turn(client, session_id, user, expected_entry_count=0)
    assert (first["first_seq"], first["entry_count"], first["created"]) == (0, 2, True)
    before = await fetch(database_url, "SELECT seq FROM entries WHERE session_id = $1", uuid.UUID(session_id))

    late = new_id()
    response = await _post_turn(client, session_id, {
        "user_id": user, "turn_id": late, "expected_entry_count": 0, "prompt": "changed",
        "charge": {"cost_nanos": 5, "reservation_id": new_id()},
    })
    assert response.status_code == 409, response.text
    error = response.json()["error"]
    assert error["code"] == "stale_turn"
    assert error["details"]["entry_count"] == 2
    assert error_class_for(error["code"], response.status_code) is StaleTurnError

    sid = uuid.UUID(session_id)
    assert await fetch(database_url, "SELECT seq FROM entries WHERE session_id = $1", sid) == before
    assert await fetch(database_url, "SELECT 1 FROM turns WHERE turn_id = $1", uuid.UUID(late)) == []
    assert await _outbox_rows(database_url, turn_id=uuid.UUID(late)) == []
    session = (await client.get(f"/v1/sessions/{session_id}", params={"user_id": user})).json()
    assert (session["entry_count"], session["prompt"]) == (2, "be brief")

    # A count above the stored one is stale too; the right one goes through.
    ahead = await _post_turn(client, session_id, {"user_id": user, "turn_id": new_id(), "expected_entry_count": 3})
    assert ahead.status_code == 409
    ok = await append_turn(client, session_id, user, late, expected_entry_count=2)
    assert (ok["first_seq"], ok["entry_count"], ok["created"]) == (2, 4, True)


async def test_replay_of_a_stored_turn_is_answered_whatever_the_count(client: AsyncTestClient) -> None:
    user = new_id()
    session_id = (await create_session(client, user))["session_id"]
    turn_a, turn_b = new_id(), new_id()
    a = await append_turn(client, session_id, user, turn_a, expected_entry_count=0)
    await append_turn(client, session_id, user, turn_b, expected_entry_count=2)

    for expected in (0, 2, 4, None):
        fields: dict[str, Any] = {} if expected is None else {"expected_entry_count": expected}
        replay = await append_turn(client, session_id, user, turn_a, **fields)
        assert replay == {**a, "created": False}
    decoded = msgspec.json.decode(
        (await _post_turn(client, session_id, {"user_id": user, "turn_id": turn_a, "expected_entry_count": 0})).content,
        type=contracts.TurnResult,
    )
    assert (decoded.first_seq, decoded.count, decoded.entry_count, decoded.created) == (0, 2, 2, False)


async def test_append_writes_its_charge_to_the_outbox_once(client: AsyncTestClient, database_url: str) -> None:
    user = new_id()
    session_id = (await create_session(client, user))["session_id"]
    turn, reservation = new_id(), new_id()
    charge = {"cost_nanos": 123_456, "reservation_id": reservation, "model_name": "gpt-4"}
    await append_turn(client, session_id, user, turn, expected_entry_count=0, charge=charge)
    await append_turn(client, session_id, user, turn, expected_entry_count=0, charge={"cost_nanos": 999})  # replay

    rows = await _outbox_rows(database_url, session_id=uuid.UUID(session_id))
    assert len(rows) == 1
    row = rows[0]
    assert (row["key"], row["kind"], str(row["user_id"]), str(row["turn_id"])) == (f"turn:{turn}", "turn", user, turn)
    assert (row["cost_nanos"], row["reservation_id"], row["model_name"]) == (123_456, reservation, "gpt-4")

    # No charge, no row; a charge of 0 (a free turn) is still recorded, so the hold is settled.
    await append_turn(client, session_id, user)
    free = new_id()
    await append_turn(client, session_id, user, free, charge={"cost_nanos": 0})
    rows = await _outbox_rows(database_url, session_id=uuid.UUID(session_id))
    assert [(r["key"], r["cost_nanos"], r["reservation_id"]) for r in rows] == [
        (f"turn:{turn}", 123_456, reservation), (f"turn:{free}", 0, None)
    ]


async def test_summary_writes_its_charge_only_when_stored(client: AsyncTestClient, database_url: str) -> None:
    user = new_id()
    session_id = (await create_session(client, user))["session_id"]
    for _ in range(4):
        await append_turn(client, session_id, user)
    url = f"/v1/sessions/{session_id}/summary"
    turn = new_id()

    stored = await client.put(url, json={
        "user_id": user, "summary": "S6", "summarized_upto": 6, "turn_id": turn,
        "charge": {"cost_nanos": 700, "reservation_id": "r-1", "model_name": "gpt-4"},
    })
    assert stored.status_code == 200 and stored.json()["summarized_upto"] == 6
    session = msgspec.json.decode(stored.content, type=contracts.Session)
    assert (session.summary, session.summarized_upto, session.entry_count) == ("S6", 6, 8)
    # A replay of that turn, an older fold and a fold without a charge: none adds a row.
    replay = await client.put(url, json={
        "user_id": user, "summary": "S6", "summarized_upto": 6, "turn_id": turn, "charge": {"cost_nanos": 700}
    })
    older = await client.put(url, json={
        "user_id": user, "summary": "S2", "summarized_upto": 2, "turn_id": new_id(), "charge": {"cost_nanos": 300}
    })
    assert replay.json() == stored.json() and older.json() == stored.json()
    free = await client.put(url, json={"user_id": user, "summary": "S8", "summarized_upto": 8, "turn_id": new_id()})
    assert free.json()["summarized_upto"] == 8

    rows = await _outbox_rows(database_url, session_id=uuid.UUID(session_id))
    assert [(r["key"], r["kind"], str(r["turn_id"]), r["cost_nanos"], r["reservation_id"], r["model_name"])
            for r in rows] == [(f"summary:{session_id}:6", "summary", turn, 700, "r-1", "gpt-4")]


async def test_outbox_rows_survive_the_sessions_deletion(client: AsyncTestClient, database_url: str) -> None:
    user = new_id()
    session_id = (await create_session(client, user))["session_id"]
    turn = new_id()
    await append_turn(client, session_id, user, turn, charge={"cost_nanos": 42})
    await client.put(f"/v1/sessions/{session_id}/summary", json={
        "user_id": user, "summary": "S", "summarized_upto": 2, "turn_id": turn, "charge": {"cost_nanos": 7}
    })
    assert (await client.delete(f"/v1/sessions/{session_id}", params={"user_id": user})).status_code == 204

    rows = await _outbox_rows(database_url, session_id=uuid.UUID(session_id))
    assert [(r["key"], r["cost_nanos"]) for r in rows] == [(f"turn:{turn}", 42), (f"summary:{session_id}:2", 7)]
    page = (await client.get("/v1/outbox", params={"limit": 500})).json()["items"]
    assert {f"turn:{turn}", f"summary:{session_id}:2"} <= {item["charge"]["key"] for item in page}


async def test_outbox_pages_oldest_first_and_acks(client: AsyncTestClient, database_url: str) -> None:
    await _drain(client)
    user = new_id()
    session_id = (await create_session(client, user))["session_id"]
    turns = [new_id() for _ in range(5)]
    for n, turn in enumerate(turns):
        await append_turn(client, session_id, user, turn, charge={"cost_nanos": n, "reservation_id": f"r{n}"})

    response = await client.get("/v1/outbox", params={"older_than_seconds": 0})
    assert response.status_code == 200
    page = msgspec.json.decode(response.content, type=contracts.OutboxPage)
    assert [item.charge.key for item in page.items] == [f"turn:{turn}" for turn in turns]
    first = page.items[0].charge
    assert (first.kind, first.user_id, first.session_id, first.turn_id, first.cost_nanos, first.reservation_id,
            first.model_name) == ("turn", user, session_id, turns[0], 0, "r0", None)

    # Only rows at least S seconds old.
    assert (await client.get("/v1/outbox", params={"older_than_seconds": 3600})).json() == {"items": []}
    await fetch(database_url, "UPDATE outbox SET created_at = now() - interval '10 minutes' WHERE key = $1",
                f"turn:{turns[3]}")
    old = (await client.get("/v1/outbox", params={"older_than_seconds": 300})).json()["items"]
    assert [item["charge"]["key"] for item in old] == [f"turn:{turns[3]}"]

    # limit, and the oldest (now turns[3]) first
    two = (await client.get("/v1/outbox", params={"limit": 2})).json()["items"]
    assert [item["charge"]["key"] for item in two] == [f"turn:{turns[3]}", f"turn:{turns[0]}"]

    ids = [item.outbox_id for item in page.items]
    acked = await client.post("/v1/outbox/ack", json={"outbox_ids": ids[:2] + [10**12]})
    assert acked.status_code == 200 and acked.json() == {"acked": 2}
    assert msgspec.json.decode(acked.content, type=contracts.OutboxAcked).acked == 2
    again = await client.post("/v1/outbox/ack", json=msgspec.to_builtins(contracts.OutboxAck(outbox_ids=ids[:2])))
    assert again.json() == {"acked": 0}
    assert (await client.post("/v1/outbox/ack", json={"outbox_ids": []})).json() == {"acked": 0}
    left = (await client.get("/v1/outbox")).json()["items"]
    assert sorted(item["outbox_id"] for item in left) == sorted(ids[2:])


async def test_outbox_bad_input_is_a_400(client: AsyncTestClient) -> None:
    for params in ({"limit": 0}, {"limit": "x"}, {"older_than_seconds": -1}):
        assert (await client.get("/v1/outbox", params=params)).status_code == 400, params
    assert (await client.get("/v1/outbox", params={"limit": 10_000})).status_code == 200  # clamped to 500
    for body in ({"outbox_ids": ["a"]}, {"outbox_ids": [0]}, {}, {"outbox_ids": list(range(1, 1002))}):
        assert (await client.post("/v1/outbox/ack", json=body)).status_code == 400, body


async def test_bad_fence_or_charge_is_a_400_and_writes_nothing(client: AsyncTestClient, database_url: str) -> None:
    user = new_id()
    session_id = (await create_session(client, user))["session_id"]
    bodies: list[dict[str, Any]] = [
        {"expected_entry_count": -1}, {"expected_entry_count": "x"}, {"expected_entry_count": 2**31},
        {"charge": {"cost_nanos": -1}}, {"charge": {}}, {"charge": {"cost_nanos": 2**63}},
        {"charge": {"cost_nanos": 1, "model_name": ""}},
    ]
    for extra in bodies:
        response = await _post_turn(client, session_id, {"user_id": user, "turn_id": new_id(), **extra})
        assert response.status_code == 400, (extra, response.text)
    summary = await client.put(f"/v1/sessions/{session_id}/summary", json={
        "user_id": user, "summary": "s", "summarized_upto": 0, "turn_id": new_id(), "charge": {"cost_nanos": -5}
    })
    assert summary.status_code == 400
    assert await fetch(database_url, "SELECT 1 FROM entries WHERE session_id = $1", uuid.UUID(session_id)) == []
    assert await _outbox_rows(database_url, session_id=uuid.UUID(session_id)) == []


async def test_turn_lookup(client: AsyncTestClient) -> None:
    user = new_id()
    session_id = (await create_session(client, user))["session_id"]
    await append_turn(client, session_id, user)
    turn = new_id()
    stored = await append_turn(client, session_id, user, turn, entries=TWO + [{"role": "file", "content": "f.png"}])
    await append_turn(client, session_id, user)

    response = await client.get(f"/v1/sessions/{session_id}/turns/{turn}", params={"user_id": user})
    assert response.status_code == 200
    assert response.json() == {**stored, "created": False}
    decoded = msgspec.json.decode(response.content, type=contracts.TurnResult)
    assert (decoded.first_seq, decoded.count, decoded.entry_count) == (2, 3, 5)

    missing = await client.get(f"/v1/sessions/{session_id}/turns/{new_id()}", params={"user_id": user})
    foreign = await client.get(f"/v1/sessions/{session_id}/turns/{turn}", params={"user_id": new_id()})
    no_session = await client.get(f"/v1/sessions/{new_id()}/turns/{turn}", params={"user_id": user})
    for reply in (missing, foreign, no_session):
        assert reply.status_code == 404 and reply.json()["error"]["code"] == "not_found"
    assert foreign.json() == no_session.json()
    bad = await client.get(f"/v1/sessions/{session_id}/turns/nope", params={"user_id": user})
    assert bad.status_code == 400 and "turn_id" in bad.text
    assert (await client.get(f"/v1/sessions/{session_id}/turns/{turn}")).status_code == 400  # no user_id


async def test_timestamps_follow_the_order_of_appends(client: AsyncTestClient) -> None:
    user = new_id()
    session_id = (await create_session(client, user))["session_id"]
    for n in range(3):
        await append_turn(client, session_id, user, expected_entry_count=2 * n)
    items = (await client.get(f"/v1/sessions/{session_id}/entries", params={"user_id": user})).json()["items"]
    times = [datetime.fromisoformat(item["created_at"].replace("Z", "+00:00")) for item in items]
    assert times == sorted(times) and times[0] == times[1] and times[1] < times[2]
    session = (await client.get(f"/v1/sessions/{session_id}", params={"user_id": user})).json()
    assert session["updated_at"] == items[-1]["created_at"]
