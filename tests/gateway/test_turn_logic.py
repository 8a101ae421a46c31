"""The turn's logic in process, against small fakes of the typed service ports (billing,
sessions, files, the AI) and a real Redis: undo before the append, nothing undone after it,
outcome-unknown appends confirmed by turn id, stale appends refused, the summary folded ahead.
The same behaviour is tested end to end over real processes in test_turns.py and tests/faults."""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from redis.asyncio import Redis

from chat_common import contracts as c
from chat_common.aiproto import ai_service_pb2 as pb
from chat_common.errors import (
    NotFoundError,
    OutcomeUnknownError,
    ServiceUnavailableError,
    StaleTurnError,
)
from chat_gateway.chat import turn as turn_module
from chat_gateway.chat.turn import TurnRunner
from chat_gateway.context import GatewayContext
from chat_gateway.settings import GatewaySettings
from chat_gateway.ws.protocol import ChatRequest, ErrorCode, ProtocolError

MODEL = c.ModelInfo(model_id=8, name="llama3.1:8b", provider="ollama")
REPLY_COST = 1_000
SUMMARY_COST = 500
WINDOW = 4


@dataclass
class FakeBilling:
    holds: dict[str, dict[str, Any]] = field(default_factory=dict)
    charges: list[c.Charge] = field(default_factory=list)

    async def reserve(self, request: c.ReserveRequest) -> c.Reservation:
        rid = str(uuid.uuid4())
        self.holds[rid] = {"status": "open", "user": request.user_id, "cost": None}
        return c.Reservation(reservation_id=rid, user_id=request.user_id, model=MODEL, amount_nanos=10_000,
                             status="open", balance_nanos=1_000_000)

    async def settle(self, rid: str, request: c.SettleRequest) -> c.Reservation:
        hold = self.holds[rid]
        assert hold["status"] != "settled", "settled twice"
        hold.update(status="settled", cost=request.cost_nanos)
        return c.Reservation(reservation_id=rid, user_id=request.user_id, model=MODEL, amount_nanos=10_000,
                             status="settled", balance_nanos=1_000_000)

    async def release(self, rid: str, request: c.ReleaseRequest) -> c.Reservation:
        self.holds[rid]["status"] = "released"
        return c.Reservation(reservation_id=rid, user_id=request.user_id, model=MODEL, amount_nanos=10_000,
                             status="released", balance_nanos=1_000_000)

    async def lease(self, rid: str, request: c.LeaseRequest) -> c.Reservation:
        raise AssertionError("no turn here runs long enough to renew its hold")

    async def charge(self, items: list[c.Charge]) -> c.ChargeBatchResult:
        self.charges.extend(items)
        return c.ChargeBatchResult(results=[c.ChargeResult(key=i.key, status="charged") for i in items])

    async def user(self, user_id: str) -> c.User:
        return c.User(user_id=user_id, username="u")

    def statuses(self) -> list[str]:
        return [h["status"] for h in self.holds.values()]


@dataclass
class FakeSessions:
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    # steer the next appends: "stale", "unknown-stored", "unknown-lost", "unknown-confirm-down"
    append_faults: list[str] = field(default_factory=list)
    confirm_down: bool = False
    removed: list[str] = field(default_factory=list)
    appends: int = 0

    async def create(self, request: c.SessionCreate) -> c.Session:
        assert request.session_id is not None
        self.sessions[request.session_id] = {
            "owner": request.user_id, "name": request.name, "entries": [], "turns": {},
            "summary": "", "upto": 0, "prompt": request.prompt,
        }
        return self._session(request.session_id)

    def _session(self, sid: str) -> c.Session:
        s = self.sessions[sid]
        return c.Session(session_id=sid, user_id=s["owner"], session_name=s["name"], prompt=s["prompt"],
                         summary=s["summary"], summarized_upto=s["upto"], entry_count=len(s["entries"]))

    async def context(self, sid: str, user_id: str, window: int) -> c.SessionContext:
        s = self.sessions.get(sid)
        if s is None or s["owner"] != user_id:
            raise NotFoundError("session not found")
        entries = s["entries"][-window:] if window else []
        first = len(s["entries"]) - len(entries)
        return c.SessionContext(session=self._session(sid), entries=[
            c.Entry(seq=first + i, role=r, content=t) for i, (r, t) in enumerate(entries)])

    async def last_entries(self, sid: str, user_id: str, last: int) -> c.EntryList:
        entries = self.sessions[sid]["entries"][-last:]
        return c.EntryList(items=[c.Entry(seq=0, role=r, content=t) for r, t in entries])

    def _store(self, sid: str, request: c.TurnAppend) -> c.TurnResult:
        s = self.sessions[sid]
        if request.turn_id in s["turns"]:
            return s["turns"][request.turn_id]
        if request.expected_entry_count is not None and request.expected_entry_count != len(s["entries"]):
            raise StaleTurnError("stale turn")
        first = len(s["entries"])
        s["entries"].extend((e.role, e.content) for e in request.entries)
        result = c.TurnResult(session_id=sid, turn_id=request.turn_id, first_seq=first, count=len(request.entries),
                              entry_count=len(s["entries"]), created=True)
        s["turns"][request.turn_id] = result
        return result

    async def append(self, sid: str, request: c.TurnAppend) -> c.TurnResult:
        self.appends += 1
        fault = self.append_faults.pop(0) if self.append_faults else None
        if fault == "stale":
            self.sessions[sid]["entries"].append(("user", "written by someone else"))
        if fault == "unknown-stored":
            self._store(sid, request)
            raise OutcomeUnknownError("sessions service gave no answer")
        if fault in ("unknown-lost", "unknown-confirm-down"):
            self.confirm_down = fault == "unknown-confirm-down"
            raise OutcomeUnknownError("sessions service timed out")
        return self._store(sid, request)

    async def stored_turn(self, sid: str, turn_id: str, user_id: str) -> c.TurnResult:
        if self.confirm_down:
            raise ServiceUnavailableError("sessions service unreachable")
        found = self.sessions[sid]["turns"].get(turn_id)
        if found is None:
            raise NotFoundError("turn not stored")
        return found

    async def store_summary(self, sid: str, request: c.SummaryUpdate) -> c.Session:
        s = self.sessions[sid]
        if request.summarized_upto >= s["upto"]:
            s["summary"], s["upto"] = request.summary, request.summarized_upto
        return self._session(sid)

    async def remove(self, sid: str, user_id: str) -> None:
        self.removed.append(sid)
        self.sessions.pop(sid, None)


class FakeFiles:
    async def record(self, name: str, user_id: str) -> c.FileRecord:
        raise NotFoundError("file not found")


@dataclass
class FakeAI:
    seen: list[pb.Request] = field(default_factory=list)
    folds: list[list[dict[str, str]]] = field(default_factory=list)
    fail: bool = False

    async def Process(self, request: pb.Request, timeout: float, metadata: Any) -> pb.Response:
        import grpc

        if self.fail:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "down")
        self.seen.append(request)
        return pb.Response(response_text=f"reply to: {request.chat_message}", cost_nanos=REPLY_COST)

    async def Summarize(self, request: pb.SummaryRequest, timeout: float, metadata: Any) -> pb.Response:
        import json

        entries = json.loads(request.chat_entries)
        self.folds.append(entries)
        lines = ([request.previous_summary] if request.previous_summary else []) + [e["content"] for e in entries]
        return pb.Response(response_text="\n".join(lines), cost_nanos=SUMMARY_COST)


@dataclass
class Fakes:
    runner: TurnRunner
    billing: FakeBilling
    sessions: FakeSessions
    ai: FakeAI
    user: str

    async def chat(self, session_id: str, message: str) -> dict[str, Any]:
        request = ChatRequest(session_id=session_id, message=message, user_id=self.user, model_name=MODEL.name)
        reply = await self.runner.run(request, self.user)
        await self.runner.drain(5)  # a fold after the reply runs in the background
        return reply


@pytest.fixture
async def fakes(redis_server, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Fakes]:
    monkeypatch.setenv("MAX_CHAT_HISTORY_CONTEXT", str(WINDOW))
    monkeypatch.setattr(turn_module, "CONFIRM_SECONDS", 0.3)
    settings = GatewaySettings.from_env()
    redis = Redis.from_url(redis_server.url(), decode_responses=False)
    billing, sessions, ai = FakeBilling(), FakeSessions(), FakeAI()
    gateway = GatewayContext(settings=settings, sessions=sessions, files=FakeFiles(), billing=billing,  # type: ignore[arg-type]
                             redis=redis, ai_channel=None, ai=ai)  # type: ignore[arg-type]
    yield Fakes(TurnRunner(gateway), billing, sessions, ai, str(uuid.uuid4()))
    await redis.aclose()


async def test_a_turn_is_stored_charged_and_cached(fakes: Fakes) -> None:
    reply = await fakes.chat("NEW", "hello there")
    sid = reply["session_id"]
    assert reply["message"] == "reply to: hello there" and reply["session_name"] == "hello there"
    assert fakes.sessions.sessions[sid]["entries"] == [("user", "hello there"), ("assistant", "reply to: hello there")]
    assert fakes.billing.statuses() == ["settled"]
    cached = await fakes.runner.store.cached(sid)
    assert cached is not None and cached.entry_count == 2
    await fakes.chat(sid, "again")
    assert fakes.ai.seen[-1].chat_history.count("hello there") == 2  # the message and its reply


async def test_ai_failure_undoes_every_step(fakes: Fakes) -> None:
    fakes.ai.fail = True
    with pytest.raises(ProtocolError) as failed:
        await fakes.chat("NEW", "fail")
    assert failed.value.code == ErrorCode.AI_RESPONSE
    assert fakes.billing.statuses() == ["released"]
    assert len(fakes.sessions.removed) == 1 and fakes.sessions.sessions == {}


async def test_a_stale_turn_is_asked_again_on_the_stored_history(fakes: Fakes) -> None:
    sid = (await fakes.chat("NEW", "first"))["session_id"]
    fakes.sessions.append_faults.append("stale")  # someone else stores an entry meanwhile
    reply = await fakes.chat(sid, "second")
    assert reply["message"] == "reply to: second"
    assert "written by someone else" in fakes.ai.seen[-1].chat_history  # the retry saw it
    assert fakes.sessions.sessions[sid]["entries"][-2:] == [("user", "second"), ("assistant", "reply to: second")]
    assert fakes.billing.statuses() == ["settled", "settled"]


async def test_a_turn_stale_twice_fails_cleanly_and_drops_the_cache(fakes: Fakes) -> None:
    sid = (await fakes.chat("NEW", "first"))["session_id"]
    fakes.sessions.append_faults.extend(["stale", "stale"])
    with pytest.raises(ProtocolError) as failed:
        await fakes.chat(sid, "second")
    assert failed.value.code == ErrorCode.INTERNAL
    assert fakes.billing.statuses() == ["settled", "released"]
    assert ("user", "second") not in fakes.sessions.sessions[sid]["entries"]
    assert fakes.sessions.removed == []  # an existing session is never removed
    assert await fakes.runner.store.cached(sid) is None  # the next turn reads the truth
    await fakes.chat(sid, "third")


async def test_an_unknown_outcome_that_was_stored_is_a_success(fakes: Fakes) -> None:
    sid = (await fakes.chat("NEW", "first"))["session_id"]
    fakes.sessions.append_faults.append("unknown-stored")
    reply = await fakes.chat(sid, "second")
    assert reply["message"] == "reply to: second"
    assert fakes.billing.statuses() == ["settled", "settled"]
    assert fakes.sessions.appends == 2  # confirmed by turn id, not appended again


async def test_an_unknown_outcome_not_stored_is_appended_again(fakes: Fakes) -> None:
    sid = (await fakes.chat("NEW", "first"))["session_id"]
    fakes.sessions.append_faults.append("unknown-lost")
    await fakes.chat(sid, "second")
    assert [t for r, t in fakes.sessions.sessions[sid]["entries"] if r == "user"] == ["first", "second"]
    assert fakes.billing.statuses() == ["settled", "settled"]


async def test_an_outcome_nobody_can_tell_keeps_the_hold(fakes: Fakes) -> None:
    fakes.sessions.append_faults.append("unknown-confirm-down")
    with pytest.raises(ProtocolError):
        await fakes.chat("NEW", "maybe stored")
    # it may be stored: the hold stays (its lease returns it; the outbox charges a stored turn)
    assert fakes.billing.statuses() == ["open"] and fakes.sessions.removed == []


async def test_the_summary_is_folded_ahead_in_chunks_and_charged_once_each(fakes: Fakes) -> None:
    sid = (await fakes.chat("NEW", "t0"))["session_id"]
    for i in range(1, 9):
        await fakes.chat(sid, f"t{i}")
    # window 4: after turn 3 (6 entries) the whole session so far; after turn 5 (12): again
    assert [len(f) for f in fakes.ai.folds] == [6, 6, 6]
    assert [ch.key for ch in fakes.billing.charges] == [f"summary:{sid}:{n}" for n in (6, 12, 18)]
    assert all(ch.cost_nanos == SUMMARY_COST and ch.kind == "summary" for ch in fakes.billing.charges)
    entries = fakes.sessions.sessions[sid]["entries"]
    for seen in fakes.ai.seen[1:]:
        position = entries.index(("user", seen.chat_message))
        covered = len(seen.chat_summary.splitlines()) if seen.chat_summary else 0
        assert position - WINDOW <= covered <= position  # no gap, never past the message


async def test_a_missed_fold_happens_before_the_next_ai_call(fakes: Fakes) -> None:
    sid = (await fakes.chat("NEW", "t0"))["session_id"]
    for i in range(1, 3):
        await fakes.chat(sid, f"t{i}")
    assert len(fakes.ai.folds) == 1
    # as if the gateway that ran the last fold died: the cache is gone, the summary lags behind
    await fakes.runner.store.invalidate(sid)
    fakes.sessions.sessions[sid]["summary"], fakes.sessions.sessions[sid]["upto"] = "", 0
    await fakes.chat(sid, "t3")
    assert len(fakes.ai.folds) == 2 and len(fakes.ai.folds[1]) == 6
    assert fakes.ai.seen[-1].chat_summary.splitlines() == [t for _, t in fakes.sessions.sessions[sid]["entries"][:6]]


async def test_a_foreign_session_is_refused_before_any_money_moves(fakes: Fakes) -> None:
    sid = (await fakes.chat("NEW", "mine"))["session_id"]
    stranger = ChatRequest(session_id=sid, message="hi", model_name=MODEL.name)
    with pytest.raises(ProtocolError) as refused:
        await fakes.runner.run(stranger, str(uuid.uuid4()))
    assert refused.value.code == ErrorCode.LOAD_SESSION
    assert fakes.billing.statuses() == ["settled"]
    # and the session's lock is free again at once
    await asyncio.wait_for(fakes.chat(sid, "still mine"), 5)
