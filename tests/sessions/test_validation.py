"""Bad input gets a clear 400 (never a 500) and writes nothing; the service token guards every
API path; readiness follows the database."""
from __future__ import annotations

import logging
import uuid
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from chat_sessions.app import create_app
from devstack.servers import free_port

from .conftest import append_turn, create_session, fetch, make_settings, new_id

USER = new_id()
MiB = 1024 * 1024


@pytest.fixture(scope="module")
async def session_id(client: AsyncTestClient) -> str:
    sid = (await create_session(client, USER))["session_id"]
    await append_turn(client, sid, USER)
    return sid


def _turn(**overrides: Any) -> dict[str, Any]:
    return {"user_id": USER, "turn_id": new_id(), "entries": [{"role": "user", "content": "x"}], **overrides}


def _summary(**overrides: Any) -> dict[str, Any]:
    return {"user_id": USER, "summary": "s", "summarized_upto": 1, "turn_id": new_id(), **overrides}


def _create(**overrides: Any) -> dict[str, Any]:
    return {"user_id": USER, "name": "n", "model_name": "m", "prompt": "", **overrides}


# (method, path with {sid}, query, json body, the field the error should name or None)
CASES: list[tuple[str, str, dict | None, Any, str | None]] = [
    ("GET", "/v1/sessions/not-a-uuid", {"user_id": USER}, None, "session_id"),
    ("GET", "/v1/sessions/{sid}", {"user_id": "not-a-uuid"}, None, "user_id"),
    ("GET", "/v1/sessions/{sid}", None, None, None),
    ("GET", "/v1/sessions", None, None, None),
    ("GET", "/v1/sessions", {"user_id": USER, "limit": 0}, None, "limit"),
    ("GET", "/v1/sessions", {"user_id": USER, "limit": "ten"}, None, "limit"),
    ("GET", "/v1/sessions", {"user_id": USER, "offset": -1}, None, "offset"),
    ("GET", "/v1/sessions", {"user_id": USER, "offset": 10**20}, None, "offset"),
    ("GET", "/v1/sessions/{sid}/entries", {"user_id": USER, "last": 0}, None, "last"),
    ("GET", "/v1/sessions/{sid}/entries", {"user_id": USER, "last": -3}, None, "last"),
    ("GET", "/v1/sessions/{sid}/entries", {"user_id": USER, "last": "all"}, None, "last"),
    ("GET", "/v1/sessions/bad/entries", {"user_id": USER}, None, "session_id"),
    ("GET", "/v1/sessions/{sid}/context", {"user_id": USER, "window": -1}, None, "window"),
    ("GET", "/v1/sessions/bad/context", {"user_id": USER}, None, "session_id"),
    ("DELETE", "/v1/sessions/bad", {"user_id": USER}, None, "session_id"),
    ("DELETE", "/v1/sessions/{sid}", {"user_id": "nope"}, None, "user_id"),
    ("POST", "/v1/sessions", None, _create(user_id="nope"), "user_id"),
    ("POST", "/v1/sessions", None, _create(session_id="nope"), "session_id"),
    ("POST", "/v1/sessions", None, _create(name=""), "name"),
    ("POST", "/v1/sessions", None, _create(name="\x00"), "name"),
    ("POST", "/v1/sessions", None, _create(model_name=" \x00 "), "model_name"),
    ("POST", "/v1/sessions", None, _create(name="n" * 201), "name"),
    ("POST", "/v1/sessions", None, _create(model_name="m" * 201), "model_name"),
    ("POST", "/v1/sessions", None, _create(prompt="p" * 100_001), "prompt"),
    ("POST", "/v1/sessions", None, _create(name=5), "name"),
    ("POST", "/v1/sessions", None, {"user_id": USER}, None),
    ("POST", "/v1/sessions", None, [], None),
    ("POST", "/v1/sessions/{sid}/turns", None, _turn(entries=[]), "entries"),
    ("POST", "/v1/sessions/{sid}/turns", None, _turn(entries=[{"role": "system", "content": "x"}]), "entries[0].role"),
    ("POST", "/v1/sessions/{sid}/turns", None, _turn(entries=[{"role": "user"}]), None),
    ("POST", "/v1/sessions/{sid}/turns", None, _turn(entries=[{"role": "user", "content": "x" * (MiB + 1)}]),
     "entries[0].content"),
    # Under the character bound but over 1 MiB of UTF-8.
    ("POST", "/v1/sessions/{sid}/turns", None, _turn(entries=[{"role": "user", "content": "é" * (MiB // 2 + 1)}]),
     "entries[0].content"),
    ("POST", "/v1/sessions/{sid}/turns", None, _turn(entries=[{"role": "user", "content": "x"}] * 101), "entries"),
    ("POST", "/v1/sessions/{sid}/turns", None, _turn(turn_id="t-1"), "turn_id"),
    ("POST", "/v1/sessions/{sid}/turns", None, _turn(user_id="u-1"), "user_id"),
    ("POST", "/v1/sessions/{sid}/turns", None, _turn(prompt="p" * 100_001), "prompt"),
    ("POST", "/v1/sessions/{sid}/turns", None, _turn(model_name="\x00"), "model_name"),
    ("POST", "/v1/sessions/bad/turns", None, _turn(), "session_id"),
    ("PUT", "/v1/sessions/{sid}/summary", None, _summary(summarized_upto=-1), "summarized_upto"),
    ("PUT", "/v1/sessions/{sid}/summary", None, _summary(summarized_upto=2**31), "summarized_upto"),
    ("PUT", "/v1/sessions/{sid}/summary", None, _summary(summary="s" * 100_001), "summary"),
    ("PUT", "/v1/sessions/{sid}/summary", None, _summary(turn_id="x"), "turn_id"),
    ("PUT", "/v1/sessions/bad/summary", None, _summary(), "session_id"),
]


@pytest.mark.parametrize(("method", "path", "query", "body", "field"), CASES)
async def test_bad_input_is_a_400(
    client: AsyncTestClient, session_id: str, caplog: pytest.LogCaptureFixture,
    method: str, path: str, query: dict | None, body: Any, field: str | None,
) -> None:
    caplog.set_level(logging.INFO)
    response = await client.request(method, path.format(sid=session_id), params=query, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] in {"validation_error", "bad_request"}
    assert error["message"]
    if field is not None:
        named = [item.get("key") for item in error.get("details") or []]
        assert field in named or field in error["message"], error
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b'{"user_id": "\xff\xfe", "name": "n", "model_name": "m"}', b'{"name": "\\ud800"}', b""],
)
async def test_undecodable_body_is_a_400(client: AsyncTestClient, raw: bytes) -> None:
    response = await client.post("/v1/sessions", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"]


async def test_rejected_writes_change_nothing(client: AsyncTestClient, session_id: str, database_url: str) -> None:
    # Runs after the parametrized cases above (file order): none of them left a trace.
    sessions = await fetch(database_url, "SELECT id FROM sessions WHERE user_id = $1", uuid.UUID(USER))
    assert [str(row["id"]) for row in sessions] == [session_id]
    entries = await fetch(database_url, "SELECT seq FROM entries")
    assert [row["seq"] for row in entries] == [0, 1]
    session = (await client.get(f"/v1/sessions/{session_id}", params={"user_id": USER})).json()
    assert (session["entry_count"], session["summary"], session["summarized_upto"]) == (2, "", 0)


@pytest.mark.parametrize("headers", [{}, {"X-Service-Token": "wrong"}])
async def test_service_token_required(client: AsyncTestClient, session_id: str, headers: dict[str, str]) -> None:
    calls = [
        ("GET", "/v1/sessions", {"user_id": USER}, None),
        ("GET", f"/v1/sessions/{session_id}", {"user_id": USER}, None),
        ("GET", f"/v1/sessions/{session_id}/entries", {"user_id": USER}, None),
        ("GET", f"/v1/sessions/{session_id}/context", {"user_id": USER}, None),
        ("POST", "/v1/sessions", None, _create()),
        ("POST", f"/v1/sessions/{session_id}/turns", None, _turn()),
        ("PUT", f"/v1/sessions/{session_id}/summary", None, _summary()),
        ("DELETE", f"/v1/sessions/{session_id}", {"user_id": USER}, None),
    ]
    token = client.headers.pop("X-Service-Token")
    try:
        for method, path, query, body in calls:
            response = await client.request(method, path, params=query, json=body, headers=headers)
            assert response.status_code == 401, (method, path)
            assert response.json()["error"]["code"] == "unauthorized"
        assert (await client.get("/health")).status_code == 200
    finally:
        client.headers["X-Service-Token"] = token
    # Nothing above got through.
    session = (await client.get(f"/v1/sessions/{session_id}", params={"user_id": USER})).json()
    assert session["entry_count"] == 2


async def test_ready_checks_the_database(client: AsyncTestClient) -> None:
    response = await client.get("/ready")
    assert response.status_code == 200
    assert response.json()["checks"] == {"database": "ok"}


async def test_database_down_is_a_503_not_a_500(service_token: str) -> None:
    dead = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/nothing"
    async with AsyncTestClient(create_app(make_settings(dead, service_token))) as client:
        client.headers["X-Service-Token"] = service_token
        ready = await client.get("/ready")
        assert ready.status_code == 503
        assert ready.json()["checks"]["database"] != "ok"
        response = await client.get(f"/v1/sessions/{new_id()}", params={"user_id": USER})
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "unavailable"
