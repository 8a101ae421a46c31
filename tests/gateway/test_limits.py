"""Spending limits over real processes (issue 14): per session, per UTC day, cleared, set and
shown with ``chat-admin``, and a race of 30 sockets against a daily limit on two gateways."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from typing import Any

from devstack.servers import ServiceProcess
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

DAILY, MONTHLY, PER_SESSION = 109, 110, 111
LLAMA = 8


def chat_admin(stack: Stack, *args: str) -> tuple[int, Any, str]:
    env = {**os.environ, "SERVICE_TOKEN": stack.service_token, "BILLING_URL": stack.url("billing")}
    result = subprocess.run(
        [sys.executable, "-m", "chat_billing.cli", *args], env=env, capture_output=True, text=True, timeout=60
    )
    out = json.loads(result.stdout) if result.returncode == 0 else None
    return result.returncode, out, result.stderr


def ledger(stack: Stack, user_id: str) -> list[dict[str, Any]]:
    return stack.admin("GET", f"/v1/users/{user_id}/ledger?limit=500")["items"]


def gateway_url(stack: Stack) -> str:
    return f"{stack.url('gateway').replace('http', 'ws', 1)}/ws"


async def new_session(url: str, user_id: str, text: str = "hello there") -> str:
    async with connect(url) as client:
        return assert_ok(await client.chat(user_id, "NEW", text), 3)["session_id"]


async def turn(url: str, user_id: str, session_id: str, text: str = "and again") -> dict[str, Any]:
    async with connect(url) as client:
        return await client.chat(user_id, session_id, text)


async def test_a_per_session_limit_refuses_that_session_only(stack: Stack) -> None:
    url = gateway_url(stack)
    user = new_user(stack, balance=5.0)
    first, second = await new_session(url, user), await new_session(url, user)
    # an open hold of $0.009 on the first session (made through the API, like a turn's)
    hold = stack.admin("POST", "/v1/reservations", {
        "user_id": user, "model_id": LLAMA, "input_tokens": 6000, "output_tokens": 0,
        "idempotency_key": f"test:{uuid.uuid4()}", "turn_id": str(uuid.uuid4()), "session_id": first,
    })
    assert hold["amount_nanos"] == 9_000_000
    code, limits, err = chat_admin(stack, "set-limits", "--user-id", user, "--per-session", "0.01")
    assert code == 0, err
    assert limits["per_session"]["limit_nanos"] == 10_000_000
    assert limits["daily"]["limit"] is None and limits["monthly"]["limit"] is None
    code, shown, err = chat_admin(stack, "limits", "--user-id", user, "--session-id", first)
    assert code == 0, err
    assert shown["per_session"]["held_nanos"] == 9_000_000 and shown["per_session"]["session_id"] == first

    before_ledger, before_balance = ledger(stack, user), balance_of(stack, user)
    reply = await turn(url, user, first)
    assert_error(reply, PER_SESSION, 3, "Session spending limit")
    # nothing left behind: no ledger row, no money moved, no entry stored
    assert ledger(stack, user) == before_ledger and balance_of(stack, user) == before_balance
    async with connect(url) as client:
        history = assert_ok(await client.request(2, user_id=user, session_id=first), 2)
    assert len(json.dumps(history)) > 0
    # the user's other session, a new session and another user are not affected
    assert_ok(await turn(url, user, second), 3)
    await new_session(url, user)
    other = new_user(stack, balance=1.0)
    await new_session(url, other)

    # the hold given back: the session may spend again
    stack.admin("POST", f"/v1/reservations/{hold['reservation_id']}/release",
                {"idempotency_key": f"test:{uuid.uuid4()}", "user_id": user})
    assert_ok(await turn(url, user, first), 3)
    code, shown, _ = chat_admin(stack, "limits", "--user-id", user, "--session-id", first)
    assert shown["per_session"]["held_nanos"] == 0 and shown["per_session"]["spent_nanos"] > 0


async def test_a_daily_limit_refuses_every_session_of_that_user_and_clear_lifts_it(stack: Stack) -> None:
    url = gateway_url(stack)
    user = new_user(stack, balance=5.0)
    other = new_user(stack, balance=5.0)
    first, second = await new_session(url, user), await new_session(url, user)
    spent_before = chat_admin(stack, "limits", "--user-id", user)[1]["daily"]["spent_nanos"]
    charged = sum(row["charged_nanos"] or 0 for row in ledger(stack, user) if row["kind"] == "settle")
    assert spent_before == charged > 0

    # a limit below what one more reservation needs
    code, limits, err = chat_admin(stack, "set-limits", "--user-id", user, "--daily", "0.001")
    assert code == 0, err
    assert limits["daily"]["limit_nanos"] == 1_000_000 and limits["daily"]["spent_nanos"] == spent_before
    before = ledger(stack, user)
    for session in (first, second, "NEW"):
        assert_error(await turn(url, user, session), DAILY, 3, "Daily spending limit")
    assert ledger(stack, user) == before
    async with connect(url) as client:
        sessions = assert_ok(await client.request(1, user_id=user), 1)
    assert len(sessions) == 2, sessions  # the refused "NEW" created nothing
    await new_session(url, other)  # another user is not affected

    # a monthly limit is checked the same way
    code, _, err = chat_admin(stack, "set-limits", "--user-id", user, "--clear", "--monthly", "0.001")
    assert code == 0, err
    assert_error(await turn(url, user, first), MONTHLY, 3, "Monthly spending limit")

    code, cleared, err = chat_admin(stack, "set-limits", "--user-id", user, "--clear")
    assert code == 0, err
    assert cleared["daily"]["limit"] is None and cleared["monthly"]["limit"] is None
    assert_ok(await turn(url, user, first), 3)
    assert_ok(await turn(url, user, second), 3)


def test_chat_admin_limits_help_and_errors(stack: Stack) -> None:
    for command in ("set-limits", "limits"):
        result = subprocess.run([sys.executable, "-m", "chat_billing.cli", command, "--help"],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and "--user-id" in result.stdout
    code, _, err = chat_admin(stack, "limits", "--user-id", str(uuid.uuid4()))
    assert code != 0 and len(err.strip().splitlines()) == 1 and json.loads(err)["error"]["code"] == "not_found"
    user = new_user(stack)
    code, _, err = chat_admin(stack, "set-limits", "--user-id", user)
    assert code != 0 and len(err.strip().splitlines()) == 1
    code, _, err = chat_admin(stack, "set-limits", "--user-id", user, "--daily", "-1")
    assert code != 0 and len(err.strip().splitlines()) == 1
    # limits not named are kept
    chat_admin(stack, "set-limits", "--user-id", user, "--daily", "2")
    code, shown, _ = chat_admin(stack, "set-limits", "--user-id", user, "--per-session", "0.5")
    assert (shown["daily"]["limit"], shown["per_session"]["limit"]) == (2.0, 0.5)


async def test_thirty_sockets_race_a_daily_limit_on_two_gateways(stack: Stack) -> None:
    second_gateway: ServiceProcess = start_gateway(stack)
    try:
        urls = [gateway_url(stack), ws_url(second_gateway)]
        user = new_user(stack, balance=50.0)
        limit_nanos = 5_000_000  # about two reservations (a turn's output alone reserves 1024 tokens)
        code, _, err = chat_admin(stack, "set-limits", "--user-id", user, "--daily", "0.005")
        assert code == 0, err

        async def one(index: int) -> dict[str, Any]:
            async with connect(urls[index % 2]) as client:
                return await client.chat(user, "NEW", f"race {index}")

        replies = await asyncio.gather(*(one(i) for i in range(30)))
        admitted = [r for r in replies if "error" not in r]
        refused = [r for r in replies if "error" in r]
        assert refused, "a daily limit of two reservations let 30 racing turns through"
        assert all(r["code"] == DAILY for r in refused), refused
        assert admitted

        rows = ledger(stack, user)
        settles = [r for r in rows if r["kind"] == "settle"]
        reserves = {r["reservation_id"]: -r["amount_nanos"] for r in rows if r["kind"] == "reserve"}
        assert len(settles) == len(admitted) == len(reserves)
        spent = sum(r["charged_nanos"] for r in settles)
        excess = max(0, max(r["charged_nanos"] - reserves[r["reservation_id"]] for r in settles))
        assert spent <= limit_nanos + excess
        _, shown, _ = chat_admin(stack, "limits", "--user-id", user)
        assert shown["daily"]["spent_nanos"] == spent and shown["daily"]["held_nanos"] == 0
        assert shown["monthly"]["spent_nanos"] == spent
    finally:
        second_gateway.stop()
