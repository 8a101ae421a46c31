"""Idempotency keys: a mutating call and the record of its key commit in one transaction.

The key row is inserted first. A second call with the same key blocks on that insert until the
first transaction ends; if the first committed, the second finds the stored reply and returns it
without touching anything; if the first failed (and rolled back), the second simply runs. Only
successful replies are stored, so a refused call (say, 402) may be retried with the same key.
"""
from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec
from litestar import Response
from sqlalchemy import DateTime, Integer, Text, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from chat_billing.db import BillingBase, Database
from chat_billing.web import encode, json_reply
from chat_common.errors import ConflictError


class IdempotencyRecord(BillingBase):
    __tablename__ = "idempotency"

    key: Mapped[str] = mapped_column(Text, primary_key=True)
    fingerprint: Mapped[str] = mapped_column(Text)
    status_code: Mapped[int | None] = mapped_column(Integer)
    response: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


@dataclass(frozen=True)
class StoredReply:
    status_code: int
    body: bytes


def fingerprint(operation: str, request: msgspec.Struct | None, *scope: object) -> str:
    """What the key stands for: the operation, its target and the request minus the key itself."""
    fields: dict[str, Any] = {} if request is None else msgspec.structs.asdict(request)
    fields.pop("idempotency_key", None)
    payload = encode([operation, [str(part) for part in scope], fields])
    return hashlib.sha256(payload).hexdigest()


async def claim(session: AsyncSession, key: str, request_fingerprint: str) -> StoredReply | None:
    """Take the key for this transaction, or return the reply stored under it."""
    inserted = await session.execute(
        insert(IdempotencyRecord)
        .values(key=key, fingerprint=request_fingerprint)
        .on_conflict_do_nothing(index_elements=[IdempotencyRecord.key])
        .returning(IdempotencyRecord.key)
    )
    if inserted.first() is not None:
        return None
    stored = (
        await session.execute(select(IdempotencyRecord).where(IdempotencyRecord.key == key))
    ).scalar_one()
    if stored.fingerprint != request_fingerprint:
        raise ConflictError(
            "idempotency_key was already used for a different request", details={"idempotency_key": key}
        )
    assert stored.status_code is not None and stored.response is not None
    return StoredReply(stored.status_code, stored.response.encode())


async def remember(session: AsyncSession, key: str, status_code: int, body: bytes) -> None:
    await session.execute(
        update(IdempotencyRecord)
        .where(IdempotencyRecord.key == key)
        .values(status_code=status_code, response=body.decode())
    )


async def run_once(
    db: Database,
    *,
    key: str | None,
    request_fingerprint: str,
    status_code: int,
    work: Callable[[AsyncSession], Awaitable[Any]],
) -> Response[bytes]:
    """Run ``work`` in one transaction, at most once per key; reply with its encoded result."""
    async with db.sessions.begin() as session:
        if key is not None:
            stored = await claim(session, key, request_fingerprint)
            if stored is not None:
                return json_reply(stored.body, stored.status_code)
        body = encode(await work(session))
        if key is not None:
            await remember(session, key, status_code, body)
    return json_reply(body, status_code)


# -- the same on asyncpg ------------------------------------------------------------------------

_CLAIM = "INSERT INTO idempotency (key, fingerprint) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING RETURNING key"
_STORED = "SELECT fingerprint, status_code, response FROM idempotency WHERE key = $1"
_REMEMBER = "UPDATE idempotency SET status_code = $2, response = $3 WHERE key = $1"


async def run_once_pg(
    pool: Any,
    *,
    key: str,
    request_fingerprint: str,
    status_code: int,
    work: Callable[[Any], Awaitable[Any]],
) -> Response[bytes]:
    """``run_once`` on an asyncpg pool: the key row, the work and the stored reply commit in one
    transaction (BEGIN, claim, work, remember, COMMIT)."""
    async with pool.acquire() as connection, connection.transaction():
        if await connection.fetchval(_CLAIM, key, request_fingerprint) is None:
            stored = await connection.fetchrow(_STORED, key)
            if stored["fingerprint"] != request_fingerprint:
                raise ConflictError(
                    "idempotency_key was already used for a different request", details={"idempotency_key": key}
                )
            return json_reply(stored["response"].encode(), stored["status_code"])
        body = encode(await work(connection))
        await connection.execute(_REMEMBER, key, status_code, body.decode())
    return json_reply(body, status_code)
