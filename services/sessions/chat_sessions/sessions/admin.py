"""Per-user administration of the sessions service: export, import and erase one user's sessions
with their entries and turns, and the durable progress record of a user erase (migration 0008).

The gateway runs these (``chat-admin export-user``, ``import-user``, ``erase-user``); each call
here is about this service's own rows only.
"""
from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import msgspec
from litestar import Controller, get, post, put
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody

from chat_common import contracts as c
from chat_common.db import delete_naming, refresh_statistics, tables_with_columns
from chat_common.errors import (
    BadRequestError,
    ConflictError,
    NotFoundError,
    ValidationError,
    parse_uuid,
)
from chat_sessions.sessions.services import SessionsService, clean_text

# An import of a big history goes in one body.
MAX_IMPORT_BYTES = 512 * 1024 * 1024

EXPORT_SESSIONS = """
SELECT id::text, name, model_name, prompt, summary, summarized_upto, summary_turn_id::text, entry_count,
       idempotency_key, created_at, updated_at
  FROM sessions WHERE user_id = $1 ORDER BY created_at, id
"""
EXPORT_ENTRIES = """
SELECT e.session_id::text, e.seq, e.role, e.content, e.turn_id::text, e.created_at
  FROM entries e JOIN sessions s ON s.id = e.session_id
 WHERE s.user_id = $1 ORDER BY e.session_id, e.seq
"""
EXPORT_TURNS = """
SELECT t.session_id::text, t.turn_id::text, t.first_seq, t.count, t.created_at
  FROM turns t JOIN sessions s ON s.id = t.session_id
 WHERE s.user_id = $1 ORDER BY t.session_id, t.first_seq
"""
SESSION_IDS = "SELECT id FROM sessions WHERE user_id = $1"
LOCK_SESSIONS = "SELECT id FROM sessions WHERE user_id = $1 FOR UPDATE"
TURN_IDS = "SELECT DISTINCT t.turn_id::text FROM turns t JOIN sessions s ON s.id = t.session_id WHERE s.user_id = $1"
OWED = """
SELECT key, kind, session_id::text, turn_id::text, cost_nanos, reservation_id, model_name, receipt::text
  FROM outbox WHERE user_id = $1 ORDER BY created_at, id
"""
OWNERS = "SELECT id::text, user_id FROM sessions WHERE id = ANY($1::uuid[])"
IMPORT_SESSION = """
INSERT INTO sessions (id, user_id, name, model_name, prompt, summary, summarized_upto, summary_turn_id,
                      entry_count, idempotency_key, created_at, updated_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
ON CONFLICT (id) DO NOTHING
"""
# the search vector from the whole content (migration 0009's entry_vector), as findable as before
IMPORT_ENTRY = """
INSERT INTO entries (session_id, seq, role, content, turn_id, created_at, search)
VALUES ($1, $2, $3, $4, $5, $6, entry_vector($3, $4)) ON CONFLICT DO NOTHING
"""
IMPORT_TURN = """
INSERT INTO turns (session_id, turn_id, first_seq, count, created_at)
VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING
"""

ERASURE_COLUMNS = "subject, started_at, finished_at, runs, steps::text"
ERASURE_GET = f"SELECT {ERASURE_COLUMNS} FROM erasures WHERE subject = $1"
ERASURE_START = f"""
INSERT INTO erasures AS x (subject) VALUES ($1)
ON CONFLICT (subject) DO UPDATE SET runs = x.runs + 1
RETURNING {ERASURE_COLUMNS}
"""
ERASURE_STEP = f"""
UPDATE erasures SET steps = jsonb_set(steps, ARRAY[$2::text], $3::jsonb)
 WHERE subject = $1 RETURNING {ERASURE_COLUMNS}
"""
ERASURE_FINISH = f"UPDATE erasures SET finished_at = coalesce(finished_at, now()) WHERE subject = $1 RETURNING {ERASURE_COLUMNS}"

_removed_decoder = msgspec.json.Decoder(dict[str, c.Removed])
_receipt_decoder = msgspec.json.Decoder(c.ReceiptDetails)


def _erasure(row: Any) -> c.Erasure:
    return c.Erasure(
        subject=row[0], started_at=row[1], finished_at=row[2], runs=row[3], steps=_removed_decoder.decode(row[4])
    )


def _user(value: str) -> uuid.UUID:
    return parse_uuid(value, "user_id")


def _subject(value: str) -> str:
    if len(value) != 64 or any(ch not in "0123456789abcdef" for ch in value):
        raise ValidationError(
            "subject must be 64 lower-case hex digits",
            details=[{"message": "Invalid subject", "key": "subject", "source": "path"}],
        )
    return value


class SessionsAdmin:
    def __init__(self, service: SessionsService) -> None:
        self.service = service

    @property
    def pool(self) -> asyncpg.Pool:
        return self.service._pool()

    async def export(self, user_id: uuid.UUID) -> c.SessionsExport:
        async with self.pool.acquire() as connection, connection.transaction(isolation="repeatable_read", readonly=True):
            sessions = await connection.fetch(EXPORT_SESSIONS, user_id)
            entries = await connection.fetch(EXPORT_ENTRIES, user_id)
            turns = await connection.fetch(EXPORT_TURNS, user_id)
        by_id: dict[str, c.ExportedSession] = {}
        for r in sessions:
            by_id[r[0]] = c.ExportedSession(
                session_id=r[0], session_name=r[1], model_name=r[2], prompt=r[3], summary=r[4], summarized_upto=r[5],
                summary_turn_id=r[6], entry_count=r[7], idempotency_key=r[8], created_at=r[9], updated_at=r[10],
            )
        for r in entries:
            by_id[r[0]].entries.append(c.ExportedEntry(seq=r[1], role=r[2], content=r[3], turn_id=r[4], created_at=r[5]))
        for r in turns:
            by_id[r[0]].turns.append(c.ExportedTurn(turn_id=r[1], first_seq=r[2], count=r[3], created_at=r[4]))
        return c.SessionsExport(sessions=list(by_id.values()))

    async def keys(self, user_id: uuid.UUID) -> c.SessionKeys:
        async with self.pool.acquire() as connection:
            sessions = await connection.fetch(SESSION_IDS, user_id)
            turns = await connection.fetch(TURN_IDS, user_id)
            owed = await connection.fetch(OWED, user_id)
        return c.SessionKeys(
            session_ids=[str(r[0]) for r in sessions],
            turn_ids=[r[0] for r in turns],
            owed=[
                c.Charge(
                    key=r[0], kind=r[1], user_id=str(user_id), session_id=r[2], turn_id=r[3], cost_nanos=r[4],
                    reservation_id=r[5], model_name=r[6],
                    receipt=None if r[7] is None else _receipt_decoder.decode(r[7]),
                )
                for r in owed
            ],
        )

    async def import_(self, user_id: uuid.UUID, data: c.SessionsExport) -> c.ImportedCount:
        """Idempotent: a session already stored for this user is kept as it is (an import cut
        short may be sent again); a session id of another user is refused (409), nothing written."""
        ids = [s.session_id for s in data.sessions]
        counts = {"sessions": 0, "entries": 0, "turns": 0}
        async with self.pool.acquire() as connection, connection.transaction():
            for sid, owner in await connection.fetch(OWNERS, ids):
                if owner != user_id:
                    raise ConflictError("a session id of the import belongs to another user", details={"session_id": sid})
            for s in data.sessions:
                if s.entry_count != len(s.entries) or [e.seq for e in s.entries] != list(range(len(s.entries))):
                    raise BadRequestError("a session's entries must be numbered 0..entry_count-1",
                                          details={"session_id": s.session_id})
                status = await connection.execute(
                    IMPORT_SESSION, s.session_id, user_id, s.session_name, s.model_name, clean_text(s.prompt),
                    clean_text(s.summary), s.summarized_upto, s.summary_turn_id, s.entry_count, s.idempotency_key,
                    s.created_at, s.updated_at,
                )
                if status.endswith(" 0"):
                    continue  # stored by an earlier attempt
                counts["sessions"] += 1
                await connection.executemany(
                    IMPORT_ENTRY,
                    [(s.session_id, e.seq, e.role, clean_text(e.content), e.turn_id, e.created_at) for e in s.entries],
                )
                await connection.executemany(
                    IMPORT_TURN, [(s.session_id, t.turn_id, t.first_seq, t.count, t.created_at) for t in s.turns]
                )
                counts["entries"] += len(s.entries)
                counts["turns"] += len(s.turns)
        return c.ImportedCount(imported=counts)

    async def erase(self, user_id: uuid.UUID) -> c.Removed:
        """Every row of this schema that names the user or one of the user's sessions: the
        sessions (with summaries and prompts), entries, turns, outbox rows, retention records,
        and whatever table a later migration adds with a ``user_id`` or ``session_id`` column.
        One transaction; repeating it removes nothing more."""
        schema = self.service._schema
        removed: dict[str, int] = {}
        async with self.pool.acquire() as connection, connection.transaction():
            tables = await tables_with_columns(connection, schema)
            session_ids = [r[0] for r in await connection.fetch(LOCK_SESSIONS, user_id)]
            ids_text = [str(s) for s in session_ids]
            # Rows tied to a session first (entries and turns would go by cascade; counted here),
            # then rows naming the user, then the sessions themselves.
            for table, columns in tables.items():
                if table == "sessions" or "session_id" not in columns:
                    continue
                removed[f"{schema}.{table}"] = await delete_naming(
                    connection, table, session_ids=ids_text, user_id=str(user_id) if "user_id" in columns else None
                )
            for table, columns in tables.items():
                if table == "sessions" or "session_id" in columns or "user_id" not in columns:
                    continue
                removed[f"{schema}.{table}"] = await delete_naming(connection, table, user_id=str(user_id))
            status = await connection.execute("DELETE FROM sessions WHERE user_id = $1", user_id)
            removed[f"{schema}.sessions"] = int(status.rsplit(" ", 1)[1])
            if any(removed.values()):
                await refresh_statistics(connection, [key.split(".", 1)[1] for key, n in removed.items() if n])
        return c.Removed(removed=removed)

    # -- the erase's progress record -------------------------------------------------------------

    async def erasure(self, subject: str) -> c.Erasure:
        row = await self.pool.fetchrow(ERASURE_GET, _subject(subject))
        if row is None:
            raise NotFoundError("no erasure recorded")
        return _erasure(row)

    async def erasure_start(self, subject: str) -> c.Erasure:
        return _erasure(await self.pool.fetchrow(ERASURE_START, _subject(subject)))

    async def erasure_step(self, subject: str, step: c.ErasureStep) -> c.Erasure:
        row = await self.pool.fetchrow(
            ERASURE_STEP, _subject(subject), step.step, msgspec.json.encode(step.removed).decode()
        )
        if row is None:
            raise NotFoundError("no erasure recorded")
        return _erasure(row)

    async def erasure_finish(self, subject: str) -> c.Erasure:
        row = await self.pool.fetchrow(ERASURE_FINISH, _subject(subject))
        if row is None:
            raise NotFoundError("no erasure recorded")
        return _erasure(row)


Admin = NamedDependency[SessionsAdmin]


class SessionsImport(c.SessionsExport, kw_only=True, forbid_unknown_fields=True):
    """The import body: an export, refusing fields an export does not have (like every request
    body of this service); the sessions inside are the export format's."""


class RemovedIn(c.Removed, kw_only=True, forbid_unknown_fields=True):
    pass


class ErasureStepIn(c.ErasureStep, kw_only=True, forbid_unknown_fields=True):
    """A step's record, refusing unknown fields."""

    removed: RemovedIn


class SessionsAdminController(Controller):
    """``/v1/admin``: one user's sessions as a whole (export, import, erase), and the progress
    records of erases. Service token required, like every call of this service."""

    path = "/v1/admin"
    tags = ["admin"]

    @get("/users/{user_id:str}/export")
    async def export_user(self, admin: Admin, user_id: FromPath[str]) -> c.SessionsExport:
        return await admin.export(_user(user_id))

    @get("/users/{user_id:str}/keys")
    async def user_keys(self, admin: Admin, user_id: FromPath[str]) -> c.SessionKeys:
        return await admin.keys(_user(user_id))

    @post("/users/{user_id:str}/import", status_code=200, request_max_body_size=MAX_IMPORT_BYTES)
    async def import_user(self, admin: Admin, user_id: FromPath[str], data: JSONBody[SessionsImport]) -> c.ImportedCount:
        return await admin.import_(_user(user_id), data)

    @post("/users/{user_id:str}/erase", status_code=200)
    async def erase_user(self, admin: Admin, user_id: FromPath[str]) -> c.Removed:
        return await admin.erase(_user(user_id))

    @get("/erasures/{subject:str}")
    async def get_erasure(self, admin: Admin, subject: FromPath[str]) -> c.Erasure:
        return await admin.erasure(subject)

    @put("/erasures/{subject:str}")
    async def start_erasure(self, admin: Admin, subject: FromPath[str]) -> c.Erasure:
        return await admin.erasure_start(subject)

    @post("/erasures/{subject:str}/steps", status_code=200)
    async def erasure_step(self, admin: Admin, subject: FromPath[str], data: JSONBody[ErasureStepIn]) -> c.Erasure:
        return await admin.erasure_step(subject, data)

    @post("/erasures/{subject:str}/finish", status_code=200)
    async def finish_erasure(self, admin: Admin, subject: FromPath[str]) -> c.Erasure:
        return await admin.erasure_finish(subject)
