"""Type 10 (docs/protocol.md, "Extensions" (search)) over a real WebSocket against the real system: a turn is
found right after its reply, case-insensitively and across inflections, only by its owner, and
not after type 4; hostile queries get a normal reply."""
from __future__ import annotations

import json
import uuid

import pytest

from devstack.stack import Stack

from .conftest import Client, assert_error, assert_ok, connect, new_user


@pytest.fixture
async def client(stack: Stack):
    async with connect(stack.ws_url) as c:
        yield c


async def search(client: Client, user: str, query: str, **extra: object) -> list[dict]:
    data = assert_ok(await client.request(10, user_id=user, query=query, **extra), 10)
    assert data["user_id"] == user
    return data["results"]


async def test_found_right_after_the_reply_and_gone_after_delete(stack: Stack, client: Client) -> None:
    user, other = new_user(stack), new_user(stack)
    reply = assert_ok(await client.chat(user, "NEW", "Please check my PAYMENT of March"), 3)
    session_id = reply["session_id"]
    results = await search(client, user, "payments")
    assert [r["role"] for r in results][:1] == ["user"]
    first = results[0]
    assert first["session_id"] == session_id and first["seq"] == 0
    assert "PAYMENT" in first["snippet"]
    assert set(first) == {"session_id", "session_name", "seq", "role", "snippet", "created_at"}
    assert first["session_name"]
    assert await search(client, user, "PaYmEnT march") and await search(client, user, "paid") == []
    # another user finds nothing of it
    assert await search(client, other, "payment") == []
    assert await search(client, str(uuid.uuid4()), "payment") == []
    # type 4 removes it from search
    assert_ok(await client.request(4, user_id=user, session_id=session_id), 4)
    assert await search(client, user, "payment") == []


async def test_limit_and_order(stack: Stack, client: Client) -> None:
    user = new_user(stack)
    for text in ("one kangaroo", "kangaroo kangaroo kangaroos", "no match here"):
        assert_ok(await client.chat(user, "NEW", text), 3)
    results = await search(client, user, "kangaroo")
    assert [r["snippet"] for r in results if r["role"] == "user"][:2] == ["kangaroo kangaroo kangaroos", "one kangaroo"]
    assert len(await search(client, user, "kangaroo", limit=1)) == 1


async def test_hostile_queries_get_a_normal_reply(stack: Stack, client: Client) -> None:
    user = new_user(stack)
    assert_ok(await client.chat(user, "NEW", "select the otter from the table"), 3)
    for query in (
        "'", '"otter', "otter' OR '1'='1", "'; DROP TABLE sessions; --", "otter & !table | <-> :*", "(((",
        "-otter", "\\x00", "a" * 10_000, "otter " * 1_600, "ünïcödé 😀 中文 \u202e", "otter\x00", "%_*",
    ):
        results = await search(client, user, query)
        assert isinstance(results, list), query[:30]
    assert len(await search(client, user, '"otter"')) >= 1
    assert len(await search(client, user, "ot\x00ter")) >= 1
    assert len(await search(client, user, "otter")) >= 1  # nothing was dropped


async def test_bad_requests(stack: Stack, client: Client) -> None:
    user = new_user(stack)
    cases = [
        ({"user_id": user}, 101, "`data.query`"),
        ({"user_id": user, "query": 5}, 102, "`data.query` must be a string"),
        ({"user_id": user, "query": "   "}, 103, "`data.query` must not be empty"),
        ({"user_id": user, "query": "\x00"}, 103, "`data.query` must not be empty"),
        ({"user_id": user, "query": "x", "limit": 0}, 103, "`data.limit`"),
        ({"user_id": user, "query": "x", "limit": 101}, 103, "`data.limit`"),
        ({"user_id": user, "query": "x", "limit": "5"}, 102, "`data.limit` must be an integer"),
        ({"user_id": user, "query": "x" * 40_000}, 105, "`data.query` is too long"),
        ({"query": "x"}, 101, "`data.user_id`"),
        ({"user_id": "bob", "query": "x"}, 3, "User Does Not Exists"),
    ]
    for data, code, text in cases:
        await client.send_raw(json.dumps({"type": 10, "data": data}))
        assert_error(await client.recv(), code, 10, text)
    # the socket is still fine
    assert await search(client, user, "anything") == []
