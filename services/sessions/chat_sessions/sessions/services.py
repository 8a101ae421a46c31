"""Session storage on asyncpg. Every call is scoped to the owner (a row of another user is
never read, changed or reported as existing) and is one SQL statement, one round trip, in the
common case: the writes that must be atomic are PL/pgSQL functions (migration 0002), the reads
are single statements (one snapshot). The statements are module constants (``sql.py``), so
asyncpg prepares each once per connection and reuses it."""
from __future__ import annotations

import builtins  # the method `list` below shadows the name in the class body
import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg
import msgspec

from chat_common.contracts import ReceiptDetails
from chat_common.db import check_schema_name, create_pool
from chat_common.errors import (
    BadRequestError,
    ConflictError,
    NotFoundError,
    StaleTurnError,
)
from chat_sessions.sessions import schemas, sql
from chat_sessions.sessions.search import SEARCHED_ROLES, searchable_words

# A content of at most this many characters cannot exceed the byte bound (UTF-8 is at most 4
# bytes per character), so only longer ones are encoded to be measured.
_SAFE_CHARS = schemas.MAX_CONTENT_BYTES // 4


def clean_text(value: str) -> str:
    """PostgreSQL text cannot hold NUL; dropping it keeps a turn whose (model-written) reply
    happens to contain one from failing after the AI already answered."""
    return value.replace("\x00", "") if "\x00" in value else value


def required_text(value: str, field: str) -> str:
    text = clean_text(value).strip()
    if not text:
        message = f"{field} must not be empty"
        raise BadRequestError(message, details=[{"message": message, "key": field, "source": "body"}])
    return text


def to_session(row: Sequence[Any]) -> schemas.Session:
    return schemas.Session(
        session_id=row[0],
        user_id=row[1],
        session_name=row[2],
        model_name=row[3],
        prompt=row[4],
        summary=row[5],
        summarized_upto=row[6],
        entry_count=row[7],
        created_at=row[8],
        updated_at=row[9],
    )


def to_entries(row: Sequence[Any]) -> list[schemas.Entry]:
    seqs = row[10]
    if seqs is None:
        return []
    Entry = schemas.Entry
    return [
        Entry(seq=seq, role=role, content=content, turn_id=turn_id, created_at=created_at)
        for seq, role, content, turn_id, created_at in zip(seqs, row[11], row[12], row[13], row[14], strict=True)
    ]


_receipt_json = msgspec.json.Encoder()


def _charge_args(charge: schemas.OwedCharge | None) -> tuple[int | None, str | None, str | None, str | None]:
    """Cost, reservation, model and the receipt's details (JSON text) of an owed charge."""
    if charge is None:
        return None, None, None, None
    model_name = None if charge.model_name is None else clean_text(charge.model_name) or None
    reservation = None if charge.reservation_id is None else clean_text(charge.reservation_id) or None
    receipt = None if charge.receipt is None else _receipt_json.encode(charge.receipt).decode()
    return charge.cost_nanos, reservation, model_name, receipt


def _receipt(raw: str | None) -> ReceiptDetails | None:
    return None if raw is None else msgspec.json.decode(raw, type=ReceiptDetails)


class SessionsService:
    def __init__(self, database_url: str, schema: str, *, min_size: int = 0, max_size: int = 20) -> None:
        self._dsn = database_url
        self._schema = check_schema_name(schema)
        self._min_size = min_size
        self._max_size = max_size
        self.pool: asyncpg.Pool | None = None

    async def start(self) -> None:
        """Create the pool (the app's lifespan does). ``min_size`` 0 by default: the service
        starts, and reports itself not ready, while the database is down."""
        if self.pool is None:
            self.pool = await create_pool(self._dsn, self._schema, min_size=self._min_size, max_size=self._max_size)

    async def close(self) -> None:
        if self.pool is not None:
            pool, self.pool = self.pool, None
            await pool.close()

    def _pool(self) -> asyncpg.Pool:
        pool = self.pool
        if pool is None:
            raise RuntimeError("sessions service used before start()")
        return pool

    async def ping(self) -> None:
        await self._pool().fetchval(sql.PING)

    # -- sessions -------------------------------------------------------------------------------

    async def create(self, data: schemas.SessionCreate) -> schemas.Session:
        idempotency_key = None if data.idempotency_key is None else clean_text(data.idempotency_key) or None
        session_id = data.session_id or uuid.uuid4()
        name = required_text(data.name, "name")
        model_name = required_text(data.model_name, "model_name")
        pool = self._pool()
        # ON CONFLICT rather than catching a unique violation: a concurrent replay waits for the
        # first insert and then finds its row. The look-ups after a conflict are statements of
        # their own (each sees what committed before it; one statement's snapshot would not).
        row = await pool.fetchrow(
            sql.CREATE_SESSION, session_id, data.user_id, name, model_name, clean_text(data.prompt), idempotency_key
        )
        if row is not None:
            return to_session(row)
        if idempotency_key is not None:
            row = await pool.fetchrow(sql.SESSION_BY_KEY, data.user_id, idempotency_key)
            if row is not None:
                return to_session(row)
        row = await pool.fetchrow(sql.SESSION_BY_ID_ANY_OWNER, session_id)
        if row is not None and row[1] == data.user_id:
            return to_session(row)
        # Another user's id: refused without saying anything about that session.
        raise ConflictError("session_id is already in use")

    async def list(self, user_id: uuid.UUID, limit: int, offset: int) -> schemas.SessionPage:
        rows = await self._pool().fetch(sql.LIST_SESSIONS, user_id, limit, offset)
        total = rows[0][0]
        items = [to_session(row[1:]) for row in rows if row[1] is not None]
        return schemas.SessionPage(items=items, total=total, limit=limit, offset=offset)

    async def get(self, user_id: uuid.UUID, session_id: uuid.UUID) -> schemas.Session:
        row = await self._pool().fetchrow(sql.GET_SESSION, session_id, user_id)
        if row is None:
            raise NotFoundError("session not found")
        return to_session(row)

    async def _with_entries(self, user_id: uuid.UUID, session_id: uuid.UUID, last: int) -> asyncpg.Record:
        row = await self._pool().fetchrow(sql.SESSION_WITH_ENTRIES, session_id, user_id, last)
        if row is None:
            raise NotFoundError("session not found")
        return row

    async def entries(self, user_id: uuid.UUID, session_id: uuid.UUID, last: int | None) -> schemas.EntryList:
        bound = schemas.MAX_INT4 if last is None else min(last, schemas.MAX_INT4)
        return schemas.EntryList(items=to_entries(await self._with_entries(user_id, session_id, bound)))

    async def context(self, user_id: uuid.UUID, session_id: uuid.UUID, window: int) -> schemas.SessionContext:
        row = await self._with_entries(user_id, session_id, min(window, schemas.MAX_INT4))
        return schemas.SessionContext(session=to_session(row), entries=to_entries(row))

    async def delete(self, user_id: uuid.UUID, session_id: uuid.UUID) -> None:
        status = await self._pool().execute(sql.DELETE_SESSION, session_id, user_id)
        if status == "DELETE 0":
            raise NotFoundError("session not found")

    # -- turns ----------------------------------------------------------------------------------

    async def append_turn(self, session_id: uuid.UUID, data: schemas.TurnAppend) -> schemas.TurnResult:
        model_name = None if data.model_name is None else required_text(data.model_name, "model_name")
        roles: list[str] = []
        contents: list[str] = []
        words: list[str | None] = []
        for index, entry in enumerate(data.entries):
            content = entry.content
            if "\x00" in content:
                content = content.replace("\x00", "")
            if len(content) > _SAFE_CHARS and len(content.encode("utf-8")) > schemas.MAX_CONTENT_BYTES:
                message = f"entries[{index}].content exceeds {schemas.MAX_CONTENT_BYTES} bytes of UTF-8"
                raise BadRequestError(
                    message, details=[{"message": message, "key": f"entries[{index}].content", "source": "body"}]
                )
            roles.append(entry.role)
            contents.append(content)
            words.append(searchable_words(content) if entry.role in SEARCHED_ROLES else None)
        prompt = None if data.prompt is None else clean_text(data.prompt)
        cost, reservation, charge_model, receipt = _charge_args(data.charge)
        # One call of append_turn(): the session row lock serializes every append (and replay)
        # of the session; seq numbers come from entry_count under it, so they are contiguous,
        # and a replay waits for the first attempt to commit and then finds its turn row.
        status, first_seq, count, entry_count = await self._pool().fetchrow(
            sql.APPEND_TURN, session_id, data.user_id, data.turn_id, roles, contents,
            data.expected_entry_count, prompt, model_name, cost, reservation, charge_model, receipt, words,
        )
        if status == "created" or status == "replay":
            return schemas.TurnResult(
                session_id=session_id, turn_id=data.turn_id, first_seq=first_seq, count=count,
                entry_count=entry_count, created=status == "created",
            )
        if status == "stale":
            raise StaleTurnError(
                f"the session has {entry_count} entries, the turn expected {data.expected_entry_count}",
                details={"entry_count": entry_count, "expected_entry_count": data.expected_entry_count},
            )
        if status == "full":
            raise BadRequestError("session has too many entries")
        raise NotFoundError("session not found")

    async def get_turn(self, user_id: uuid.UUID, session_id: uuid.UUID, turn_id: uuid.UUID) -> schemas.TurnResult:
        row = await self._pool().fetchrow(sql.GET_TURN, session_id, turn_id, user_id)
        if row is None:
            raise NotFoundError("turn not found")
        first_seq, count = row
        return schemas.TurnResult(
            session_id=session_id, turn_id=turn_id, first_seq=first_seq, count=count,
            entry_count=first_seq + count, created=False,
        )

    async def update_summary(self, session_id: uuid.UUID, data: schemas.SummaryUpdate) -> schemas.Session:
        cost, reservation, charge_model, receipt = _charge_args(data.charge)
        # One call of store_summary(): locked, so two updates racing cannot both pass the
        # monotonicity check; the outbox row (if any) is written with the stored summary only.
        row = await self._pool().fetchrow(
            sql.STORE_SUMMARY, session_id, data.user_id, clean_text(data.summary), data.summarized_upto,
            data.turn_id, cost, reservation, charge_model, receipt,
        )
        if row is None or row[0] is None:
            raise NotFoundError("session not found")
        return to_session(row)

    # -- search ---------------------------------------------------------------------------------

    async def search(self, user_id: uuid.UUID, query: str, limit: int) -> schemas.SearchResult:
        """The owner's entries matching ``query`` (plain text), best first."""
        text = clean_text(query)[: schemas.MAX_SEARCH_QUERY_CHARS].strip()
        if not text:
            message = "query must not be empty"
            raise BadRequestError(message, details=[{"message": message, "key": "query", "source": "query"}])
        rows = await self._pool().fetch(sql.SEARCH_ENTRIES, user_id, text, limit)
        Hit = schemas.SearchHit
        return schemas.SearchResult(
            items=[
                Hit(session_id=row[0], session_name=row[1], seq=row[2], role=row[3], snippet=row[4], created_at=row[5])
                for row in rows
            ]
        )

    # -- retention ------------------------------------------------------------------------------

    async def expire(self, older_than_seconds: float, limit: int) -> schemas.ExpiredPage:
        rows = await self._pool().fetch(sql.EXPIRE_SESSIONS, float(older_than_seconds), limit)
        return schemas.ExpiredPage(items=[schemas.ExpiredSession(session_id=r[0], user_id=r[1]) for r in rows])

    async def expired(self, older_than_seconds: float, limit: int) -> schemas.ExpiredPage:
        rows = await self._pool().fetch(sql.EXPIRED_PAGE, float(older_than_seconds), limit)
        return schemas.ExpiredPage(items=[schemas.ExpiredSession(session_id=r[0], user_id=r[1]) for r in rows])

    async def expired_ack(self, session_ids: builtins.list[uuid.UUID]) -> schemas.ExpiredAcked:
        if not session_ids:
            return schemas.ExpiredAcked(acked=0)
        status = await self._pool().execute(sql.EXPIRED_ACK, session_ids)
        return schemas.ExpiredAcked(acked=int(status.rsplit(" ", 1)[1]))

    # -- outbox ---------------------------------------------------------------------------------

    async def outbox_page(self, older_than_seconds: float, limit: int) -> schemas.OutboxPage:
        rows = await self._pool().fetch(sql.OUTBOX_PAGE, float(older_than_seconds), limit)
        Charge, Item = schemas.Charge, schemas.OutboxItem
        return schemas.OutboxPage(
            items=[
                Item(
                    outbox_id=row[0],
                    charge=Charge(
                        key=row[1], kind=row[2], user_id=row[3], session_id=row[4], turn_id=row[5],
                        cost_nanos=row[6], reservation_id=row[7], model_name=row[8], receipt=_receipt(row[9]),
                    ),
                )
                for row in rows
            ]
        )

    async def outbox_ack(self, outbox_ids: builtins.list[int]) -> schemas.OutboxAcked:
        if not outbox_ids:
            return schemas.OutboxAcked(acked=0)
        status = await self._pool().execute(sql.OUTBOX_ACK, outbox_ids)
        return schemas.OutboxAcked(acked=int(status.rsplit(" ", 1)[1]))
