"""A stored turn is charged even when billing is down at settle time and the gateway that owed
the charge then dies: what the turn owes was committed with its entries (the sessions outbox),
and another replica's worker settles it, exactly once."""
from __future__ import annotations

import asyncio
import time
from typing import Any

from devstack.stack import Stack

from .conftest import (
    PROCESS_COST_NANOS,
    StandInAI,
    assert_ok,
    connect,
    internal,
    new_user,
    start_gateway,
    ws_url,
)


def _owed_by(stack: Stack, user: str) -> list[dict[str, Any]]:
    page = internal(stack, "sessions", "GET", "/v1/outbox?older_than_seconds=0&limit=500")
    return [item for item in page["items"] if item["charge"]["user_id"] == user]


async def test_owed_charge_survives_the_gateway(stack: Stack, stand_in_ai: StandInAI) -> None:
    user = new_user(stack)
    owing = start_gateway(stack, stand_in_ai.port, OUTBOX_SWEEP_SECONDS="3600")
    billing = stack.services["billing"]
    try:
        async with connect(ws_url(owing)) as client:
            await client.send(3, user_id=user, session_id="NEW", model_name="llama3.1:8b",
                              message="slow:1.5 who pays for this", session_prompt="", file_name="")
            await asyncio.sleep(0.5)  # reserved; the AI is answering
            billing.stop()
            reply = assert_ok(await client.recv(timeout=30), 3)  # stored, so the client hears success
        owing.kill()  # and the process that owed the charge is gone
    finally:
        owing.kill()
        if billing.process is None or billing.process.poll() is not None:
            billing.start()

    owed = _owed_by(stack, user)
    assert len(owed) == 1
    charge = owed[0]["charge"]
    assert charge["kind"] == "turn" and charge["key"] == f"turn:{charge['turn_id']}"
    assert charge["session_id"] == reply["session_id"] and charge["cost_nanos"] > 0
    ledger = stack.admin("GET", f"/v1/users/{user}/ledger?limit=50")["items"]
    assert [row["kind"] for row in ledger].count("settle") == 0

    replica = start_gateway(stack, stand_in_ai.port, OUTBOX_SWEEP_SECONDS="0.3", OUTBOX_GRACE_SECONDS="0")
    try:
        deadline = time.monotonic() + 20
        while _owed_by(stack, user) and time.monotonic() < deadline:
            await asyncio.sleep(0.3)
        assert _owed_by(stack, user) == []
    finally:
        replica.stop()
    ledger = stack.admin("GET", f"/v1/users/{user}/ledger?limit=50")["items"]
    settles = [row for row in ledger if row["kind"] == "settle"]
    assert len(settles) == 1 and settles[0]["turn_id"] == charge["turn_id"]
    money = stack.admin("GET", f"/v1/users/{user}/balance")
    assert money["reserved_nanos"] == 0
    assert money["balance_nanos"] == 1_000_000_000 - charge["cost_nanos"]
    assert reply["message"] == "reply to: slow:1.5 who pays for this"


async def test_a_replayed_charge_is_not_charged_twice(stack: Stack, stand_in_ai: StandInAI) -> None:
    """The worker re-sends turns the turn settled itself; billing answers 'already'."""
    user = new_user(stack)
    gateway = start_gateway(stack, stand_in_ai.port, OUTBOX_SWEEP_SECONDS="0.2", OUTBOX_GRACE_SECONDS="0")
    try:
        async with connect(ws_url(gateway)) as client:
            session = assert_ok(await client.chat(user, "NEW", "one"), 3)["session_id"]
            assert_ok(await client.chat(user, session, "two"), 3)
        deadline = time.monotonic() + 20
        while _owed_by(stack, user) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert _owed_by(stack, user) == []
    finally:
        gateway.stop()
    ledger = stack.admin("GET", f"/v1/users/{user}/ledger?limit=50")["items"]
    assert [row["kind"] for row in ledger].count("settle") == 2
    money = stack.admin("GET", f"/v1/users/{user}/balance")
    assert money["reserved_nanos"] == 0
    assert money["balance_nanos"] == 1_000_000_000 - 2 * PROCESS_COST_NANOS
