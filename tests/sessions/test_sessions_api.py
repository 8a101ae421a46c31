"""The sessions API end to end on a real PostgreSQL: create, list, read, append, summarize,
delete, and the owner scoping of every call."""
from __future__ import annotations

import re
import uuid
from datetime import datetime

from litestar.testing import AsyncTestClient

from .conftest import append_turn, create_session, fetch, new_id

RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
SESSION_FIELDS = {
    "session_id", "user_id", "session_name", "model_name", "prompt", "summary",
    "summarized_upto", "entry_count", "created_at", "updated_at",
}


async def test_create_then_get(client: AsyncTestClient) -> None:
    user = new_id()
    created = await create_session(client, user, name="Trip plans", model_name="llama3.1:8b", prompt="You plan trips")

    assert set(created) == SESSION_FIELDS
    assert created["user_id"] == user
    assert created["session_name"] == "Trip plans"
    assert created["model_name"] == "llama3.1:8b"
    assert created["prompt"] == "You plan trips"
    assert (created["summary"], created["summarized_upto"], created["entry_count"]) == ("", 0, 0)
    assert RFC3339_UTC.match(created["created_at"]) and RFC3339_UTC.match(created["updated_at"])

    response = await client.get(f"/v1/sessions/{created['session_id']}", params={"user_id": user})
    assert response.status_code == 200
    assert response.json() == created


async def test_create_with_given_id_is_idempotent(client: AsyncTestClient) -> None:
    user, session_id = new_id(), new_id()
    first = await create_session(client, user, session_id=session_id, name="first")
    again = await create_session(client, user, session_id=session_id, name="second attempt")
    assert first["session_id"] == session_id
    assert again == first

    # Someone else cannot take (or overwrite) that id.
    response = await client.post(
        "/v1/sessions", json={"user_id": new_id(), "name": "x", "model_name": "m", "session_id": session_id}
    )
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "conflict"
    got = await client.get(f"/v1/sessions/{session_id}", params={"user_id": user})
    assert got.json() == first


async def test_create_with_idempotency_key(client: AsyncTestClient) -> None:
    user, other = new_id(), new_id()
    first = await create_session(client, user, idempotency_key="create:turn-1")
    again = await create_session(client, user, idempotency_key="create:turn-1", name="retry")
    assert again == first
    # Keys are per owner: the same key of another user is a different session.
    theirs = await create_session(client, other, idempotency_key="create:turn-1")
    assert theirs["session_id"] != first["session_id"]

    listing = (await client.get("/v1/sessions", params={"user_id": user})).json()
    assert listing["total"] == 1


async def test_list_newest_first_with_pagination(client: AsyncTestClient) -> None:
    user = new_id()
    ids = [(await create_session(client, user, name=f"s{i}"))["session_id"] for i in range(5)]
    await create_session(client, new_id(), name="someone else's")
    newest_first = list(reversed(ids))

    page = (await client.get("/v1/sessions", params={"user_id": user})).json()
    assert [item["session_id"] for item in page["items"]] == newest_first
    assert (page["total"], page["limit"], page["offset"]) == (5, 50, 0)

    page = (await client.get("/v1/sessions", params={"user_id": user, "limit": 2, "offset": 1})).json()
    assert [item["session_id"] for item in page["items"]] == newest_first[1:3]
    assert (page["total"], page["limit"], page["offset"]) == (5, 2, 1)

    page = (await client.get("/v1/sessions", params={"user_id": user, "offset": 10})).json()
    assert page["items"] == [] and page["total"] == 5

    page = (await client.get("/v1/sessions", params={"user_id": user, "limit": 10_000})).json()
    assert page["limit"] == 500 and len(page["items"]) == 5

    page = (await client.get("/v1/sessions", params={"user_id": new_id()})).json()
    assert page == {"items": [], "total": 0, "limit": 50, "offset": 0}


async def test_entries_in_order_full_and_last(client: AsyncTestClient) -> None:
    user = new_id()
    session_id = (await create_session(client, user))["session_id"]
    turns = [new_id() for _ in range(3)]
    results = []
    for n, turn in enumerate(turns):
        entries = [{"role": "user", "content": f"q{n}"}, {"role": "assistant", "content": f"a{n}"}]
        if n == 1:
            entries.append({"role": "file", "content": "photo.png"})
        results.append(await append_turn(client, session_id, user, turn, entries))

    assert [(r["first_seq"], r["count"], r["entry_count"], r["created"]) for r in results] == [
        (0, 2, 2, True), (2, 3, 5, True), (5, 2, 7, True)
    ]
    expected = [
        (0, "user", "q0", turns[0]), (1, "assistant", "a0", turns[0]),
        (2, "user", "q1", turns[1]), (3, "assistant", "a1", turns[1]), (4, "file", "photo.png", turns[1]),
        (5, "user", "q2", turns[2]), (6, "assistant", "a2", turns[2]),
    ]

    full = (await client.get(f"/v1/sessions/{session_id}/entries", params={"user_id": user})).json()
    assert [(e["seq"], e["role"], e["content"], e["turn_id"]) for e in full["items"]] == expected
    assert all(RFC3339_UTC.match(e["created_at"]) for e in full["items"])

    last3 = (await client.get(f"/v1/sessions/{session_id}/entries", params={"user_id": user, "last": 3})).json()
    assert [(e["seq"], e["role"], e["content"], e["turn_id"]) for e in last3["items"]] == expected[-3:]

    many = (await client.get(f"/v1/sessions/{session_id}/entries", params={"user_id": user, "last": 10**30})).json()
    assert len(many["items"]) == 7

    session = (await client.get(f"/v1/sessions/{session_id}", params={"user_id": user})).json()
    assert session["entry_count"] == 7
    assert _time(session["updated_at"]) > _time(session["created_at"])


async def test_entries_of_empty_session(client: AsyncTestClient) -> None:
    user = new_id()
    session_id = (await create_session(client, user))["session_id"]
    all_params: list[dict[str, str | int]] = [{"user_id": user}, {"user_id": user, "last": 5}]
    for params in all_params:
        response = await client.get(f"/v1/sessions/{session_id}/entries", params=params)
        assert response.status_code == 200
        assert response.json() == {"items": []}


async def test_context_returns_session_and_window(client: AsyncTestClient) -> None:
    user = new_id()
    session_id = (await create_session(client, user, prompt="sys"))["session_id"]
    for n in range(8):
        await append_turn(client, session_id, user, entries=[
            {"role": "user", "content": f"q{n}"}, {"role": "assistant", "content": f"a{n}"}
        ])

    ctx = (await client.get(f"/v1/sessions/{session_id}/context", params={"user_id": user, "window": 4})).json()
    assert ctx["session"]["session_id"] == session_id
    assert ctx["session"]["prompt"] == "sys"
    assert ctx["session"]["entry_count"] == 16
    assert [e["seq"] for e in ctx["entries"]] == [12, 13, 14, 15]
    assert [e["content"] for e in ctx["entries"]] == ["q6", "a6", "q7", "a7"]

    default = (await client.get(f"/v1/sessions/{session_id}/context", params={"user_id": user})).json()
    assert [e["seq"] for e in default["entries"]] == list(range(6, 16))

    none = (await client.get(f"/v1/sessions/{session_id}/context", params={"user_id": user, "window": 0})).json()
    assert none["entries"] == [] and none["session"]["entry_count"] == 16


async def test_append_may_update_prompt_and_model(client: AsyncTestClient) -> None:
    user = new_id()
    session_id = (await create_session(client, user, prompt="old", model_name="gpt-4"))["session_id"]
    await append_turn(client, session_id, user, prompt="new prompt", model_name="gpt-4-turbo")
    session = (await client.get(f"/v1/sessions/{session_id}", params={"user_id": user})).json()
    assert (session["prompt"], session["model_name"]) == ("new prompt", "gpt-4-turbo")

    # Not given: left alone.
    await append_turn(client, session_id, user)
    session = (await client.get(f"/v1/sessions/{session_id}", params={"user_id": user})).json()
    assert (session["prompt"], session["model_name"]) == ("new prompt", "gpt-4-turbo")


async def test_replayed_turn_adds_nothing(client: AsyncTestClient) -> None:
    user = new_id()
    session_id = (await create_session(client, user))["session_id"]
    await append_turn(client, session_id, user)
    turn = new_id()
    first = await append_turn(client, session_id, user, turn, [
        {"role": "user", "content": "original"}, {"role": "assistant", "content": "reply"}
    ])
    assert first == {
        "session_id": session_id, "turn_id": turn, "first_seq": 2, "count": 2, "entry_count": 4, "created": True
    }
    before = (await client.get(f"/v1/sessions/{session_id}", params={"user_id": user})).json()

    # A retry, even one carrying different content or a prompt change, returns the first result.
    replay = await append_turn(client, session_id, user, turn, [{"role": "user", "content": "changed"}], prompt="p2")
    assert replay == {**first, "created": False}

    entries = (await client.get(f"/v1/sessions/{session_id}/entries", params={"user_id": user})).json()["items"]
    assert [e["content"] for e in entries] == ["hi", "hello", "original", "reply"]
    after = (await client.get(f"/v1/sessions/{session_id}", params={"user_id": user})).json()
    assert after == before

    # The same turn id in another session is a different turn.
    other_session = (await create_session(client, user))["session_id"]
    elsewhere = await append_turn(client, other_session, user, turn)
    assert elsewhere["created"] is True and elsewhere["first_seq"] == 0


async def test_summary_is_monotonic_and_idempotent(client: AsyncTestClient) -> None:
    user = new_id()
    session_id = (await create_session(client, user))["session_id"]
    for _ in range(4):
        await append_turn(client, session_id, user)
    url = f"/v1/sessions/{session_id}/summary"
    turn_a, turn_b, turn_c, turn_d = (new_id() for _ in range(4))

    response = await client.put(url, json={"user_id": user, "summary": "S4", "summarized_upto": 4, "turn_id": turn_a})
    assert response.status_code == 200
    assert (response.json()["summary"], response.json()["summarized_upto"]) == ("S4", 4)

    # Newer wins.
    newer = await client.put(url, json={"user_id": user, "summary": "S6", "summarized_upto": 6, "turn_id": turn_b})
    assert (newer.json()["summary"], newer.json()["summarized_upto"]) == ("S6", 6)

    # An older one arriving late is ignored, and the reply is the current state.
    older = await client.put(url, json={"user_id": user, "summary": "S2", "summarized_upto": 2, "turn_id": turn_c})
    assert older.status_code == 200
    assert older.json() == newer.json()

    # A replay of the turn that wrote the stored summary changes nothing, whatever it carries.
    replay = await client.put(url, json={"user_id": user, "summary": "other", "summarized_upto": 8, "turn_id": turn_b})
    assert replay.json() == newer.json()

    # Same coverage from another turn replaces it (it is no older).
    same = await client.put(url, json={"user_id": user, "summary": "S6b", "summarized_upto": 6, "turn_id": turn_d})
    assert (same.json()["summary"], same.json()["summarized_upto"]) == ("S6b", 6)

    stored = (await client.get(f"/v1/sessions/{session_id}", params={"user_id": user})).json()
    assert (stored["summary"], stored["summarized_upto"], stored["entry_count"]) == ("S6b", 6, 8)


async def test_delete_removes_session_and_entries(client: AsyncTestClient, database_url: str) -> None:
    user = new_id()
    session_id = (await create_session(client, user))["session_id"]
    kept = (await create_session(client, user))["session_id"]
    for sid in (session_id, kept):
        await append_turn(client, sid, user)

    response = await client.delete(f"/v1/sessions/{session_id}", params={"user_id": user})
    assert response.status_code == 204
    assert response.content == b""

    for path in ("", "/entries", "/context"):
        assert (await client.get(f"/v1/sessions/{session_id}{path}", params={"user_id": user})).status_code == 404
    again = await client.delete(f"/v1/sessions/{session_id}", params={"user_id": user})
    assert again.status_code == 404

    assert await fetch(database_url, "SELECT 1 FROM entries WHERE session_id = $1", uuid.UUID(session_id)) == []
    assert await fetch(database_url, "SELECT 1 FROM turns WHERE session_id = $1", uuid.UUID(session_id)) == []
    assert len(await fetch(database_url, "SELECT 1 FROM entries WHERE session_id = $1", uuid.UUID(kept))) == 2
    listing = (await client.get("/v1/sessions", params={"user_id": user})).json()
    assert [item["session_id"] for item in listing["items"]] == [kept]


async def test_another_users_session_is_not_found_and_untouched(client: AsyncTestClient, database_url: str) -> None:
    owner, intruder = new_id(), new_id()
    session_id = (await create_session(client, owner))["session_id"]
    await append_turn(client, session_id, owner)
    await client.put(f"/v1/sessions/{session_id}/summary",
                     json={"user_id": owner, "summary": "S", "summarized_upto": 2, "turn_id": new_id()})
    before_session = (await client.get(f"/v1/sessions/{session_id}", params={"user_id": owner})).json()
    before_rows = await _all_rows(database_url, session_id)
    missing_id = new_id()

    async def attempt(sid: str) -> list[tuple[int, dict]]:
        body = {"user_id": intruder}
        calls = [
            client.get(f"/v1/sessions/{sid}", params=body),
            client.get(f"/v1/sessions/{sid}/entries", params=body),
            client.get(f"/v1/sessions/{sid}/entries", params={**body, "last": 1}),
            client.get(f"/v1/sessions/{sid}/context", params={**body, "window": 5}),
            client.post(f"/v1/sessions/{sid}/turns", json={
                **body, "turn_id": new_id(), "entries": [{"role": "user", "content": "mine now"}]
            }),
            client.put(f"/v1/sessions/{sid}/summary", json={
                **body, "summary": "hijacked", "summarized_upto": 99, "turn_id": new_id()
            }),
            client.delete(f"/v1/sessions/{sid}", params=body),
        ]
        return [((r := await call).status_code, r.json()) for call in calls]

    foreign = await attempt(session_id)
    missing = await attempt(missing_id)
    assert [status for status, _ in foreign] == [404] * 7
    assert foreign == missing  # indistinguishable from a session that does not exist
    assert all(body["error"]["code"] == "not_found" for _, body in foreign)

    listing = (await client.get("/v1/sessions", params={"user_id": intruder})).json()
    assert listing["total"] == 0 and listing["items"] == []

    after_session = (await client.get(f"/v1/sessions/{session_id}", params={"user_id": owner})).json()
    assert after_session == before_session
    assert await _all_rows(database_url, session_id) == before_rows


async def test_nul_bytes_are_stripped(client: AsyncTestClient) -> None:
    user = new_id()
    created = await create_session(client, user, name="a\x00b", prompt="p\x00q")
    assert (created["session_name"], created["prompt"]) == ("ab", "pq")
    session_id = created["session_id"]
    await append_turn(client, session_id, user, entries=[{"role": "assistant", "content": "x\x00y\x00"}])
    entries = (await client.get(f"/v1/sessions/{session_id}/entries", params={"user_id": user})).json()["items"]
    assert [e["content"] for e in entries] == ["xy"]
    summary = await client.put(f"/v1/sessions/{session_id}/summary",
                               json={"user_id": user, "summary": "s\x00", "summarized_upto": 1, "turn_id": new_id()})
    assert summary.status_code == 200 and summary.json()["summary"] == "s"


async def test_nul_in_idempotency_key_is_stripped_too(client: AsyncTestClient) -> None:
    user = new_id()
    first = await create_session(client, user, idempotency_key="k\x001")
    again = await create_session(client, user, idempotency_key="k1")
    assert again["session_id"] == first["session_id"]


async def test_openapi_schema_renders(client: AsyncTestClient) -> None:
    response = await client.get("/schema/openapi.json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    assert {"/v1/sessions", "/v1/sessions/{session_id}/turns", "/v1/sessions/{session_id}/summary"} <= set(paths)


async def test_limits_are_inclusive(client: AsyncTestClient) -> None:
    user = new_id()
    created = await create_session(client, user, name="n" * 200, model_name="m" * 200, prompt="p" * 100_000)
    assert len(created["session_name"]) == 200
    result = await append_turn(client, created["session_id"], user, entries=[
        {"role": "user", "content": "c" * (1024 * 1024)}, {"role": "assistant", "content": "é" * (512 * 1024)}
    ])
    assert result["count"] == 2


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


async def _all_rows(database_url: str, session_id: str) -> tuple[list, list, list]:
    sid = uuid.UUID(session_id)
    return (
        [dict(r) for r in await fetch(database_url, "SELECT * FROM sessions WHERE id = $1", sid)],
        [dict(r) for r in await fetch(database_url, "SELECT * FROM entries WHERE session_id = $1 ORDER BY seq", sid)],
        [dict(r) for r in await fetch(database_url, "SELECT * FROM turns WHERE session_id = $1", sid)],
    )
