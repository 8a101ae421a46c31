"""The gateway rides out its dependencies restarting, on the same process: the AI service
(a turn fails cleanly while it is down, charges nothing, and works again after), Redis (the
context is rebuilt from the sessions service) and the S3 store (uploads work again)."""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx

from devstack.servers import RedisServer, S3Server, free_port
from devstack.stack import Stack

from .conftest import (
    assert_error,
    assert_ok,
    balance_of,
    connect,
    new_user,
    start_gateway,
    ws_url,
)


async def _turn(stack: Stack, user: str, session: str, message: str) -> dict:
    async with connect(stack.ws_url) as client:
        return await client.chat(user, session, message)


async def test_ai_service_restart(stack: Stack) -> None:
    user = new_user(stack)
    session = assert_ok(await _turn(stack, user, "NEW", "before the restart"), 3)["session_id"]
    spent = balance_of(stack, user)["balance_nanos"]
    ai = stack.services["ai"]
    ai.stop()
    try:
        assert_error(await _turn(stack, user, session, "while it is down"), 6, 3,
                     "Unable to Receive Response To Query")
        money = balance_of(stack, user)
        assert money["balance_nanos"] == spent and money["reserved_nanos"] == 0
    finally:
        ai.start()
    deadline = time.monotonic() + 20
    while True:
        reply = await _turn(stack, user, session, "after the restart")
        if "error" not in reply or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)  # the gateway's channel reconnects with backoff
    assert_ok(reply, 3)
    async with connect(stack.ws_url) as client:
        chat = json.loads(assert_ok(await client.request(2, user_id=user, session_id=session), 2)["chat"])
    assert [e["content"] for e in chat if e["role"] == "user"] == ["before the restart", "after the restart"]


async def test_redis_restart_loses_nothing(stack: Stack, private_dir: Path) -> None:
    # a Redis and a gateway of its own: restarting the shared Redis would leave every other
    # process of this worker's stack a pool of closed connections for later tests to run into
    redis = RedisServer("redis-restarted", free_port(), private_dir / "redis").start()
    gateway = start_gateway(stack, REDIS_URL=redis.url())
    try:
        async with connect(ws_url(gateway)) as client:
            user = new_user(stack)
            session = assert_ok(await client.chat(user, "NEW", "first words"), 3)["session_id"]
        redis.stop()  # keeps nothing on disk: every cached context is gone
        redis.start()
        async with connect(ws_url(gateway)) as client:
            reply = assert_ok(await client.chat(user, session, "second words"), 3)
        assert "History: 2 entries" in reply["message"]
    finally:
        gateway.stop()
        redis.stop()


async def test_object_store_restart(stack: Stack, s3_server: S3Server) -> None:
    user = new_user(stack)
    form = {"user_id": user, "session_id": "NEW", "model_name": "llama3.1:8b", "session_prompt": ""}
    async with httpx.AsyncClient(timeout=30) as http:
        first = await http.post(f"{stack.gateway_url}/upload", data=form,
                                files={"file": ("a.txt", b"before", "text/plain")})
        assert first.status_code == 202, first.text
        # a crash and a restart: SIGKILL (a stop is TERM, then KILL half a second later, and
        # SeaweedFS killed in the middle of its TERM shutdown often takes ~13 s more to accept
        # writes again)
        s3_server.kill()
        s3_server.start()
        second = await http.post(f"{stack.gateway_url}/upload", data=form,
                                 files={"file": ("b.txt", b"after", "text/plain")})
        assert second.status_code == 202, second.text
        for reply, body in ((first, b"before"), (second, b"after")):
            name = reply.json()["data"]["fileName"]
            download = await http.get(f"{stack.gateway_url}/uploads/{name}", params={"user_id": user})
            assert download.content == body
