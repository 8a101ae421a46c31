"""Receipts and usage over real processes (issue 14): a receipt per charged turn and per summary
fold, written with its charge; usage by day, session and model equal to the ledger exactly."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from typing import Any

from devstack.stack import Stack

from .conftest import assert_ok, connect, internal, new_user

PROMPT = "be brief"  # conftest's Client.chat sends it


def gateway_url(stack: Stack) -> str:
    return f"{stack.url('gateway').replace('http', 'ws', 1)}/ws"


def receipts(stack: Stack, user_id: str, **query: str) -> list[dict[str, Any]]:
    params = "".join(f"&{k}={v}" for k, v in query.items())
    return stack.admin("GET", f"/v1/users/{user_id}/receipts?limit=1000{params}")["items"]


def ledger_charges(stack: Stack, user_id: str) -> list[dict[str, Any]]:
    rows = stack.admin("GET", f"/v1/users/{user_id}/ledger?limit=500")["items"]
    return [r for r in rows if r["kind"] == "settle" or (r["kind"] == "debit" and r["reason"] == "summary")]


def chat_admin(stack: Stack, *args: str) -> Any:
    env = {**os.environ, "SERVICE_TOKEN": stack.service_token, "BILLING_URL": stack.url("billing")}
    result = subprocess.run(
        [sys.executable, "-m", "chat_billing.cli", *args], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


async def test_receipts_of_plain_folding_and_file_turns_and_usage_equal_to_the_ledger(stack: Stack) -> None:
    url = gateway_url(stack)
    user = new_user(stack, balance=5.0)
    async with connect(url) as client:
        first = assert_ok(await client.chat(user, "NEW", "hello receipts"), 3)["session_id"]
        [plain] = receipts(stack, user)
        assert plain["kind"] == "turn" and plain["session_id"] == first
        assert plain["model_name"] == "llama3.1:8b"
        assert plain["input_tokens"] > 0 and plain["output_tokens"] > 0
        assert (plain["first_seq"], plain["last_seq"], plain["summarized_upto"]) == (None, None, 0)
        assert plain["prompt_sha256"] == hashlib.sha256(PROMPT.encode()).hexdigest()
        [settle] = ledger_charges(stack, user)
        assert plain["key"] == plain["turn_id"] == settle["turn_id"]
        assert plain["charged_nanos"] == settle["charged_nanos"] == plain["cost_nanos"] > 0
        assert plain["reservation_id"] == settle["reservation_id"]

        # the second turn saw the first's two entries
        assert_ok(await client.chat(user, first, "and a second"), 3)
        second = receipts(stack, user)[-1]
        assert (second["first_seq"], second["last_seq"]) == (0, 1)

        # turns until a summary fold is charged (the window is 10 entries)
        for index in range(12):
            assert_ok(await client.chat(user, first, f"more words {index}"), 3)
            if any(r["kind"] == "summary" for r in receipts(stack, user)):
                break
        folds = [r for r in receipts(stack, user) if r["kind"] == "summary"]
        assert folds, "no summary fold was charged"
        fold = folds[0]
        upto = fold["summarized_upto"]
        assert fold["key"] == f"summary:{first}:{upto}" and fold["session_id"] == first
        assert (fold["first_seq"], fold["last_seq"]) == (0, upto - 1)
        turn_ids = {r["turn_id"] for r in receipts(stack, user) if r["kind"] == "turn"}
        assert fold["turn_id"] in turn_ids  # attributed to the turn that folded it
        debit = next(r for r in ledger_charges(stack, user) if r["kind"] == "debit")
        assert fold["charged_nanos"] == debit["charged_nanos"] > 0
        # the turn after the fold saw a summary reaching upto
        assert_ok(await client.chat(user, first, "after the fold"), 3)
        assert receipts(stack, user)[-1]["summarized_upto"] >= upto

        # a file-carrying turn in another session
        other = assert_ok(await client.chat(user, "NEW", "a file comes"), 3)["session_id"]
        stored = internal(stack, "files", "POST",
                          f"/v1/sessions/{other}/files?user_id={user}&original_name=notes.txt",
                          raw=b"the number is 42\n")
        assert_ok(await client.chat(user, other, "what is in it?", file_name=stored["file_name"]), 3)
    with_file = receipts(stack, user, session_id=other)
    assert len(with_file) == 2 and with_file[-1]["first_seq"] == 0 and with_file[-1]["charged_nanos"] > 0

    # usage equals the ledger, to the nano-dollar, however grouped
    charges = ledger_charges(stack, user)
    ledger_total = sum(r["charged_nanos"] for r in charges)
    all_receipts = receipts(stack, user)
    assert len(all_receipts) == len(charges)
    total = chat_admin(stack, "usage", "--user-id", user)["total"]
    assert total["spent_nanos"] == ledger_total
    assert total["turns"] == len([r for r in charges if r["kind"] == "settle"])
    assert total["summaries"] == len(folds) >= 1
    assert total["input_tokens"] == sum(r["input_tokens"] or 0 for r in all_receipts)
    for by in ("day", "session", "model"):
        usage = chat_admin(stack, "usage", "--user-id", user, "--by", by)
        assert sum(g["spent_nanos"] for g in usage["groups"]) == usage["total"]["spent_nanos"] == ledger_total
        assert usage["total"]["turns"] == total["turns"]
    by_session = {g["key"]: g for g in chat_admin(stack, "usage", "--user-id", user, "--by", "session")["groups"]}
    assert set(by_session) == {first, other}
    assert by_session[other]["spent_nanos"] == sum(r["charged_nanos"] for r in with_file)
    only_other = chat_admin(stack, "usage", "--user-id", user, "--session-id", other)["total"]
    assert only_other["spent_nanos"] == by_session[other]["spent_nanos"]
    by_model = chat_admin(stack, "usage", "--user-id", user, "--by", "model")["groups"]
    assert [g["key"] for g in by_model] == ["llama3.1:8b"]
    # a window that ends before everything holds nothing
    empty = chat_admin(stack, "usage", "--user-id", user, "--until", "2000-01-01T00:00:00Z")["total"]
    assert empty["spent_nanos"] == 0 and empty["turns"] == 0
    # the limits' spend agrees too
    assert chat_admin(stack, "limits", "--user-id", user)["daily"]["spent_nanos"] == ledger_total


def test_usage_of_an_unknown_user_fails_on_one_line(stack: Stack) -> None:
    env = {**os.environ, "SERVICE_TOKEN": stack.service_token, "BILLING_URL": stack.url("billing")}
    result = subprocess.run(
        [sys.executable, "-m", "chat_billing.cli", "usage", "--user-id", str(uuid.uuid4())],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1
    assert json.loads(result.stderr)["error"]["code"] == "not_found"
