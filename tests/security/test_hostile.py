"""Hostile strings in every field of every message type, in the envelope, and in every upload
form field and file name: each gets a clear error reply (or a success that stores the text as
plain data, or a close code for a frame over the limit), the socket loop survives, no service
logs a traceback or an error, and another user's data is untouched."""
from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from devstack.stack import Stack

from .conftest import (
    MODEL,
    LogWatch,
    assert_ok,
    balance_nanos,
    connect,
    entries_of,
    files_of,
    new_user,
    sessions_of,
    upload,
    upload_fields,
)

MEGABYTE = "A" * 1_000_000
SQL = ["'; DROP TABLE sessions; --", "' OR '1'='1", "1; DELETE FROM users WHERE ''='", "\\'; SELECT pg_sleep(5); --"]
TRAVERSAL = ["../../../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "/etc/passwd", "..\\..\\windows\\win.ini",
             "uploads/../../secret.png"]
CONTROL = ["\x00", "a\x00b", "\x01\x02\x07\x08\x1b[31mred\x1b[0m", "line\r\nX-Injected: 1", "\u202egnp.exe",
           "\ufeff\u200b", "\ud83d\ude00" * 3]
OTHER_TYPES: list[Any] = [12345, -1, 2**70, 1.5, True, None, [], {}, ["a"], {"$ne": None}]
STRINGS = SQL + TRAVERSAL + CONTROL
NAME = re.compile(r"^[0-9a-f]{32}\.[a-z0-9]{1,10}$")

FIELDS = {
    0: ["user_id"],
    1: ["user_id"],
    2: ["user_id", "session_id"],
    3: ["user_id", "session_id", "model_name", "model_id", "message", "session_prompt", "file_name"],
    4: ["user_id", "session_id"],
    5: ["user_id"],
    6: ["user_id"],
}


@pytest.fixture(scope="module")
async def victim(system: Stack) -> dict[str, Any]:
    """Another user whose data must come through unchanged."""
    user = new_user(system)
    async with connect(system.ws_url) as client:
        session = assert_ok(await client.chat("NEW", "victim's own words", user_id=user), 3)["session_id"]
    return {"user": user, "session": session, "entries": entries_of(system, user, session),
            "sessions": sessions_of(system, user), "balance": balance_nanos(system, user)}


@pytest.fixture(scope="module")
async def attacker(system: Stack) -> dict[str, str]:
    user = new_user(system, balance=100.0)
    async with connect(system.ws_url) as client:
        session = assert_ok(await client.chat("NEW", "attacker's session", user_id=user), 3)["session_id"]
    return {"user": user, "session": session}


@pytest.fixture(scope="module")
async def watch(system: Stack, victim: dict[str, Any], attacker: dict[str, str]) -> AsyncIterator[LogWatch]:
    yield LogWatch(system).start()


@pytest.fixture(scope="module", autouse=True)
async def afterwards(
    system: Stack, victim: dict[str, Any], attacker: dict[str, str], watch: LogWatch
) -> AsyncIterator[None]:
    """Checked when the module's last test is done, whatever order the tests ran in: the other
    user's data came through unchanged, nothing logged a traceback or an error, and every
    service still answers (the attacker still chats)."""
    yield
    assert entries_of(system, victim["user"], victim["session"]) == victim["entries"]
    assert sessions_of(system, victim["user"]) == victim["sessions"]
    assert balance_nanos(system, victim["user"]) == victim["balance"]
    assert files_of(system, victim["user"], victim["session"]) == []
    watch.assert_clean()
    async with connect(system.ws_url) as client:
        assert_ok(await client.chat(attacker["session"], "still here", user_id=attacker["user"]), 3)
    for name in ("sessions", "files", "billing"):
        async with httpx.AsyncClient(timeout=10) as http:
            assert (await http.get(f"{system.url(name)}/health")).status_code == 200


def base(type_: int, attacker: dict[str, str]) -> dict[str, Any]:
    data: dict[str, Any] = {"user_id": attacker["user"]}
    if type_ in (2, 4):
        data["session_id"] = attacker["session"]
    if type_ == 3:
        data.update(session_id=attacker["session"], model_name=MODEL, message="hello", session_prompt="be brief",
                    file_name="")
    return data


def check_reply(reply: dict[str, Any], type_: int, case: str) -> str:
    """An error with a code and a message, or a success of the request's type."""
    if "error" in reply:
        assert isinstance(reply["error"], str) and reply["error"], (case, reply)
        assert isinstance(reply.get("code"), int), (case, reply)
        assert "Traceback" not in reply["error"], (case, reply)
        return "error"
    assert reply.get("type") == type_ and isinstance(reply.get("data"), dict), (case, reply)
    return "ok"


async def test_hostile_values_in_every_field_of_every_type(
    system: Stack, attacker: dict[str, str], victim: dict[str, Any], watch: LogWatch
) -> None:
    outcomes: dict[str, int] = {"error": 0, "ok": 0}
    # Type 4 last: a hostile value that still deleted the attacker's own session would leave
    # the rest of the cases without one.
    async with connect(system.ws_url) as client:
        for type_ in (0, 1, 2, 3, 5, 6, 4):
            for field in FIELDS[type_]:
                values = STRINGS + OTHER_TYPES if field != "model_id" else OTHER_TYPES + STRINGS
                for value in values:
                    data = base(type_, attacker)
                    if field == "model_id":
                        data.pop("model_name", None)
                    if field == "session_id" and type_ == 4 and isinstance(value, str) and value == attacker["session"]:
                        continue
                    data[field] = value
                    case = f"type {type_} {field}={value!r:.60}"
                    reply = await client.request(type_, **data)
                    outcomes[check_reply(reply, type_, case)] += 1
                    if type_ in (2, 4) and field == "session_id":
                        assert "error" in reply, case  # no such session exists for these values
        # the socket still works after all of it
        assert assert_ok(await client.request(6, user_id=attacker["user"]), 6)["balance"] > 0
    assert outcomes["error"] > 0 and outcomes["ok"] > 0, outcomes


async def test_hostile_text_is_stored_as_text(system: Stack, attacker: dict[str, str]) -> None:
    """SQL in a message or prompt is data: stored and returned byte for byte, nothing executed."""
    async with connect(system.ws_url) as client:
        for text in SQL + ["line\r\nX-Injected: 1", "\u202egnp.exe"]:
            reply = assert_ok(await client.chat("NEW", text, user_id=attacker["user"], session_prompt=text), 3)
            chats = json.loads(assert_ok(await client.request(2, user_id=attacker["user"],
                                                               session_id=reply["session_id"]), 2)["chat"])
            assert chats[0] == {"role": "user", "content": text}
            assert reply["session_name"] and len(reply["session_name"]) <= 20


async def test_hostile_envelopes(system: Stack, attacker: dict[str, str]) -> None:
    frames: list[str | bytes] = [
        "", " ", "null", "0", "[]", '"text"', "{}", '{"type": null}', '{"type": "0"}', '{"type": 1e400}',
        '{"type": 99999999999999999999999}', '{"type": -1, "data": {}}', '{"type": 0, "data": []}',
        '{"type": 0, "data": "x"}', '{"type": 0, "data": {"user_id": "\\ud800"}}', b"\xff\xfe\x00garbage",
        '{"type": 0, "data": {"user_id": "u"}, "type": 6}', "{" * 50_000, "[" * 50_000 + "]" * 50_000,
        '{"type": 0, "data": {"user_id": "x", "deep": ' + "[" * 50_000 + "]" * 50_000 + "}}",
        '{"type": 0, "data": {"__proto__": {"admin": true}, "user_id": "' + attacker["user"] + '"}}',
    ]
    async with connect(system.ws_url) as client:
        for frame in frames:
            await client.send_raw(frame)
            reply = await client.recv()
            assert "error" in reply or reply.get("type") == 0, (frame[:60], reply)
            if "error" in reply:
                assert isinstance(reply["code"], int), reply
        assert_ok(await client.request(6, user_id=attacker["user"]), 6)


@pytest.mark.parametrize("type_, field", [(t, f) for t, fields in FIELDS.items() for f in fields])
async def test_a_megabyte_in_any_field_closes_with_1009(
    system: Stack, attacker: dict[str, str], type_: int, field: str
) -> None:
    data = base(type_, attacker)
    data[field] = MEGABYTE
    async with connect(system.ws_url) as client:
        await client.send(type_, **data)
        code, _ = await client.closed_with()
        assert code == 1009, (type_, field, code)
    async with connect(system.ws_url) as client:  # and the next socket is served
        assert_ok(await client.request(6, user_id=attacker["user"]), 6)


# ------------------------------------------------------------------------------------ uploads


UPLOAD_FIELDS = ["user_id", "session_id", "model_name", "session_prompt"]


async def test_hostile_upload_fields_and_names(system: Stack, attacker: dict[str, str], watch: LogWatch) -> None:
    async with httpx.AsyncClient(base_url=system.gateway_url, timeout=60) as http:
        for field in UPLOAD_FIELDS:
            for value in STRINGS + [MEGABYTE]:
                fields = upload_fields(attacker["user"], attacker["session"])
                fields[field] = value
                response = await upload(http, fields, "note.txt", b"hostile field")
                _check_upload(response, f"{field}={value!r:.60}")
        for name in STRINGS + [s + ".txt" for s in STRINGS] + ["a" * 300 + ".txt", MEGABYTE + ".txt", '"quoted".txt',
                                                                 "semi;colon.txt", "percent%00.txt"]:
            response = await upload(http, upload_fields(attacker["user"], attacker["session"]), name, b"hostile name")
            body = _check_upload(response, f"filename={name!r:.60}")
            if response.status_code == 202:
                stored = body["data"]["fileName"]
                # the stored name is the service's own, whatever the client called the file
                assert NAME.match(stored), stored
                download = await http.get(f"/uploads/{stored}", params={"user_id": attacker["user"]})
                assert download.content == b"hostile name"
                disposition = download.headers.get("content-disposition", "")
                assert "\r" not in disposition and "\n" not in disposition
        # hostile names on download
        for path in ["/uploads/..%2F..%2Fetc%2Fpasswd", "/uploads/%00", "/uploads/" + "a" * 5000,
                     "/uploads/' OR 1=1 --.png", "/uploads/%2e%2e/%2e%2e/etc/passwd"]:
            response = await http.get(path, params={"user_id": attacker["user"]})
            assert response.status_code == 404, (path, response.status_code)


def _check_upload(response: httpx.Response, case: str) -> dict[str, Any]:
    assert response.status_code in (202, 400, 403, 404, 413, 415), (case, response.status_code, response.text[:300])
    body = response.json()
    assert isinstance(body.get("message"), str) and body["message"], (case, body)
    if response.status_code != 202:
        assert body["data"] is None, (case, body)
        assert "Traceback" not in body["message"]
    return body
