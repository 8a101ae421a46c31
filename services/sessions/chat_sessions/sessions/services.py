"""Session storage. Every operation runs in one transaction and is scoped to the owner: a row of
another user is never read, changed or reported as existing."""
from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime

from advanced_alchemy.filters import LimitOffset
from advanced_alchemy.repository import SQLAlchemyAsyncRepository
from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chat_common.errors import BadRequestError, ConflictError, NotFoundError
from chat_sessions.sessions import schemas
from chat_sessions.sessions.models import EntryModel, SessionModel, TurnModel


class SessionRepository(SQLAlchemyAsyncRepository[SessionModel]):
    model_type = SessionModel


class EntryRepository(SQLAlchemyAsyncRepository[EntryModel]):
    model_type = EntryModel


class TurnRepository(SQLAlchemyAsyncRepository[TurnModel]):
    model_type = TurnModel


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


def to_session(row: SessionModel) -> schemas.Session:
    return schemas.Session(
        session_id=row.id,
        user_id=row.user_id,
        session_name=row.name,
        model_name=row.model_name,
        prompt=row.prompt,
        summary=row.summary,
        summarized_upto=row.summarized_upto,
        entry_count=row.entry_count,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def to_entry(row: EntryModel) -> schemas.Entry:
    return schemas.Entry(
        seq=row.seq, role=row.role, content=row.content, turn_id=row.turn_id, created_at=row.created_at
    )


class SessionsService:
    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        self._sessionmaker = sessionmaker

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncSession]:
        async with self._sessionmaker() as db, db.begin():
            yield db

    @staticmethod
    async def _owned(
        db: AsyncSession, user_id: uuid.UUID, session_id: uuid.UUID, *, lock: bool = False
    ) -> SessionModel:
        row = await SessionRepository(session=db).get_one_or_none(
            id=session_id, user_id=user_id, with_for_update=lock
        )
        if row is None:
            raise NotFoundError("session not found")
        return row

    @staticmethod
    async def _clock(db: AsyncSession) -> datetime:
        # Statement time, read after the row lock: timestamps then follow the order in which
        # concurrent writers were serialized (now() is the earlier transaction start).
        return (await db.execute(select(func.clock_timestamp()))).scalar_one()

    async def create(self, data: schemas.SessionCreate) -> schemas.Session:
        idempotency_key = None if data.idempotency_key is None else clean_text(data.idempotency_key)
        values = {
            "id": data.session_id or uuid.uuid4(),
            "user_id": data.user_id,
            "name": required_text(data.name, "name"),
            "model_name": required_text(data.model_name, "model_name"),
            "prompt": clean_text(data.prompt),
            "idempotency_key": idempotency_key or None,
        }
        async with self._transaction() as db:
            # ON CONFLICT rather than catching an IntegrityError: a concurrent replay waits
            # for the first insert and then finds its row, instead of aborting the transaction.
            statement = pg_insert(SessionModel).values(**values).on_conflict_do_nothing().returning(SessionModel)
            row = (await db.scalars(statement)).one_or_none()
            if row is not None:
                return to_session(row)
            repository = SessionRepository(session=db)
            if values["idempotency_key"] is not None:
                row = await repository.get_one_or_none(
                    user_id=data.user_id, idempotency_key=values["idempotency_key"]
                )
                if row is not None:
                    return to_session(row)
            row = await repository.get_one_or_none(id=values["id"])
            if row is not None and row.user_id == data.user_id:
                return to_session(row)
            # Another user's id: refused without saying anything about that session.
            raise ConflictError("session_id is already in use")

    async def list(self, user_id: uuid.UUID, limit: int, offset: int) -> schemas.SessionPage:
        async with self._transaction() as db:
            rows, total = await SessionRepository(session=db).get_many_and_count(
                LimitOffset(limit=limit, offset=offset),
                user_id=user_id,
                order_by=[(SessionModel.created_at, True), (SessionModel.id, True)],
                # The window-function count reports 0 for an offset past the end.
                count_with_window_function=False,
            )
            return schemas.SessionPage(
                items=[to_session(row) for row in rows], total=total, limit=limit, offset=offset
            )

    async def get(self, user_id: uuid.UUID, session_id: uuid.UUID) -> schemas.Session:
        async with self._transaction() as db:
            return to_session(await self._owned(db, user_id, session_id))

    @staticmethod
    async def _entries(db: AsyncSession, session: SessionModel, last: int | None) -> Sequence[EntryModel]:
        # Bounded by the entry_count just read, so a turn committed in between (this is READ
        # COMMITTED) never shows up half-counted: entries and count always agree.
        upper = session.entry_count
        lower = 0 if last is None else max(0, upper - last)
        if lower >= upper:
            return []
        return await EntryRepository(session=db).get_many(
            EntryModel.seq >= lower,
            EntryModel.seq < upper,
            session_id=session.id,
            order_by=(EntryModel.seq, False),
        )

    async def entries(
        self, user_id: uuid.UUID, session_id: uuid.UUID, last: int | None
    ) -> schemas.EntryList:
        async with self._transaction() as db:
            session = await self._owned(db, user_id, session_id)
            rows = await self._entries(db, session, last)
            return schemas.EntryList(items=[to_entry(row) for row in rows])

    async def context(self, user_id: uuid.UUID, session_id: uuid.UUID, window: int) -> schemas.SessionContext:
        async with self._transaction() as db:
            session = await self._owned(db, user_id, session_id)
            rows = await self._entries(db, session, window) if window > 0 else []
            return schemas.SessionContext(session=to_session(session), entries=[to_entry(row) for row in rows])

    async def append_turn(self, session_id: uuid.UUID, data: schemas.TurnAppend) -> schemas.TurnResult:
        model_name = None if data.model_name is None else required_text(data.model_name, "model_name")
        contents = [clean_text(entry.content) for entry in data.entries]
        for index, content in enumerate(contents):
            if len(content.encode("utf-8")) > schemas.MAX_CONTENT_BYTES:
                message = f"entries[{index}].content exceeds {schemas.MAX_CONTENT_BYTES} bytes of UTF-8"
                raise BadRequestError(
                    message, details=[{"message": message, "key": f"entries[{index}].content", "source": "body"}]
                )
        async with self._transaction() as db:
            # The row lock serializes every append (and replay) of this session: seq numbers
            # come from entry_count under the lock, so they are contiguous, and a replay waits
            # for the first attempt to commit and then finds its turn row.
            session = await self._owned(db, data.user_id, session_id, lock=True)
            turns = TurnRepository(session=db)
            done = await turns.get_one_or_none(session_id=session.id, turn_id=data.turn_id)
            if done is not None:
                return schemas.TurnResult(
                    session_id=session.id,
                    turn_id=done.turn_id,
                    first_seq=done.first_seq,
                    count=done.count,
                    entry_count=done.first_seq + done.count,
                    created=False,
                )
            first_seq = session.entry_count
            if first_seq + len(contents) > schemas.MAX_INT4:
                raise BadRequestError("session has too many entries")
            now = await self._clock(db)
            await EntryRepository(session=db).add_many(
                [
                    EntryModel(
                        session_id=session.id,
                        seq=first_seq + offset,
                        role=entry.role,
                        content=content,
                        turn_id=data.turn_id,
                        created_at=now,
                    )
                    for offset, (entry, content) in enumerate(zip(data.entries, contents))
                ]
            )
            await turns.add(
                TurnModel(
                    session_id=session.id,
                    turn_id=data.turn_id,
                    first_seq=first_seq,
                    count=len(contents),
                    created_at=now,
                ),
                auto_refresh=False,
            )
            session.entry_count = first_seq + len(contents)
            session.updated_at = now
            if data.prompt is not None:
                session.prompt = clean_text(data.prompt)
            if model_name is not None:
                session.model_name = model_name
            return schemas.TurnResult(
                session_id=session.id,
                turn_id=data.turn_id,
                first_seq=first_seq,
                count=len(contents),
                entry_count=session.entry_count,
                created=True,
            )

    async def update_summary(self, session_id: uuid.UUID, data: schemas.SummaryUpdate) -> schemas.Session:
        async with self._transaction() as db:
            # Locked so that two updates racing cannot both pass the monotonicity check.
            session = await self._owned(db, data.user_id, session_id, lock=True)
            replay = session.summary_turn_id is not None and session.summary_turn_id == data.turn_id
            if not replay and data.summarized_upto >= session.summarized_upto:
                session.summary = clean_text(data.summary)
                session.summarized_upto = data.summarized_upto
                session.summary_turn_id = data.turn_id
                session.updated_at = await self._clock(db)
                await db.flush()
            return to_session(session)

    async def delete(self, user_id: uuid.UUID, session_id: uuid.UUID) -> None:
        async with self._transaction() as db:
            # Entries and turns go with it (ON DELETE CASCADE).
            deleted = await SessionRepository(session=db).delete_where(id=session_id, user_id=user_id)
            if not deleted:
                raise NotFoundError("session not found")
