"""Reserve, settle, release, lease and expire: each one call of a function of migration 0002, so
one SQL round trip (its own transaction) on asyncpg, with the statements as constants.

Lock order, everywhere (in those functions): the reservation row, then the user row. A reserve
takes only the user row (its reservation is new), so no two of these can deadlock. The user row
is only ever locked FOR NO KEY UPDATE (what an UPDATE of the balance takes), which does not
conflict with the KEY SHARE locks that inserting a reservation or ledger row takes on it.

Idempotency: a reserve with ``turn_id`` is idempotent on it (a unique index); settle and
release are idempotent on the reservation's state (settled once; a closed hold is answered as
it is), so none of these touches the idempotency table. A reserve without ``turn_id`` (an
operator's, a test's) still goes through it, keyed by ``idempotency_key``.
"""
from __future__ import annotations

import logging
import uuid
from typing import Any

import asyncpg
import msgspec

from chat_billing.accounts.services import UserNotFound
from chat_billing.idempotency import fingerprint, run_once
from chat_billing.inputs import reject_nul_characters
from chat_billing.metrics import (
    LEDGER_OPERATIONS,
    RESERVATION_FAILURES,
    SMALLER_RESERVATIONS,
    count_charge,
)
from chat_billing.pg import Pg
from chat_billing.reservations.schemas import (
    LeaseRequest,
    ReleaseRequest,
    ReservationReply,
    ReserveRequest,
    SettleRequest,
)
from chat_common.errors import (
    AppError,
    BadRequestError,
    ConflictError,
    DailyLimitError,
    InsufficientBalanceError,
    ModelNotEntitledError,
    MonthlyLimitError,
    NotFoundError,
    SessionLimitError,
    SpendLimitError,
)

logger = logging.getLogger(__name__)

EXPIRE_BATCH = 1000
# Reservations released per statement (one transaction) by the sweep.
EXPIRE_CHUNK = 100

# billing_reserve, made smaller for a balance-aware turn, and billing_settle within that (migration 0006)
RESERVE = (
    "SELECT (f.o_view).*, f.o_max_output_tokens AS max_output_tokens"
    " FROM billing_reserve_aware($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) f"
)
SETTLE = "SELECT * FROM billing_settle_within($1, $2, $3, $4, $5, $6::jsonb, $7::jsonb)"
RELEASE = "SELECT * FROM billing_release($1, $2, $3)"
LEASE = "SELECT * FROM billing_lease($1, $2, $3)"
EXPIRE = "SELECT billing_expire($1)"
GET = (
    "SELECT v.* FROM reservations r,"
    " LATERAL reservation_view_of(r, 'found', (SELECT balance_nanos FROM users WHERE id = r.user_id)) v"
    " WHERE r.id = $1 AND r.user_id = $2"
)

_DETAILS_JSON = msgspec.json.Encoder(decimal_format="number")

LIMIT_REFUSALS: dict[str, tuple[type[SpendLimitError], str]] = {
    "daily_limit": (DailyLimitError, "daily"),
    "monthly_limit": (MonthlyLimitError, "monthly"),
    "session_limit": (SessionLimitError, "per_session"),
}


class ReservationNotFound(NotFoundError):
    default_message = "reservation not found"


async def fetch_retrying(pool: Any, sql: str, *args: Any) -> Any:
    """One function call; a serialization failure it raised on purpose (a concurrent twin
    committed first, and this call rolled back) is asked once more, and then finds the twin."""
    for attempt in range(3):
        try:
            return await pool.fetchrow(sql, *args)
        except asyncpg.SerializationError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def details_json(details: dict[str, Any] | None) -> str | None:
    if details is None:
        return None
    reject_nul_characters(details, "details")
    # Encoded here so decimals in caller-supplied details stay numbers.
    return _DETAILS_JSON.encode(details).decode()


_RECEIPT_JSON = msgspec.json.Encoder()


def receipt_json(receipt: Any) -> str | None:
    return None if receipt is None else _RECEIPT_JSON.encode(receipt).decode()


def reserve_reply(row: Any, request: ReserveRequest) -> ReservationReply:
    outcome = row["outcome"]
    if outcome == "reserved":
        LEDGER_OPERATIONS.labels("reserve").inc()
        if row["max_output_tokens"] is not None:
            SMALLER_RESERVATIONS.inc()
    if outcome in ("reserved", "existing"):
        reply = ReservationReply.of_row(row)
        reply.max_output_tokens = row["max_output_tokens"]
        return reply
    if outcome == "insufficient_balance":
        raise InsufficientBalanceError(
            details={"balance_nanos": row["balance_nanos"], "required_nanos": row["amount_nanos"]}
        )
    if outcome in LIMIT_REFUSALS:
        error, name = LIMIT_REFUSALS[outcome]
        raise error(
            details={
                "limit": name, "limit_nanos": row["limit_nanos"], "spent_nanos": row["spent_nanos"],
                "held_nanos": row["held_nanos"], "required_nanos": row["amount_nanos"],
            }
        )
    if outcome == "user_not_found":
        raise UserNotFound()
    if outcome == "model_mismatch":
        raise BadRequestError(
            f"model_id {request.model_id} is {row['model_name']!r}, not {request.model_name!r}",
            details={"model_id": request.model_id, "model_name": request.model_name},
        )
    if outcome == "turn_conflict":
        raise ConflictError("turn_id was reserved for another user", details={"turn_id": request.turn_id})
    raise ModelNotEntitledError(details={"model_id": request.model_id, "model_name": request.model_name})


def settle_reply(row: Any) -> ReservationReply:
    outcome = row["outcome"]
    if outcome == "not_found":
        raise ReservationNotFound()
    if outcome == "settled":
        LEDGER_OPERATIONS.labels("settle").inc()
        count_charge("turn", row["charged_nanos"], row["shortfall_nanos"])
    return ReservationReply.of_row(row)


class ReservationService:
    def __init__(self, pg: Pg, default_ttl_seconds: int) -> None:
        self.pg = pg
        self.default_ttl_seconds = default_ttl_seconds

    async def reserve(self, request: ReserveRequest) -> ReservationReply:
        try:
            return await self._reserve(request)
        except AppError as exc:
            RESERVATION_FAILURES.labels(exc.code).inc()
            raise

    async def _reserve(self, request: ReserveRequest) -> ReservationReply:
        if request.model_id is None and request.model_name is None:
            raise BadRequestError("model_id or model_name is required")
        args = (
            request.user_id, request.model_id, request.model_name, request.input_tokens, request.output_tokens,
            request.turn_id, request.idempotency_key, request.ttl_seconds or self.default_ttl_seconds,
            request.session_id, request.min_output_tokens,
        )
        if request.turn_id is not None:
            # The turn id is the idempotency: one statement, no idempotency row.
            return reserve_reply(await fetch_retrying(self.pg.pool, RESERVE, *args), request)

        async def work(connection: asyncpg.Connection) -> ReservationReply:
            return reserve_reply(await connection.fetchrow(RESERVE, *args), request)

        return await run_once(
            self.pg.pool, key=request.idempotency_key, request_fingerprint=fingerprint("reserve", request),
            reply_type=ReservationReply, status_code=201, work=work,
        )

    async def settle(self, reservation_id: uuid.UUID, request: SettleRequest) -> ReservationReply:
        """Give the hold back and take the actual cost, never below zero: what the balance cannot
        cover is recorded as shortfall, not owed. A reservation released meanwhile (expired,
        say) is still charged, since the turn it paid for did happen. Settled already: the
        stored outcome, nothing more charged."""
        row = await self.pg.pool.fetchrow(
            SETTLE, reservation_id, request.user_id, request.cost_nanos, request.turn_id,
            request.idempotency_key, details_json(request.details), receipt_json(request.receipt),
        )
        return settle_reply(row)

    async def release(self, reservation_id: uuid.UUID, request: ReleaseRequest) -> ReservationReply:
        """Give the whole hold back (the turn failed). A closed reservation is left as it is."""
        row = await self.pg.pool.fetchrow(RELEASE, reservation_id, request.user_id, request.idempotency_key)
        if row["outcome"] == "not_found":
            raise ReservationNotFound()
        if row["outcome"] == "released":
            LEDGER_OPERATIONS.labels("release").inc()
        return ReservationReply.of_row(row)

    async def lease(self, reservation_id: uuid.UUID, request: LeaseRequest) -> ReservationReply:
        """Push an open hold's expiry to now + ttl; a closed one is answered as it is."""
        row = await self.pg.pool.fetchrow(LEASE, reservation_id, request.user_id, request.ttl_seconds)
        if row["outcome"] == "not_found":
            raise ReservationNotFound()
        return ReservationReply.of_row(row)

    async def get(self, reservation_id: uuid.UUID, user_id: uuid.UUID) -> ReservationReply:
        row = await self.pg.pool.fetchrow(GET, reservation_id, user_id)
        if row is None:
            raise ReservationNotFound()
        return ReservationReply.of_row(row)

    async def expire_due(self, limit: int = EXPIRE_BATCH) -> int:
        """Release open reservations past their expiry, up to ``limit``, in short transactions
        of EXPIRE_CHUNK; replicas sweeping at once skip each other's rows."""
        released = 0
        while released < limit:
            chunk = min(EXPIRE_CHUNK, limit - released)
            done = await self.pg.pool.fetchval(EXPIRE, chunk)
            released += done
            if done < chunk:
                break
        if released:
            LEDGER_OPERATIONS.labels("release").inc(released)
            logger.info("released expired reservations", extra={"released": released})
        return released
