"""Harness of the fault tests: a stack whose every part may be SIGKILLed and started again, a load
of WebSocket clients doing type-3 turns, a bounded wait for recovery, and a check of what was
stored and charged against what the clients were told.

What is checked is deterministic (no micro-timing): each client's message text is unique, so
every acknowledged turn can be found in its session; every stored turn carries the gateway's
``turn_id``, so its charge can be found in billing's ledger; and the offline AI provider's reply
names the last history entry it was given ("History: N entries; last: <role>: <first 60
characters of it>"; the messages are short and unique, so the preview identifies the entry), so
each stored turn can be checked to have seen the turn stored right before it. Time appears only
as the functional bounds (a session takes a turn within 15 s of its gateway's death, held money
is back within 60 s) and as deadlines that keep every wait finite.
"""
from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import websockets

from chat_ai.providers.base import one_line
from chat_ai.providers.offline import HISTORY_PREVIEW_CHARS
from devstack.stack import Stack, wait_ready

MODEL = "llama3.1:8b"
PROMPT = "You are under a fault test."
REPLY_TIMEOUT = 20.0  # a reply that takes longer is counted as unknown and the socket is reopened
SOLO_CLIENTS = 12  # each its own user and session
PAIRS = 4  # two clients sharing one session (one user)
BALANCE_DOLLARS = 10_000.0

# The stack's settings for the fault tests. The lock's lease, the hold's lease and billing's
# sweep keep their defaults (10 s, 30 s, 5 s): the bounds asserted here (a session free again
# within 15 s, held money back within 60 s) are promised for the default settings.
FAULT_ENV = {
    "AI_PROVIDER": "offline",
    "LOG_LEVEL": "WARNING",
    "MAX_CHAT_HISTORY_CONTEXT": "10",
    "RATE_LIMIT_REQUESTS": "100000000",
    "MAX_SOCKETS_PER_USER": "100000",
    "S3_BUCKET": "fault-files",
    "SHUTDOWN_GRACE_SECONDS": "2",
    # Recovery on a short clock, so each scenario's wait for it is short: a dead gateway's turn
    # lock lapses in 3 s, a dead turn's hold in 4 s (a live turn renews it every 1.3 s), and
    # owed charges are picked up a second after they were left. The same code paths as the
    # defaults (10 s, 30 s, 10 s), only sooner; the bounds the test asserts stay as stated.
    "TURN_LOCK_LEASE_SECONDS": "3",
    "RESERVATION_LEASE_SECONDS": "4",
    "RESERVATION_SWEEP_SECONDS": "0.5",
    "OUTBOX_GRACE_SECONDS": "1",
    "OUTBOX_SWEEP_SECONDS": "0.5",
}


# --- the stack ---------------------------------------------------------------------------------


def ensure_running(stack: Stack) -> None:
    """Start again any part a previous scenario left dead, then wait for the gateway."""
    order = ["postgres", "redis", "billing", "sessions", "files", "ai", "gateway"]
    parts = stack.parts()
    for name in order + [n for n in parts if n not in order]:
        if name in parts and parts[name].pid is None:
            stack.restart_part(name)
    wait_ready(stack.gateway_url, timeout=60)


def internal_get(stack: Stack, service: str, path: str, **query: Any) -> tuple[int, Any]:
    url = f"{stack.url(service)}{path}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    request = urllib.request.Request(url, headers={"x-service-token": stack.service_token})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None


def internal_get_retrying(stack: Stack, service: str, path: str, *, within: float = 20.0, **query: Any) -> Any:
    """A read that must succeed: retried while the service comes back, then it raises."""
    deadline = time.monotonic() + within
    last: object = None
    while True:
        try:
            status, body = internal_get(stack, service, path, **query)
            if status == 200:
                return body
            last = f"HTTP {status}"
        except OSError as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"{service} GET {path} failed for {within:.0f} s: {last}")
        time.sleep(0.3)


# --- the load ----------------------------------------------------------------------------------


@dataclass
class Session:
    user_id: str
    session_id: str
    successes: list[float] = field(default_factory=list)  # monotonic times of acknowledged turns


@dataclass
class Ack:
    message: str
    session_id: str
    at: float


@dataclass
class Load:
    """``SOLO_CLIENTS`` clients on sessions of their own and ``PAIRS`` pairs sharing one."""

    stack: Stack
    tag: str
    sessions: list[Session] = field(default_factory=list)
    client_sessions: list[Session] = field(default_factory=list)
    acks: list[Ack] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    unknown: int = 0  # requests whose reply never came (socket cut, timeout)
    mismatched: list[str] = field(default_factory=list)  # a success reply that echoes another message
    sent: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task] = field(default_factory=list)
    _counter: int = 0

    @property
    def user_ids(self) -> list[str]:
        return sorted({s.user_id for s in self.sessions})

    def message(self, client: int) -> str:
        self._counter += 1
        return f"{self.tag}-c{client:02d}-n{self._counter:05d}-{uuid.uuid4().hex[:8]}"

    async def setup(self) -> None:
        """Users with plenty of balance and one session each, made by a first ("NEW") turn."""
        users = await asyncio.to_thread(lambda: [
            self.stack.create_user(f"{self.tag}-{i}", [8], BALANCE_DOLLARS) for i in range(SOLO_CLIENTS + PAIRS)
        ])

        async def first_turn(user_id: str, index: int) -> Session:
            async with websockets.connect(self.stack.ws_url, open_timeout=10) as socket:
                message = self.message(index)
                reply = await self._turn(socket, user_id, "NEW", message)
                assert "error" not in reply, f"setup turn failed: {reply}"
                session = Session(user_id, reply["data"]["session_id"], [time.monotonic()])
                self.acks.append(Ack(message, session.session_id, time.monotonic()))
                return session

        self.sessions = list(await asyncio.gather(*(first_turn(u, i) for i, u in enumerate(users))))
        solo, paired = self.sessions[:SOLO_CLIENTS], self.sessions[SOLO_CLIENTS:]
        self.client_sessions = solo + [s for s in paired for _ in range(2)]

    @staticmethod
    async def _turn(socket: Any, user_id: str, session_id: str, message: str) -> dict[str, Any]:
        await socket.send(json.dumps({"type": 3, "data": {
            "user_id": user_id, "session_id": session_id, "model_name": MODEL, "message": message,
            "session_prompt": PROMPT, "file_name": "",
        }}))
        while True:
            raw = await asyncio.wait_for(socket.recv(), REPLY_TIMEOUT)
            reply = json.loads(raw)
            if reply.get("type") in (3, None) or "error" in reply:
                return reply

    def record(self, session: Session, message: str, reply: dict[str, Any]) -> bool:
        if "error" in reply:
            self.errors[str(reply.get("error"))[:80]] += 1
            return False
        data = reply.get("data") or {}
        if not str(data.get("message", "")).startswith(f"Echo: {message}"):
            self.mismatched.append(message)
        now = time.monotonic()
        session.successes.append(now)
        self.acks.append(Ack(message, session.session_id, now))
        return True

    async def client(self, index: int, session: Session) -> None:
        while not self.stop.is_set():
            try:
                async with websockets.connect(self.stack.ws_url, open_timeout=5, close_timeout=1) as socket:
                    while not self.stop.is_set():
                        message = self.message(index)
                        self.sent += 1
                        try:
                            reply = await self._turn(socket, session.user_id, session.session_id, message)
                        except (asyncio.TimeoutError, websockets.ConnectionClosed, OSError):
                            self.unknown += 1
                            raise
                        self.record(session, message, reply)
            except (asyncio.TimeoutError, websockets.ConnectionClosed, websockets.InvalidHandshake, OSError):
                await asyncio.sleep(0.2)

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self.client(i, s)) for i, s in enumerate(self.client_sessions)]

    async def finish(self) -> None:
        self.stop.set()
        done, pending = await asyncio.wait(self.tasks, timeout=REPLY_TIMEOUT + 10)
        for task in pending:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def turn_until_success(self, session: Session, deadline: float) -> float | None:
        """Retry a turn on ``session`` until one succeeds (its time) or ``deadline`` passes."""
        while time.monotonic() < deadline:
            try:
                async with websockets.connect(self.stack.ws_url, open_timeout=2, close_timeout=1) as socket:
                    message = self.message(99)
                    remaining = max(0.5, deadline - time.monotonic())
                    reply = await asyncio.wait_for(
                        self._turn(socket, session.user_id, session.session_id, message), remaining)
                    if self.record(session, message, reply):
                        return time.monotonic()
            except (asyncio.TimeoutError, websockets.ConnectionClosed, websockets.InvalidHandshake, OSError):
                self.unknown += 1
            await asyncio.sleep(0.3)
        return None


# --- recovery and verification -----------------------------------------------------------------


async def billing_rows(stack: Stack, user_ids: list[str]) -> dict[str, Any]:
    """Balances, ledger rows and reservations of ``user_ids``, read from billing's tables (the
    test reads them for verification only)."""
    import asyncpg

    connection = await asyncpg.connect(stack.infra.database_url, timeout=10)
    try:
        ids = [uuid.UUID(u) for u in user_ids]
        users = await connection.fetch("SELECT id, balance_nanos FROM billing.users WHERE id = ANY($1)", ids)
        ledger = await connection.fetch(
            "SELECT l.user_id, l.kind, l.amount_nanos, l.balance_after_nanos,"
            " COALESCE(l.turn_id, r.turn_id) AS turn_id"
            " FROM billing.ledger l LEFT JOIN billing.reservations r ON r.id = l.reservation_id"
            " WHERE l.user_id = ANY($1)", ids)
        open_holds = await connection.fetch(
            "SELECT id, turn_id, created_at FROM billing.reservations WHERE status = 'open' AND user_id = ANY($1)", ids)
    finally:
        await connection.close()
    return {"users": users, "ledger": ledger, "open": open_holds}


async def open_reservations(stack: Stack, user_ids: list[str]) -> int | None:
    try:
        return len((await billing_rows(stack, user_ids))["open"])
    except Exception:  # noqa: BLE001 - PostgreSQL may still be coming back
        return None


def outbox_size(stack: Stack) -> int | None:
    """Entries in the sessions outbox; None while the service does not answer or has no outbox."""
    try:
        status, body = internal_get(stack, "sessions", "/v1/outbox", older_than_seconds=0, limit=500)
    except OSError:
        return None
    if status != 200 or not isinstance(body, dict):
        return None if status != 404 else 0
    return len(body.get("items", []))


async def wait_for_recovery(stack: Stack, load: Load, fault_at: float, deadline: float) -> dict[str, Any]:
    """Poll until no reservation of the scenario's users is open and the sessions outbox is
    empty, or ``deadline``. Returns when (seconds after the fault) holds were last seen open."""
    holds_clear_at = None
    while True:
        holds = await open_reservations(stack, load.user_ids)
        outbox = await asyncio.to_thread(outbox_size, stack)
        now = time.monotonic()
        if holds == 0 and outbox == 0:
            holds_clear_at = round(now - fault_at, 1)
            break
        if now > deadline:
            break
        await asyncio.sleep(0.5)
    return {"holds_clear_after_s": holds_clear_at, "open_reservations": holds, "outbox": outbox}


def history_line(content: str) -> str:
    return next((line for line in content.splitlines() if line.startswith("History: ")), "")


def expected_history(previous: dict[str, Any] | None) -> str:
    if previous is None:
        return "History: 0 entries"
    return f"last: {previous['role']}: {one_line(previous['content'], HISTORY_PREVIEW_CHARS)}"


async def verify(stack: Stack, load: Load) -> dict[str, Any]:
    """Figures of what was stored and charged, against what the clients were told."""
    stored: dict[str, list[dict[str, Any]]] = {}
    for session in load.sessions:
        body = await asyncio.to_thread(
            internal_get_retrying, stack, "sessions", f"/v1/sessions/{session.session_id}/entries",
            user_id=session.user_id)
        stored[session.session_id] = body["items"]
    extra_sessions = 0
    for user_id in load.user_ids:
        page = await asyncio.to_thread(internal_get_retrying, stack, "sessions", "/v1/sessions",
                                       user_id=user_id, limit=500)
        extra_sessions += sum(1 for s in page["items"] if s["session_id"] not in stored)

    # acknowledged turns: stored exactly once, in their session
    messages_per_session = {sid: Counter(e["content"] for e in entries if e["role"] == "user")
                            for sid, entries in stored.items()}
    all_user_messages = Counter(m for c in messages_per_session.values() for m in c.elements())
    lost = [a.message for a in load.acks if messages_per_session.get(a.session_id, Counter())[a.message] == 0]
    duplicated = [m for m, n in all_user_messages.items() if n > 1]

    # stored turns: paired user+assistant entries of one turn_id, each seeing the one before
    stored_turns: dict[str, str] = {}  # turn_id -> session
    unpaired = 0
    wrong_history: list[str] = []
    for sid, entries in stored.items():
        previous = None
        index = 0
        while index < len(entries):
            entry = entries[index]
            following = entries[index + 1] if index + 1 < len(entries) else None
            if entry["role"] != "user" or following is None or following["role"] != "assistant" \
                    or following.get("turn_id") != entry.get("turn_id"):
                unpaired += 1
                previous = entry
                index += 1
                continue
            stored_turns[entry.get("turn_id") or f"?{sid}:{index}"] = sid
            want = expected_history(previous)
            got = history_line(following["content"])
            if not (got == want if previous is None else got.endswith(want)):
                wrong_history.append(f"{entry['content']}: saw {got!r}, stored before it {want!r}")
            if not following["content"].startswith(f"Echo: {entry['content']}"):
                wrong_history.append(f"{entry['content']}: reply is not to it: {following['content'][:60]!r}")
            previous = following
            index += 2

    billing = await billing_rows(stack, load.user_ids)
    settles = Counter(row["turn_id"] for row in billing["ledger"] if row["kind"] == "settle")
    uncharged = [t for t in stored_turns if settles[t] == 0]
    double = [t for t in stored_turns if settles[t] > 1]
    charged_unstored = [t for t in settles if t not in stored_turns]
    ledger_sum: dict[str, int] = defaultdict(int)
    negative_rows = 0
    for row in billing["ledger"]:
        ledger_sum[str(row["user_id"])] += row["amount_nanos"]
        negative_rows += row["balance_after_nanos"] < 0
    balances = {str(row["id"]): row["balance_nanos"] for row in billing["users"]}
    mismatched_users = [u for u, b in balances.items() if ledger_sum[u] != b]
    negative = sum(1 for b in balances.values() if b < 0) + negative_rows

    return {
        "acked": len(load.acks), "stored_turns": len(stored_turns), "sent": load.sent,
        "unknown_outcome": load.unknown, "error_replies": sum(load.errors.values()),
        "lost": lost, "duplicated": duplicated, "uncharged": uncharged, "double_charged": double,
        "charged_not_stored": charged_unstored, "ledger_mismatch_users": mismatched_users,
        "negative_balances": negative, "wrong_history": wrong_history, "unpaired_entries": unpaired,
        "replies_to_another_message": list(load.mismatched), "extra_sessions": extra_sessions,
        "open_reservations_at_end": len(billing["open"]),
    }


def report(name: str, figures: dict[str, Any], errors: Counter) -> str:
    lines = [f"--- fault scenario {name} ---"]
    for key, value in figures.items():
        shown = len(value) if isinstance(value, list) else value
        sample = f"   e.g. {value[:3]}" if isinstance(value, list) and value else ""
        lines.append(f"  {key:<28} {shown}{sample}")
    for error, count in errors.most_common(5):
        lines.append(f"  error reply x{count}: {error}")
    return "\n".join(lines)
