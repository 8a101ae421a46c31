"""The socket's handlers of types 0, 1, 2, 4, 5 and 6 in process, against small fakes of the
typed service ports (chat_gateway.clients): what each answers, how it pages, and which protocol
error each failure of a service becomes. The same handlers run end to end over real processes
in test_ws_protocol.py and test_turns.py."""
from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from chat_common import contracts as c
from chat_common.errors import AppError, NotFoundError, ServiceUnavailableError
from chat_gateway.ws import handlers
from chat_gateway.ws.handlers import SocketSession
from chat_gateway.ws.protocol import (
    ErrorCode,
    ProtocolError,
    SessionRequest,
    UserRequest,
)

USER = str(uuid.uuid4())


@dataclass
class FakeBilling:
    users: dict[str, str] = field(default_factory=dict)  # id -> username
    fail: AppError | None = None

    def _check(self, user_id: str) -> None:
        if self.fail is not None:
            raise self.fail
        if user_id not in self.users:
            raise NotFoundError("user not found")

    async def user(self, user_id: str) -> c.User:
        self._check(user_id)
        return c.User(user_id=user_id, username=self.users[user_id])

    async def models(self, user_id: str) -> c.ModelList:
        self._check(user_id)
        return c.ModelList(models=[c.ModelInfo(model_id=8, name="llama3.1:8b"), c.ModelInfo(model_id=4, name="gpt-4")])

    async def balance(self, user_id: str) -> c.Balance:
        self._check(user_id)
        return c.Balance(user_id=user_id, balance_nanos=1_250_000_001, balance=1.250000001)


@dataclass
class FakeSessions:
    sessions: list[c.Session] = field(default_factory=list)
    chats: dict[str, list[c.Entry]] = field(default_factory=dict)
    pages_asked: list[tuple[int, int]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    fail: AppError | None = None

    async def page(self, user_id: str, limit: int, offset: int) -> c.SessionPage:
        if self.fail is not None:
            raise self.fail
        self.pages_asked.append((limit, offset))
        mine = [s for s in self.sessions if s.user_id == user_id]
        return c.SessionPage(items=mine[offset:offset + limit], total=len(mine), limit=limit, offset=offset)

    async def entries(self, session_id: str, user_id: str) -> c.EntryList:
        if self.fail is not None:
            raise self.fail
        owner = next((s.user_id for s in self.sessions if s.session_id == session_id), None)
        if owner != user_id:
            raise NotFoundError("session not found")
        return c.EntryList(items=self.chats.get(session_id, []))

    async def remove(self, session_id: str, user_id: str) -> None:
        if self.fail is not None:
            raise self.fail
        if not any(s.session_id == session_id and s.user_id == user_id for s in self.sessions):
            raise NotFoundError("session not found")
        self.sessions = [s for s in self.sessions if s.session_id != session_id]
        self.removed.append(session_id)


@dataclass
class FakeFiles:
    removed: list[str] = field(default_factory=list)
    fail: AppError | None = None

    async def remove_session_files(self, session_id: str, user_id: str) -> None:
        if self.fail is not None:
            raise self.fail
        self.removed.append(session_id)


@dataclass
class FakeStore:
    invalidated: list[str] = field(default_factory=list)

    async def invalidate(self, session_id: str) -> None:
        self.invalidated.append(session_id)


def socket_session(billing: FakeBilling, sessions: FakeSessions, files: FakeFiles | None = None) -> tuple[SocketSession, Any]:
    gateway = SimpleNamespace(billing=billing, sessions=sessions, files=files or FakeFiles(), redis=None, settings=None)
    runner = SimpleNamespace(
        gw=gateway, settings=SimpleNamespace(stream_retention_seconds=60), store=FakeStore(),
        spawn=asyncio.ensure_future,
    )
    return SocketSession(None, gateway, runner, None), runner  # type: ignore[arg-type]


def session(user_id: str, n: int) -> c.Session:
    return c.Session(session_id=str(uuid.uuid4()), user_id=user_id, session_name=f"chat {n}")


def sessions_port(**kwargs: Any) -> FakeSessions:
    return FakeSessions(**kwargs)


async def refused(call: Any) -> ErrorCode:
    with pytest.raises(ProtocolError) as caught:
        await call
    return caught.value.code


async def test_user_details_unknown_impossible_and_unavailable_users() -> None:
    billing = FakeBilling(users={USER: "ada"})
    handler, _ = socket_session(billing, sessions_port())
    assert await handler.user_details(UserRequest(), USER) == {"user_id": USER, "username": "ada"}
    assert await refused(handler.user_details(UserRequest(), str(uuid.uuid4()))) is ErrorCode.USER_NOT_FOUND
    assert await refused(handler.user_details(UserRequest(), "not-a-uuid")) is ErrorCode.USER_NOT_FOUND
    billing.fail = ServiceUnavailableError("billing down")
    assert await refused(handler.user_details(UserRequest(), USER)) is ErrorCode.INTERNAL


async def test_sessions_are_listed_across_pages_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handlers, "SESSION_PAGE", 3)
    mine = [session(USER, n) for n in range(7)]
    port = sessions_port(sessions=[*mine, session(str(uuid.uuid4()), 99)])
    handler, _ = socket_session(FakeBilling(), port)
    reply = await handler.list_sessions(UserRequest(), USER)
    assert reply["session_info"] == [{"session_id": s.session_id, "session_name": s.session_name} for s in mine]
    assert port.pages_asked == [(3, 0), (3, 3), (3, 6)]  # stops at the total, no empty page fetched
    assert (await handler.list_sessions(UserRequest(), str(uuid.uuid4())))["session_info"] == []
    assert await refused(handler.list_sessions(UserRequest(), "x")) is ErrorCode.USER_NOT_FOUND
    port.fail = ServiceUnavailableError("sessions down")
    assert await refused(handler.list_sessions(UserRequest(), USER)) is ErrorCode.INTERNAL


async def test_session_chats_are_role_and_content_as_a_json_string() -> None:
    mine = session(USER, 0)
    port = sessions_port(sessions=[mine])
    port.chats = {mine.session_id: [c.Entry(seq=0, role="user", content='say "hi"', turn_id="t"),
                                      c.Entry(seq=1, role="assistant", content="hi")]}
    handler, _ = socket_session(FakeBilling(), port)
    reply = await handler.session_chats(SessionRequest(session_id=mine.session_id), USER)
    assert reply["session_id"] == mine.session_id and reply["user_id"] == USER
    assert json.loads(reply["chat"]) == [{"role": "user", "content": 'say "hi"'}, {"role": "assistant", "content": "hi"}]
    other = str(uuid.uuid4())
    assert await refused(handler.session_chats(SessionRequest(session_id=mine.session_id), other)) is ErrorCode.LOAD_CHATS
    port.fail = ServiceUnavailableError("sessions down")
    assert await refused(handler.session_chats(SessionRequest(session_id=mine.session_id), USER)) is ErrorCode.LOAD_CHATS


async def test_delete_removes_the_session_its_files_and_its_cached_context() -> None:
    mine, kept = session(USER, 0), session(USER, 1)
    port, files = sessions_port(sessions=[mine, kept]), FakeFiles()
    handler, runner = socket_session(FakeBilling(), port, files)
    assert await handler.delete_session(SessionRequest(session_id=mine.session_id), USER) == {"user_id": USER}
    assert port.removed == [mine.session_id] and files.removed == [mine.session_id]
    assert runner.store.invalidated == [mine.session_id]
    # another's session, or one gone already: refused, nothing else touched
    assert await refused(handler.delete_session(SessionRequest(session_id=kept.session_id), str(uuid.uuid4()))) \
        is ErrorCode.DELETE_SESSION
    assert await refused(handler.delete_session(SessionRequest(session_id=mine.session_id), USER)) \
        is ErrorCode.DELETE_SESSION
    assert files.removed == [mine.session_id]
    # the files service away: the session is still deleted (its sweep removes the files later)
    files.fail = ServiceUnavailableError("files down")
    assert await handler.delete_session(SessionRequest(session_id=kept.session_id), USER) == {"user_id": USER}
    assert port.removed == [mine.session_id, kept.session_id]


async def test_models_sorted_by_name_and_balance_in_dollars() -> None:
    billing = FakeBilling(users={USER: "ada"})
    handler, _ = socket_session(billing, sessions_port())
    assert await handler.list_models(UserRequest(), USER) == {"models": ["gpt-4", "llama3.1:8b"]}
    assert await handler.balance(UserRequest(), USER) == {"balance": 1.250000001}
    unknown = str(uuid.uuid4())
    assert await refused(handler.list_models(UserRequest(), unknown)) is ErrorCode.USER_NOT_FOUND
    assert await refused(handler.balance(UserRequest(), unknown)) is ErrorCode.USER_NOT_FOUND
    billing.fail = ServiceUnavailableError("billing down")
    assert await refused(handler.list_models(UserRequest(), USER)) is ErrorCode.MODEL_LIST
    assert await refused(handler.balance(UserRequest(), USER)) is ErrorCode.BALANCE_DETAILS
