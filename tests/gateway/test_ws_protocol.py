"""Every message type over a real WebSocket against the real system (offline AI), with its
success reply and each error of docs/protocol-errors.md that a client can cause."""
from __future__ import annotations

import asyncio
import json
import re
import urllib.request
import uuid

import pytest
from redis.asyncio import Redis

from devstack.stack import Stack

from .conftest import (
    Client,
    assert_error,
    assert_ok,
    balance_of,
    connect,
    new_user,
    start_gateway,
    ws_url,
)


@pytest.fixture
async def client(stack: Stack):
    async with connect(stack.ws_url) as c:
        yield c


async def test_pipelined_connect_burst_is_all_answered(stack: Stack, client: Client) -> None:
    """The original UI sends 0, 1, 5 and 6 at once on connect."""
    user = new_user(stack)
    for type_ in (0, 1, 5, 6):
        await client.send(type_, user_id=user)
    replies = {r["type"]: r for r in [await client.recv() for _ in range(4)]}
    assert set(replies) == {0, 1, 5, 6}
    assert assert_ok(replies[0], 0)["user_id"] == user and replies[0]["data"]["username"].startswith("user-")
    assert assert_ok(replies[1], 1) == {"user_id": user, "session_info": []}
    assert assert_ok(replies[5], 5) == {"models": ["gpt-4-turbo", "gpt-4-turbo-2024-04-09", "llama3.1:8b"]}
    assert assert_ok(replies[6], 6) == {"balance": 1.0}


async def test_replies_of_one_type_keep_request_order(stack: Stack, client: Client) -> None:
    users = [new_user(stack, balance=b) for b in (1.0, 2.0, 3.0, 4.0, 5.0)]
    for user in users:
        await client.send(6, user_id=user)
        await client.send(0, user_id=user)
    replies = [await client.recv() for _ in range(10)]
    assert [r["data"]["balance"] for r in replies if r["type"] == 6] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert [r["data"]["user_id"] for r in replies if r["type"] == 0] == users


async def test_unknown_user(stack: Stack, client: Client) -> None:
    ghost = str(uuid.uuid4())
    for type_ in (0, 5, 6):
        assert_error(await client.request(type_, user_id=ghost), 3, type_, "User Does Not Exists")
    assert_error(await client.chat(ghost, "NEW", "hello"), 3, 3, "User Does Not Exists")
    # the user is checked before the session: an unknown user hears 3 whatever it names
    real = assert_ok(await client.chat(new_user(stack), "NEW", "a real session"), 3)["session_id"]
    assert_error(await client.chat(ghost, real, "hello"), 3, 3, "User Does Not Exists")
    # not even a UUID: no user can have that id
    assert_error(await client.request(0, user_id="bob"), 3, 0, "User Does Not Exists")
    assert_error(await client.request(1, user_id="bob"), 3, 1, "User Does Not Exists")


async def test_bad_input_never_closes_the_socket(stack: Stack, client: Client) -> None:
    user = new_user(stack)
    cases: list[tuple[str, int, int | None, str]] = [
        ("{not json", 0, None, "JSON Parsing Error"),
        ("", 0, None, "JSON Parsing Error"),
        ("[]", 100, None, "JSON object"),
        (json.dumps({"type": 42, "data": {"user_id": user}}), 1, 42, "Unknown Message"),
        (json.dumps({"type": "0", "data": {"user_id": user}}), 100, None, "`type` must be an integer"),
        (json.dumps({"type": 0, "data": {}}), 101, 0, "`data.user_id`"),
        (json.dumps({"type": 0}), 101, 0, "`data.user_id`"),
        (json.dumps({"type": 0, "data": {"user_id": 7}}), 102, 0, "`data.user_id` must be a string"),
        (json.dumps({"type": 2, "data": {"user_id": user}}), 101, 2, "`data.session_id`"),
        (json.dumps({"type": 2, "data": {"user_id": user, "session_id": "x"}}), 103, 2, "must be a UUID"),
        (json.dumps({"type": 3, "data": {"user_id": user, "session_id": "NEW", "model_name": "llama3.1:8b"}}),
         101, 3, "`data.message`"),
        (json.dumps({"type": 3, "data": {"user_id": user, "session_id": "NEW", "message": "hi"}}),
         101, 3, "`data.model_name`"),
        (json.dumps({"type": 3, "data": {"user_id": user, "session_id": "NEW", "model_id": "8", "message": "hi"}}),
         102, 3, "`data.model_id` must be an integer"),
        (json.dumps({"type": 3, "data": {"user_id": user, "session_id": "NEW", "model_id": 8, "message": "  "}}),
         103, 3, "`data.message` must not be empty"),
        (json.dumps({"type": 3, "data": {"user_id": user, "session_id": "NEW", "model_id": 8,
                                         "message": "x" * 40_000}}), 105, 3, "`data.message` is too long"),
        (json.dumps({"type": 4, "data": {"user_id": user, "session_id": ["a"]}}), 102, 4, "must be a string"),
    ]
    for raw, code, type_, text in cases:
        await client.send_raw(raw)
        assert_error(await client.recv(), code, type_, text)
    # a binary frame holding JSON is read like a text one
    await client.socket.send(json.dumps({"type": 6, "data": {"user_id": user}}).encode())
    assert assert_ok(await client.recv(), 6) == {"balance": 1.0}
    # still the same, working socket
    assert assert_ok(await client.request(0, user_id=user), 0)["user_id"] == user


async def test_turns_sessions_chats_and_balance(stack: Stack, client: Client) -> None:
    user = new_user(stack)
    first = assert_ok(await client.chat(user, "NEW", "What is the capital of France?"), 3)
    session = first["session_id"]
    uuid.UUID(session)
    assert first["user_id"] == user
    assert first["session_name"] == "What is the capital"
    assert first["message"].startswith("Echo: What is the capital of France?")
    assert "History: 0 entries" in first["message"]

    second = assert_ok(await client.chat(user, session, "And of Italy?", model_id=8), 3)
    assert second["session_id"] == session and second["session_name"] == "What is the capital"
    assert "History: 2 entries; last: assistant: Echo: What is the capital" in second["message"]
    assert "Prompt: be brief" in second["message"]

    other = assert_ok(await client.chat(user, "NEW", "Supercalifragilisticexpialidocious"), 3)
    listed = assert_ok(await client.request(1, user_id=user), 1)
    assert listed["session_info"] == [
        {"session_id": other["session_id"], "session_name": "Supercalifragilistic"},
        {"session_id": session, "session_name": "What is the capital"},
    ]

    chats = assert_ok(await client.request(2, user_id=user, session_id=session), 2)
    assert chats["user_id"] == user and chats["session_id"] == session
    assert isinstance(chats["chat"], str)  # the UI calls JSON.parse on it
    chat = json.loads(chats["chat"])
    assert [e["role"] for e in chat] == ["user", "assistant", "user", "assistant"]
    assert chat[0]["content"] == "What is the capital of France?"
    assert chat[1]["content"] == first["message"] and chat[3]["content"] == second["message"]
    assert set(chat[0]) == {"role", "content"}

    # three turns were debited, each exactly once, and nothing is left reserved
    money = balance_of(stack, user)
    assert money["reserved_nanos"] == 0
    assert 0 < 1_000_000_000 - money["balance_nanos"] < 1_000_000_000
    assert assert_ok(await client.request(6, user_id=user), 6)["balance"] == pytest.approx(money["balance"])
    ledger = stack.admin("GET", f"/v1/users/{user}/ledger?limit=100")["items"]
    settles = [e for e in ledger if e["kind"] == "settle"]
    assert len(settles) == 3 and len({e["turn_id"] for e in settles}) == 3


async def test_model_not_granted_and_no_balance_refuse_before_anything_is_created(
    stack: Stack, client: Client
) -> None:
    limited = new_user(stack, models=[4, 5])
    assert_error(await client.chat(limited, "NEW", "hello there"), 7, 3, "User Does Not Have Model Access")
    assert_error(await client.chat(limited, "NEW", "hello there", model_name="gpt-4"), 7, 3)
    assert_error(await client.chat(limited, "NEW", "hello", model_name="no-such-model"), 7, 3)
    broke = new_user(stack, balance=0)
    assert_error(await client.chat(broke, "NEW", "hello there"), 15, 3, "Insufficient balance")
    for user in (limited, broke):
        assert assert_ok(await client.request(1, user_id=user), 1)["session_info"] == []
        assert balance_of(stack, user)["reserved_nanos"] == 0


async def test_another_users_session_is_invisible(stack: Stack, client: Client) -> None:
    owner, intruder = new_user(stack), new_user(stack)
    session = assert_ok(await client.chat(owner, "NEW", "my secret plan"), 3)["session_id"]
    missing = str(uuid.uuid4())
    for target in (session, missing):
        assert_error(await client.request(2, user_id=intruder, session_id=target), 9, 2, "Unable to Load Chats")
        assert_error(await client.chat(intruder, target, "let me in"), 5, 3, "Unable to Load Session")
        assert_error(await client.request(4, user_id=intruder, session_id=target), 10, 4, "Unable to Delete Session")
    assert assert_ok(await client.request(1, user_id=intruder), 1)["session_info"] == []
    # the owner's session is untouched, and the intruder was never charged
    chat = json.loads(assert_ok(await client.request(2, user_id=owner, session_id=session), 2)["chat"])
    assert len(chat) == 2
    assert balance_of(stack, intruder)["balance_nanos"] == 1_000_000_000


async def test_delete_session(stack: Stack, client: Client) -> None:
    user = new_user(stack)
    keep = assert_ok(await client.chat(user, "NEW", "keep this one"), 3)["session_id"]
    drop = assert_ok(await client.chat(user, "NEW", "drop this one"), 3)["session_id"]
    redis = Redis.from_url(stack.infra.redis_url)
    try:
        assert await redis.exists(f"ctx:{drop}")
        assert assert_ok(await client.request(4, user_id=user, session_id=drop), 4) == {"user_id": user}
        assert not await redis.exists(f"ctx:{drop}")
    finally:
        await redis.aclose()
    listed = assert_ok(await client.request(1, user_id=user), 1)["session_info"]
    assert [s["session_id"] for s in listed] == [keep]
    assert_error(await client.request(2, user_id=user, session_id=drop), 9, 2)
    assert_error(await client.chat(user, drop, "still there?"), 5, 3)
    assert_error(await client.request(4, user_id=user, session_id=drop), 10, 4)


async def test_session_names(stack: Stack, client: Client) -> None:
    user = new_user(stack)
    cases = {
        "abcdefghijklmnopqrstuvwxyz no space early": "abcdefghijklmnopqrst",
        "exactly twenty chars": "exactly twenty chars",
        "ünïcödé wörds ünd mörë wörds": "ünïcödé wörds ünd",
        "漢字漢字漢字漢字漢字漢字漢字漢字漢字漢字漢字漢字": "漢字漢字漢字漢字漢字漢字漢字漢字漢字漢字",
        "😀 " * 15: "😀 😀 😀 😀 😀 😀 😀 😀 😀 😀",
    }
    for message, name in cases.items():
        reply = assert_ok(await client.chat(user, "NEW", message), 3)
        assert reply["session_name"] == name
    stored = {s["session_name"] for s in assert_ok(await client.request(1, user_id=user), 1)["session_info"]}
    assert stored == set(cases.values())
    for blank in ("", "   ", "\n\t"):
        assert_error(await client.chat(user, "NEW", blank), 103, 3, "`data.message` must not be empty")
    assert len(assert_ok(await client.request(1, user_id=user), 1)["session_info"]) == len(cases)


async def test_many_sockets_and_no_tracebacks(stack: Stack) -> None:
    user = new_user(stack)
    gateway = start_gateway(stack)  # its own log: nobody else's requests in it

    async def one() -> None:
        async with connect(ws_url(gateway)) as c:
            for raw in ("{", "[1]", json.dumps({"type": 9}), json.dumps({"type": 3, "data": {"message": 5}})):
                await c.send_raw(raw)
                assert "error" in await c.recv()
            assert assert_ok(await c.request(6, user_id=user), 6)["balance"] == 1.0

    await asyncio.gather(*(one() for _ in range(20)))
    log = gateway.log_path.read_text(errors="replace")
    assert "Traceback" not in log and '"exc":' not in log
    assert '"level": "error"' not in log
    gateway.stop()


async def test_metrics_are_exported(stack: Stack, client: Client) -> None:
    user = new_user(stack)
    assert_ok(await client.chat(user, "NEW", "count me"), 3)
    await client.send_raw("nope")
    await client.recv()
    with urllib.request.urlopen(f"{stack.gateway_url}/metrics", timeout=5) as response:
        text = response.read().decode()
    assert re.search(r'^chat_turns_total\{outcome="ok"\} [1-9]', text, re.M)
    assert re.search(r'^chat_errors_total\{code="0"\} [1-9]', text, re.M)
    assert re.search(r"^chat_turn_seconds_count [1-9]", text, re.M)
    assert re.search(r'^chat_ai_seconds_count\{rpc="process"\} [1-9]', text, re.M)
    assert re.search(r"^chat_open_sockets [1-9]", text, re.M)
