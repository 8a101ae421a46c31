"""Retention over real processes: a gateway with SESSION_RETENTION_DAYS removes a session idle
for longer, with its file and entries, exactly as type 4 does, and keeps a fresh one."""
from __future__ import annotations

import asyncio
import time
import urllib.error

import asyncpg

from chat_common.db import plain_dsn
from devstack.stack import Stack

from .conftest import (
    assert_error,
    assert_ok,
    connect,
    internal,
    new_user,
    start_gateway,
    ws_url,
)


def upload(stack: Stack, user: str, session: str, content: bytes) -> str:
    return internal(
        stack, "files", "POST", f"/v1/sessions/{session}/files?user_id={user}&original_name=notes.txt", raw=content
    )["file_name"]


def file_exists(stack: Stack, user: str, file_name: str) -> bool:
    try:
        internal(stack, "files", "GET", f"/v1/files/{file_name}?user_id={user}")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return False
        raise
    return True


async def backdate(stack: Stack, session_id: str, days: float) -> None:
    connection = await asyncpg.connect(plain_dsn(stack.infra.database_url))
    try:
        await connection.execute(
            "UPDATE sessions.sessions SET updated_at = now() - make_interval(secs => $2) WHERE id = $1::uuid",
            session_id, days * 86400,
        )
    finally:
        await connection.close()


async def test_expired_session_and_its_file_are_removed_fresh_kept(stack: Stack) -> None:
    user = new_user(stack)
    async with connect(stack.ws_url) as client:
        old = assert_ok(await client.chat(user, "NEW", "an old conversation about walruses"), 3)["session_id"]
        fresh = assert_ok(await client.chat(user, "NEW", "a fresh one"), 3)["session_id"]
    old_file = upload(stack, user, old, b"old notes\n")
    fresh_file = upload(stack, user, fresh, b"fresh notes\n")
    # the old session's last activity 8.5 days ago: past a 7.5-day retention (fractions allowed)
    await backdate(stack, old, 8.5)
    sweeper = start_gateway(stack, SESSION_RETENTION_DAYS="7.5", RETENTION_SWEEP_SECONDS="0.3")
    try:
        async with connect(ws_url(sweeper)) as client:
            deadline = time.monotonic() + 30
            while True:
                reply = await client.request(2, user_id=user, session_id=old)
                if "error" in reply or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert_error(reply, 9, 2, "Unable to Load Chats")
            deadline = time.monotonic() + 10
            while file_exists(stack, user, old_file) and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert not file_exists(stack, user, old_file)
            # gone as type 4 leaves it: not listed, not searchable
            listed = assert_ok(await client.request(1, user_id=user), 1)["session_info"]
            assert [s["session_id"] for s in listed] == [fresh]
            found = assert_ok(await client.request(10, user_id=user, query="walruses"), 10)["results"]
            assert found == []
            # the fresh one is untouched, with its file
            chat = assert_ok(await client.request(2, user_id=user, session_id=fresh), 2)
            assert "a fresh one" in chat["chat"]
            assert file_exists(stack, user, fresh_file)
            assert_ok(await client.chat(user, fresh, "still here"), 3)
    finally:
        sweeper.stop()
