"""Idempotency keys: a mutating call and the record of its key commit in one transaction.

The key row is inserted first. A second call with the same key blocks on that insert until the
first transaction ends; if the first committed, the second finds the stored reply and returns it
without touching anything; if the first failed (and rolled back), the second simply runs. Only
successful replies are stored, so a refused call (say, 402) may be retried with the same key.

What is stored is the reply's JSON (and the status the route answers it with); a replay decodes
it back into the reply's own struct type, so services hand their controllers structs, never
HTTP responses, and the reply encodes to the same bytes the first call sent.

The turn's own calls do not come here: a reserve with ``turn_id`` is idempotent on the turn,
settle and release on the reservation's state (see chat_billing.reservations.services).
"""
from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import msgspec

from chat_billing.pg import ConnectionPool
from chat_billing.web import encode
from chat_common.errors import ConflictError

CLAIM = "INSERT INTO idempotency (key, fingerprint) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING RETURNING key"
STORED = "SELECT fingerprint, status_code, response FROM idempotency WHERE key = $1"
REMEMBER = "UPDATE idempotency SET status_code = $2, response = $3 WHERE key = $1"

Reply = TypeVar("Reply", bound=msgspec.Struct)


def fingerprint(operation: str, request: msgspec.Struct | None, *scope: object) -> str:
    """What the key stands for: the operation, its target and the request minus the key itself."""
    fields: dict[str, Any] = {} if request is None else msgspec.structs.asdict(request)
    fields.pop("idempotency_key", None)
    payload = encode([operation, [str(part) for part in scope], fields])
    return hashlib.sha256(payload).hexdigest()


async def run_once(
    pool: ConnectionPool,
    *,
    key: str | None,
    request_fingerprint: str,
    reply_type: type[Reply],
    status_code: int,
    work: Callable[[asyncpg.Connection], Awaitable[Reply]],
) -> Reply:
    """Run ``work`` in one transaction, at most once per key, and return its result; a replay
    returns the stored result decoded into ``reply_type`` (BEGIN, claim, the work, remember,
    COMMIT; without a key just the work in a transaction). ``status_code`` is the status the
    route answers with, recorded beside the reply."""
    async with pool.acquire() as connection, connection.transaction():
        if key is not None and await connection.fetchval(CLAIM, key, request_fingerprint) is None:
            stored = await connection.fetchrow(STORED, key)
            if stored["fingerprint"] != request_fingerprint:
                raise ConflictError(
                    "idempotency_key was already used for a different request", details={"idempotency_key": key}
                )
            return msgspec.json.decode(stored["response"], type=reply_type)
        reply = await work(connection)
        if key is not None:
            await connection.execute(REMEMBER, key, status_code, encode(reply).decode())
    return reply
