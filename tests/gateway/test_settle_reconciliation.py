"""A stored turn is debited even when billing is down at settle time and the gateway that owed
the debit then dies: another replica replays the pending settle, exactly once."""
from __future__ import annotations

import asyncio
import json
import time

from redis.asyncio import Redis

from devstack.stack import Stack

from .conftest import StandInAI, assert_ok, connect, new_user, start_gateway, ws_url


async def _pending_for(redis: Redis, user: str) -> list[dict]:
    entries = [json.loads(raw) for raw in (await redis.hgetall("settle:pending")).values()]
    return [entry for entry in entries if entry["body"]["user_id"] == user]


async def test_pending_settle_survives_the_gateway(stack: Stack, stand_in_ai: StandInAI) -> None:
    redis = Redis.from_url(stack.infra.redis_url)
    user = new_user(stack)
    owing = start_gateway(stack, stand_in_ai.port, SETTLE_RECONCILE_SECONDS="3600")
    billing = stack.services["billing"]
    try:
        async with connect(ws_url(owing)) as client:
            await client.send(3, user_id=user, session_id="NEW", model_name="llama3.1:8b",
                              message="slow:1.5 who pays for this", session_prompt="", file_name="")
            await asyncio.sleep(0.5)  # reserved; the AI is answering
            billing.stop()
            reply = assert_ok(await client.recv(timeout=30), 3)  # stored, so the client hears success
        owing.kill()  # and the process that owed the debit is gone
        pending = await _pending_for(redis, user)
        assert len(pending) == 1 and pending[0]["body"]["idempotency_key"].startswith("settle:")
    finally:
        owing.kill()
        if billing.process is None or billing.process.poll() is not None:
            billing.start()

    ledger = stack.admin("GET", f"/v1/users/{user}/ledger?limit=50")["items"]
    assert [row["kind"] for row in ledger].count("settle") == 0

    replica = start_gateway(stack, stand_in_ai.port, SETTLE_RECONCILE_SECONDS="0.3",
                            SETTLE_RECONCILE_AFTER_SECONDS="0.3")
    try:
        deadline = time.monotonic() + 20
        while await _pending_for(redis, user) and time.monotonic() < deadline:
            await asyncio.sleep(0.3)
        assert await _pending_for(redis, user) == []
        await asyncio.sleep(1.0)  # more reconciliation rounds change nothing
    finally:
        replica.stop()
    ledger = stack.admin("GET", f"/v1/users/{user}/ledger?limit=50")["items"]
    settles = [row for row in ledger if row["kind"] == "settle"]
    assert len(settles) == 1 and settles[0]["turn_id"] == pending[0]["body"]["turn_id"]
    money = stack.admin("GET", f"/v1/users/{user}/balance")
    assert money["reserved_nanos"] == 0 and money["balance_nanos"] < 1_000_000_000
    await redis.aclose()
    assert reply["message"] == "reply to: slow:1.5 who pays for this"
