from __future__ import annotations

import uuid
from typing import Annotated

from litestar import Controller, delete, get, post, put
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter

from chat_common.errors import parse_uuid
from chat_sessions.sessions import schemas
from chat_sessions.sessions.services import SessionsService

UserId = Annotated[uuid.UUID, QueryParameter(description="owner of the session")]
Sessions = NamedDependency[SessionsService]
SessionIdPath = FromPath[str]


def parse_session_id(value: str, key: str = "session_id") -> uuid.UUID:
    # Taken as a string and parsed here: a `{session_id:uuid}` route would answer a malformed
    # id with a 404 (no route), which reads like "session not found" instead of "bad input".
    return parse_uuid(value, key)


class SessionsController(Controller):
    path = "/v1/sessions"
    tags = ["sessions"]

    @post("/")
    async def create_session(self, sessions: Sessions, data: JSONBody[schemas.SessionCreate]) -> schemas.Session:
        return await sessions.create(data)

    @get("/")
    async def list_sessions(
        self,
        sessions: Sessions,
        user_id: UserId,
        limit: Annotated[int, QueryParameter(ge=1)] = schemas.DEFAULT_PAGE_LIMIT,
        offset: Annotated[int, QueryParameter(ge=0, le=schemas.MAX_INT4)] = 0,
    ) -> schemas.SessionPage:
        # Over the maximum is clamped, not refused: the reply's `limit` says what was applied.
        return await sessions.list(user_id, min(limit, schemas.MAX_PAGE_LIMIT), offset)

    @get("/{session_id:str}")
    async def get_session(self, sessions: Sessions, session_id: SessionIdPath, user_id: UserId) -> schemas.Session:
        return await sessions.get(user_id, parse_session_id(session_id))

    @get("/{session_id:str}/entries")
    async def list_entries(
        self,
        sessions: Sessions,
        session_id: SessionIdPath,
        user_id: UserId,
        last: Annotated[int | None, QueryParameter(gt=0)] = None,
    ) -> schemas.EntryList:
        return await sessions.entries(user_id, parse_session_id(session_id), last)

    @get("/{session_id:str}/context")
    async def get_context(
        self,
        sessions: Sessions,
        session_id: SessionIdPath,
        user_id: UserId,
        window: Annotated[int, QueryParameter(ge=0)] = schemas.DEFAULT_CONTEXT_WINDOW,
    ) -> schemas.SessionContext:
        return await sessions.context(user_id, parse_session_id(session_id), window)

    @post("/{session_id:str}/turns")
    async def append_turn(
        self, sessions: Sessions, session_id: SessionIdPath, data: JSONBody[schemas.TurnAppend]
    ) -> schemas.TurnResult:
        return await sessions.append_turn(parse_session_id(session_id), data)

    @get("/{session_id:str}/turns/{turn_id:str}")
    async def get_turn(
        self, sessions: Sessions, session_id: SessionIdPath, turn_id: FromPath[str], user_id: UserId
    ) -> schemas.TurnResult:
        """The stored result of a turn (``created`` false), 404 when it was not stored: how a
        caller learns the outcome of an append whose reply it never got."""
        return await sessions.get_turn(user_id, parse_session_id(session_id), parse_session_id(turn_id, "turn_id"))

    @put("/{session_id:str}/summary")
    async def update_summary(
        self, sessions: Sessions, session_id: SessionIdPath, data: JSONBody[schemas.SummaryUpdate]
    ) -> schemas.Session:
        return await sessions.update_summary(parse_session_id(session_id), data)

    @delete("/{session_id:str}", status_code=204)
    async def delete_session(self, sessions: Sessions, session_id: SessionIdPath, user_id: UserId) -> None:
        await sessions.delete(user_id, parse_session_id(session_id))


class SearchController(Controller):
    """Full-text search over one user's history (docs/protocol.md, "Extensions" (search))."""

    path = "/v1/search"
    tags = ["search"]

    @get("/")
    async def search(
        self,
        sessions: Sessions,
        user_id: UserId,
        # `query` is a name Litestar reserves for the query mapping: taken under another name
        text: Annotated[str, QueryParameter(name="query", description="plain text, never a query language")],
        limit: Annotated[int, QueryParameter(ge=1, le=schemas.MAX_SEARCH_LIMIT)] = schemas.DEFAULT_SEARCH_LIMIT,
    ) -> schemas.SearchResult:
        return await sessions.search(user_id, text, limit)


class OutboxController(Controller):
    """Charges owed by stored turns and summaries, for the gateway's outbox workers: page the
    old enough rows, have billing apply them (exactly once there, by key), ack them."""

    path = "/v1/outbox"
    tags = ["outbox"]

    @get("/")
    async def outbox_page(
        self,
        sessions: Sessions,
        older_than_seconds: Annotated[float, QueryParameter(ge=0, le=10**9)] = 0,
        limit: Annotated[int, QueryParameter(ge=1)] = schemas.DEFAULT_OUTBOX_LIMIT,
    ) -> schemas.OutboxPage:
        return await sessions.outbox_page(older_than_seconds, min(limit, schemas.MAX_OUTBOX_LIMIT))

    @post("/ack", status_code=200)
    async def outbox_ack(self, sessions: Sessions, data: JSONBody[schemas.OutboxAck]) -> schemas.OutboxAcked:
        return await sessions.outbox_ack(data.outbox_ids)


class RetentionController(Controller):
    """The retention sweep (SESSION_RETENTION_DAYS), for the gateway's sweeper: remove expired
    sessions (each exactly once), page those whose files are not yet confirmed gone, ack them."""

    path = "/v1/retention"
    tags = ["retention"]

    @post("/expire", status_code=200)
    async def expire(self, sessions: Sessions, data: JSONBody[schemas.ExpireRequest]) -> schemas.ExpiredPage:
        return await sessions.expire(data.older_than_seconds, data.limit)

    @get("/expired")
    async def expired(
        self,
        sessions: Sessions,
        older_than_seconds: Annotated[float, QueryParameter(ge=0, le=10**9)] = 0,
        limit: Annotated[int, QueryParameter(ge=1, le=schemas.MAX_RETENTION_BATCH)] = 100,
    ) -> schemas.ExpiredPage:
        return await sessions.expired(older_than_seconds, limit)

    @post("/ack", status_code=200)
    async def ack(self, sessions: Sessions, data: JSONBody[schemas.ExpiredAck]) -> schemas.ExpiredAcked:
        return await sessions.expired_ack(data.session_ids)
