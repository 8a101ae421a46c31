"""Turns that carry a file: the AI gets a URL it can fetch, the chat gets a ``file`` entry, the
file is marked used; a file of another session or user is refused; a failed turn removes the
file uploaded for it, but never one an earlier turn used."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from devstack.servers import ServiceProcess
from devstack.stack import Stack

from .conftest import (
    PROCESS_COST_NANOS,
    StandInAI,
    assert_error,
    assert_ok,
    balance_of,
    connect,
    internal,
    new_user,
    ws_url,
)

START_NANOS = 1_000_000_000


def upload(stack: Stack, user: str, session: str, content: bytes, name: str = "notes.txt") -> dict:
    return internal(
        stack, "files", "POST", f"/v1/sessions/{session}/files?user_id={user}&original_name={name}", raw=content
    )


def file_status(stack: Stack, user: str, file_name: str) -> str | None:
    try:
        return internal(stack, "files", "GET", f"/v1/files/{file_name}?user_id={user}")["status"]
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


async def test_turn_with_a_file(stack: Stack, stand_in_ai: StandInAI, stand_in_gateway: ServiceProcess) -> None:
    user = new_user(stack)
    async with connect(ws_url(stand_in_gateway)) as client:
        session = assert_ok(await client.chat(user, "NEW", "I will send a file"), 3)["session_id"]
        stored = upload(stack, user, session, b"the secret number is 42\n")
        name = stored["file_name"]
        assert name != "notes.txt" and name.endswith(".txt")
        reply = assert_ok(await client.chat(user, session, "what is in it?", file_name=name), 3)
        assert reply["message"] == "reply to: what is in it?"
        chat = json.loads(assert_ok(await client.request(2, user_id=user, session_id=session), 2)["chat"])
    assert chat[2:] == [
        {"role": "user", "content": "what is in it?"},
        {"role": "assistant", "content": "reply to: what is in it?"},
        {"role": "file", "content": name},
    ]
    seen = stand_in_ai.seen_for(session)[-1]
    assert len(seen.files) == 1
    with urllib.request.urlopen(seen.files[0], timeout=10) as response:  # a URL the AI can fetch
        assert response.read() == b"the secret number is 42\n"
    assert file_status(stack, user, name) == "used"


async def test_files_of_other_sessions_or_users_are_refused(
    stack: Stack, stand_in_gateway: ServiceProcess
) -> None:
    user, other_user = new_user(stack), new_user(stack)
    async with connect(ws_url(stand_in_gateway)) as client:
        session = assert_ok(await client.chat(user, "NEW", "session one"), 3)["session_id"]
        other_session = assert_ok(await client.chat(user, "NEW", "session two"), 3)["session_id"]
        foreign_session = assert_ok(await client.chat(other_user, "NEW", "not yours"), 3)["session_id"]
        mine_elsewhere = upload(stack, user, other_session, b"other session")["file_name"]
        foreign = upload(stack, other_user, foreign_session, b"other user")["file_name"]
        for name in (mine_elsewhere, foreign, "no-such-file.txt", "../../etc/passwd"):
            assert_error(await client.chat(user, session, "look", file_name=name), 104, 3, "File not found")
        # a file of another session is not this turn's to delete when it fails
        assert file_status(stack, user, mine_elsewhere) == "attached"
        assert file_status(stack, other_user, foreign) == "attached"
        chat = json.loads(assert_ok(await client.request(2, user_id=user, session_id=session), 2)["chat"])
    assert len(chat) == 2
    money = balance_of(stack, user)
    assert money["reserved_nanos"] == 0 and money["balance_nanos"] == START_NANOS - 2 * PROCESS_COST_NANOS


async def test_failed_turn_removes_only_its_own_unused_file(
    stack: Stack, stand_in_gateway: ServiceProcess
) -> None:
    user = new_user(stack)
    async with connect(ws_url(stand_in_gateway)) as client:
        session = assert_ok(await client.chat(user, "NEW", "files please"), 3)["session_id"]
        fresh = upload(stack, user, session, b"uploaded for a turn that fails")["file_name"]
        assert_error(await client.chat(user, session, "fail with a file", file_name=fresh), 6, 3)
        assert file_status(stack, user, fresh) is None

        kept = upload(stack, user, session, b"used once")["file_name"]
        assert_ok(await client.chat(user, session, "read this", file_name=kept), 3)
        assert_error(await client.chat(user, session, "fail on the same file", file_name=kept), 6, 3)
        assert file_status(stack, user, kept) == "used"
        chat = json.loads(assert_ok(await client.request(2, user_id=user, session_id=session), 2)["chat"])
    assert [e["role"] for e in chat] == ["user", "assistant", "user", "assistant", "file"]
    assert chat[-1]["content"] == kept


@pytest.mark.parametrize("name", ["", None])
async def test_empty_file_name_means_no_file(
    stack: Stack, stand_in_ai: StandInAI, stand_in_gateway: ServiceProcess, name: str | None
) -> None:
    user = new_user(stack)
    async with connect(ws_url(stand_in_gateway)) as client:
        session = assert_ok(await client.chat(user, "NEW", "no file here", file_name=name), 3)["session_id"]
    assert stand_in_ai.seen_for(session)[-1].files == []
