"""Balance-aware turns over real processes (issue 14): off by default (a balance or a daily limit
below the usual reservation is refused as before); switched on with ``chat-admin balance-aware``,
the same turn reserves what is left, the AI is asked for that many output tokens and answers
shorter, the charge is within what was left, the balance never negative and equal to its ledger;
below the floor (BALANCE_AWARE_MIN_OUTPUT_TOKENS) refused. And a charge settled from the sessions
outbox (the inline settle failed) has a complete receipt: tokens and window."""
from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest

from chat_common.aiproto import ai_service_pb2 as pb
from devstack.servers import ServiceProcess
from devstack.stack import Stack

from .conftest import (
    StandInAI,
    assert_error,
    assert_ok,
    balance_of,
    connect,
    new_user,
    start_gateway,
    ws_url,
)

INSUFFICIENT_BALANCE, DAILY = 15, 109
LLAMA = 8
PROMPT = "be brief"  # conftest's Client.chat sends it
FLOOR = 64  # the gateway's default BALANCE_AWARE_MIN_OUTPUT_TOKENS
RESERVE_OUTPUT = 1024  # the gateway's default RESERVE_OUTPUT_TOKENS
# 300 short words: the offline provider's reply echoes them, so it is over 300 tokens long
MESSAGE = " ".join(f"w{i}" for i in range(300))


def gateway_url(stack: Stack) -> str:
    return f"{stack.url('gateway').replace('http', 'ws', 1)}/ws"


def chat_admin(stack: Stack, *args: str) -> tuple[int, Any, str]:
    env = {**os.environ, "SERVICE_TOKEN": stack.service_token, "BILLING_URL": stack.url("billing")}
    result = subprocess.run(
        [sys.executable, "-m", "chat_billing.cli", *args], env=env, capture_output=True, text=True, timeout=60
    )
    return result.returncode, json.loads(result.stdout) if result.returncode == 0 else None, result.stderr


def ledger(stack: Stack, user_id: str) -> list[dict[str, Any]]:
    return stack.admin("GET", f"/v1/users/{user_id}/ledger?limit=500")["items"]


def receipts(stack: Stack, user_id: str) -> list[dict[str, Any]]:
    return stack.admin("GET", f"/v1/users/{user_id}/receipts?limit=1000")["items"]


def prices(stack: Stack, model_id: int = LLAMA) -> tuple[int, int]:
    model = next(m for m in stack.admin("GET", "/v1/models")["models"] if m["model_id"] == model_id)
    return model["input_price_nanos_per_1k"], model["output_price_nanos_per_1k"]


def held_for(stack: Stack, output_tokens: int, message: str = MESSAGE) -> int:
    """The gateway's hold for a first turn of ``message`` asking for ``output_tokens``: its input
    estimate is a quarter of the characters of prompt and message (chat/turn.py estimate_tokens)."""
    estimate = max(1, (len(PROMPT) + len(message)) // 4)
    input_price, output_price = prices(stack)
    return math.ceil((estimate * input_price + output_tokens * output_price) / 1000)


def assert_books_balance(stack: Stack, user_id: str) -> dict[str, Any]:
    money = balance_of(stack, user_id)
    rows = ledger(stack, user_id)
    assert money["balance_nanos"] >= 0 and all(row["balance_after_nanos"] >= 0 for row in rows)
    assert money["balance_nanos"] == sum(row["amount_nanos"] for row in rows)
    assert money["reserved_nanos"] == 0
    return money


def switch(stack: Stack, *args: str) -> Any:
    code, shown, err = chat_admin(stack, "balance-aware", *args)
    assert code == 0, err
    return shown


async def turn(url: str, user_id: str, message: str = MESSAGE, session_id: str = "NEW") -> dict[str, Any]:
    async with connect(url) as client:
        return await client.chat(user_id, session_id, message)


async def full_reply(url: str, stack: Stack, message: str = MESSAGE) -> str:
    """What the offline AI answers to a first turn of ``message`` when nothing is short."""
    rich = new_user(stack, balance=5.0)
    return assert_ok(await turn(url, rich, message), 3)["message"]


async def test_a_low_balance_off_is_refused_and_on_gets_a_shorter_reply_within_what_was_left(stack: Stack) -> None:
    url = gateway_url(stack)
    whole = await full_reply(url, stack)
    assert len(whole.split()) > 300
    room = 120  # output tokens the balance leaves room for beside the input estimate
    left = held_for(stack, room)
    assert left < held_for(stack, RESERVE_OUTPUT)  # below the usual reservation
    user = new_user(stack, balance=left / 1e9)
    assert balance_of(stack, user)["balance_nanos"] == left
    before = ledger(stack, user)

    # off (the default): refused as before, nothing left behind
    shown = switch(stack, "--user-id", user)
    assert shown["enabled"] is None and not any(m["balance_aware"] for m in shown["models"])
    assert_error(await turn(url, user), INSUFFICIENT_BALANCE, 3)
    assert ledger(stack, user) == before

    # on: answered, shorter: the first `room` tokens of the reply it would have had
    shown = switch(stack, "--user-id", user, "on")
    assert shown["enabled"] is True and all(m["balance_aware"] for m in shown["models"])
    reply = assert_ok(await turn(url, user), 3)["message"]
    assert len(reply.split()) == room and whole.startswith(reply)
    money = assert_books_balance(stack, user)
    [settle] = [row for row in ledger(stack, user) if row["kind"] == "settle"]
    [reserve] = [row for row in ledger(stack, user) if row["kind"] == "reserve"]
    assert -reserve["amount_nanos"] <= left
    assert 0 < settle["charged_nanos"] <= -reserve["amount_nanos"] <= left
    assert money["balance_nanos"] == left - settle["charged_nanos"]
    [receipt] = receipts(stack, user)
    assert receipt["output_tokens"] == room and receipt["charged_nanos"] == settle["charged_nanos"]

    # off again: the next turn, short of the usual reservation, is refused
    switch(stack, "--user-id", user, "off")
    assert_error(await turn(url, user), INSUFFICIENT_BALANCE, 3)


async def test_below_the_floor_a_balance_aware_turn_is_refused(stack: Stack) -> None:
    url = gateway_url(stack)
    user = new_user(stack, balance=held_for(stack, FLOOR - 10) / 1e9)
    switch(stack, "--user-id", user, "on")
    before, money = ledger(stack, user), balance_of(stack, user)
    assert_error(await turn(url, user), INSUFFICIENT_BALANCE, 3)
    assert ledger(stack, user) == before and balance_of(stack, user) == money
    async with connect(url) as client:
        assert assert_ok(await client.request(1, user_id=user), 1)["session_info"] == []  # "NEW" created nothing
    # at the floor exactly it is answered, with a reply of FLOOR tokens
    top_up = held_for(stack, FLOOR) - money["balance_nanos"]
    stack.admin("POST", f"/v1/users/{user}/credit", {"amount_nanos": top_up, "idempotency_key": f"t:{user}"})
    reply = assert_ok(await turn(url, user), 3)["message"]
    assert len(reply.split()) == FLOOR
    assert_books_balance(stack, user)


async def test_a_daily_limit_behaves_the_same_way(stack: Stack) -> None:
    url = gateway_url(stack)
    whole = await full_reply(url, stack)
    user = new_user(stack, balance=5.0)
    room = 100
    limit = held_for(stack, room)
    code, _, err = chat_admin(stack, "set-limits", "--user-id", user, "--daily", f"{limit / 1e9:.9f}")
    assert code == 0, err
    before = ledger(stack, user)
    assert_error(await turn(url, user), DAILY, 3)
    assert ledger(stack, user) == before

    switch(stack, "--user-id", user, "on")
    reply = assert_ok(await turn(url, user), 3)["message"]
    assert len(reply.split()) == room and whole.startswith(reply)
    _, limits, _ = chat_admin(stack, "limits", "--user-id", user)
    assert 0 < limits["daily"]["spent_nanos"] <= limits["daily"]["limit_nanos"] == limit
    assert limits["daily"]["held_nanos"] == 0
    assert_books_balance(stack, user)
    # what the day has left now is below the floor: refused with the limit's code
    assert_error(await turn(url, user), DAILY, 3)


async def test_a_streamed_balance_aware_turn_is_cut_the_same_way(stack: Stack) -> None:
    url = gateway_url(stack)
    whole = await full_reply(url, stack)
    room = 90
    user = new_user(stack, balance=held_for(stack, room) / 1e9)
    switch(stack, "--user-id", user, "on")
    async with connect(url) as client:
        await client.send(3, user_id=user, session_id="NEW", model_name="llama3.1:8b", message=MESSAGE,
                          session_prompt=PROMPT, file_name="", stream=True)
        deltas: list[str] = []
        while (frame := await client.recv())["type"] == 7:
            assert "error" not in frame, frame
            deltas.append(frame["data"]["delta"])
    reply = assert_ok(frame, 3)
    assert reply["finish_reason"] == "stop" and reply["message"] == "".join(deltas)
    assert len(reply["message"].split()) == room and whole.startswith(reply["message"])
    [receipt] = receipts(stack, user)
    assert receipt["output_tokens"] == room
    assert_books_balance(stack, user)


async def test_racing_balance_aware_turns_never_take_more_than_the_balance(stack: Stack) -> None:
    second: ServiceProcess = start_gateway(stack)
    try:
        urls = [gateway_url(stack), ws_url(second)]
        start = 2 * held_for(stack, RESERVE_OUTPUT) + held_for(stack, 200)  # two full holds and a bit
        user = new_user(stack, balance=start / 1e9)
        switch(stack, "--user-id", user, "on")

        async def one(index: int) -> dict[str, Any]:
            async with connect(urls[index % 2]) as client:
                return await client.chat(user, "NEW", f"r{index} {MESSAGE}")

        replies = await asyncio.gather(*(one(i) for i in range(12)))
    finally:
        second.stop()
    admitted = [r for r in replies if "error" not in r]
    refused = [r for r in replies if "error" in r]
    assert admitted and refused and all(r["code"] == INSUFFICIENT_BALANCE for r in refused), replies
    rows = ledger(stack, user)
    holds = {r["reservation_id"]: -r["amount_nanos"] for r in rows if r["kind"] == "reserve"}
    settles = [r for r in rows if r["kind"] == "settle"]
    assert len(settles) == len(holds) == len(admitted)
    assert all(r["charged_nanos"] <= holds[r["reservation_id"]] for r in settles)
    assert sum(r["charged_nanos"] for r in settles) <= start
    money = assert_books_balance(stack, user)
    assert money["balance_nanos"] == start - sum(r["charged_nanos"] for r in settles)


# -- what the AI was asked (a stand-in that records it) ------------------------------------------


@dataclass
class CappedAI(StandInAI):
    """Records each Process call's max_output_tokens (None: unset) and honours it: the reply is
    ``reply to: <message>`` cut to that many words, priced from the request's prices."""

    caps: dict[str, int | None] = field(default_factory=dict)

    def Process(self, request: pb.Request, context: grpc.ServicerContext) -> pb.Response:
        if request.chat_message.startswith("Current summary:\n"):
            return super().Process(request, context)
        cap = request.max_output_tokens if request.HasField("max_output_tokens") else None
        with self.lock:
            self.caps[request.chat_message.split()[0]] = cap
        words = f"reply to: {request.chat_message}".split()
        if cap is not None:
            words = words[:cap]
        used_in = len(request.session_prompt.split()) + len(request.chat_message.split())
        cost = math.ceil((used_in * request.input_price_nanos_per_1k
                          + len(words) * request.output_price_nanos_per_1k) / 1000)
        return pb.Response(response_text=" ".join(words), cost_nanos=cost, input_tokens=used_in,
                           output_tokens=len(words))


@pytest.fixture(scope="module")
def capped_ai() -> Iterator[CappedAI]:
    server = CappedAI().start()
    yield server
    server.stop()


async def test_the_ai_request_carries_max_output_tokens_only_when_the_hold_was_made_smaller(
    stack: Stack, capped_ai: CappedAI
) -> None:
    gateway = start_gateway(stack, capped_ai.port, BALANCE_AWARE_MIN_OUTPUT_TOKENS="16")
    try:
        url = ws_url(gateway)
        rich = new_user(stack, balance=5.0)
        switch(stack, "--user-id", rich, "on")
        assert_ok(await turn(url, rich, "plenty " + MESSAGE), 3)
        poor = new_user(stack, balance=held_for(stack, 40, "short " + MESSAGE) / 1e9)
        switch(stack, "--user-id", poor, "on")
        reply = assert_ok(await turn(url, poor, "short " + MESSAGE), 3)["message"]
        tiny = new_user(stack, balance=held_for(stack, 10, "tiny " + MESSAGE) / 1e9)
        switch(stack, "--user-id", tiny, "on")
        assert_error(await turn(url, tiny, "tiny " + MESSAGE), INSUFFICIENT_BALANCE, 3)  # below this gateway's 16
    finally:
        gateway.stop()
    assert capped_ai.caps["plenty"] is None  # a full hold: the provider's own limit
    assert capped_ai.caps["short"] == 40 and len(reply.split()) == 40
    assert "tiny" not in capped_ai.caps  # refused before the AI was called
    [settle] = [row for row in ledger(stack, poor) if row["kind"] == "settle"]
    [reserve] = [row for row in ledger(stack, poor) if row["kind"] == "reserve"]
    assert settle["charged_nanos"] <= -reserve["amount_nanos"]
    assert_books_balance(stack, poor)


async def test_a_balance_aware_model_and_a_users_off(stack: Stack) -> None:
    url = gateway_url(stack)
    model = 9100 + int(time.time() * 1000) % 800
    input_price, output_price = prices(stack)
    code, _, err = chat_admin(stack, "set-model", "--model-id", str(model), "--name", f"aware-{model}",
                              "--provider", "ollama", "--context-length", "4096",
                              "--input-price", f"{input_price / 1e9:.9f}", "--output-price", f"{output_price / 1e9:.9f}")
    assert code == 0, err
    left = held_for(stack, 100)
    on = new_user(stack, models=[model], balance=left / 1e9)
    off = new_user(stack, models=[model], balance=left / 1e9)
    shown = switch(stack, "--model-id", str(model), "on")
    assert shown["enabled"] is True
    switch(stack, "--user-id", off, "off")

    async def ask(user: str) -> dict[str, Any]:
        async with connect(url) as client:
            return await client.chat(user, "NEW", MESSAGE, model_name=f"aware-{model}")

    assert len(assert_ok(await ask(on), 3)["message"].split()) == 100
    assert_error(await ask(off), INSUFFICIENT_BALANCE, 3)
    code, _, err = chat_admin(stack, "balance-aware", "--model-id", str(model), "default")
    assert code != 0 and json.loads(err)["error"]["code"] == "bad_request"
    switch(stack, "--model-id", str(model), "off")
    assert_books_balance(stack, on)


# -- a charge settled from the outbox has a complete receipt -------------------------------------


class RefusingSettles:
    """An HTTP proxy in front of billing that answers every inline settle
    (``POST /v1/reservations/{id}/settle``) 503 and passes everything else through, so a turn
    is stored with its charge owed and only the outbox can settle it."""

    def __init__(self, target: str) -> None:
        self.target = target.rstrip("/")
        self.refused = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if self.command == "POST" and self.path.startswith("/v1/reservations/") and "/settle" in self.path:
                    proxy.refused += 1
                    self._answer(503, b'{"error":{"code":"unavailable","message":"billing is away"}}',
                                 "application/json")
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                request = urllib.request.Request(f"{proxy.target}{self.path}", data=body or None,
                                                 method=self.command, headers=headers)
                try:
                    with urllib.request.urlopen(request, timeout=30) as response:
                        self._answer(response.status, response.read(), response.headers.get("content-type", ""))
                except urllib.error.HTTPError as error:
                    self._answer(error.code, error.read(), error.headers.get("content-type", ""))

            def _answer(self, status: int, payload: bytes, content_type: str) -> None:
                self.send_response(status)
                if content_type:
                    self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = _forward

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def test_a_charge_settled_from_the_outbox_has_tokens_and_window_on_its_receipt(stack: Stack) -> None:
    proxy = RefusingSettles(stack.url("billing"))
    gateway: ServiceProcess | None = None
    try:
        gateway = start_gateway(stack, BILLING_URL=proxy.url, OUTBOX_SWEEP_SECONDS="0.3", OUTBOX_GRACE_SECONDS="1")
        user = new_user(stack, balance=5.0)
        async with connect(ws_url(gateway)) as client:
            session = assert_ok(await client.chat(user, "NEW", "hello outbox"), 3)["session_id"]
            assert_ok(await client.chat(user, session, "and a second turn"), 3)
        assert proxy.refused >= 2
        deadline = time.monotonic() + 30
        while len(receipts(stack, user)) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.3)
    finally:
        if gateway is not None:
            gateway.stop()
        proxy.stop()
    settles = [row for row in ledger(stack, user) if row["kind"] == "settle"]
    # settled by the outbox's charge (its key), not by the turn's own settle
    assert sorted(row["idempotency_key"] for row in settles) == sorted(f"turn:{row['turn_id']}" for row in settles)
    first, second = sorted(receipts(stack, user), key=lambda r: r["first_seq"] is not None)
    for receipt in (first, second):
        assert receipt["kind"] == "turn" and receipt["session_id"] == session
        assert receipt["input_tokens"] > 0 and receipt["output_tokens"] > 0
        assert receipt["summarized_upto"] == 0 and len(receipt["prompt_sha256"]) == 64
        assert receipt["charged_nanos"] == receipt["cost_nanos"] > 0
    assert (first["first_seq"], first["last_seq"]) == (None, None)  # the first turn saw no history
    assert (second["first_seq"], second["last_seq"]) == (0, 1)
    assert_books_balance(stack, user)
