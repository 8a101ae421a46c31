"""Balances and the ledger.

Every balance change is one statement: a conditional UPDATE of the user's row (whose row lock
orders concurrent changes of one user) feeding the INSERT of the ledger row that records it.
The turn's changes (reserve, settle, release, summary charges) are functions of migration 0002
that follow the same rule.
"""
from __future__ import annotations

import uuid
from typing import Any

import asyncpg

from chat_billing.accounts.schemas import (
    AmountRequest,
    BalanceReply,
    LedgerEntryReply,
    LedgerPage,
)
from chat_billing.idempotency import fingerprint, run_once
from chat_billing.inputs import MAX_MONEY_NANOS, money_in_nanos
from chat_billing.metrics import LEDGER_OPERATIONS
from chat_billing.pg import Pg
from chat_common.errors import BadRequestError, InsufficientBalanceError, NotFoundError
from chat_common.money import nanos_to_dollars

LEDGER_COLUMNS = (
    "id, user_id, kind, amount_nanos, balance_after_nanos, model_id, turn_id, reservation_id, idempotency_key,"
    " reason, charged_nanos, shortfall_nanos, details::text AS details, created_at"
)
# Add $2 (signed) to the balance if it stays within [0, $3], and write the ledger row, in one
# statement: the conditional UPDATE is the atomicity and no balance changes without its row.
SHIFT = (
    "WITH moved AS ("
    " UPDATE users SET balance_nanos = balance_nanos + $2"
    " WHERE id = $1 AND balance_nanos + $2 >= 0 AND balance_nanos + $2 <= $3"
    " RETURNING balance_nanos)"
    " INSERT INTO ledger (user_id, kind, amount_nanos, balance_after_nanos, idempotency_key, reason, charged_nanos)"
    " SELECT $1, $4, $2, moved.balance_nanos, $5, $6, $7 FROM moved"
    f" RETURNING {LEDGER_COLUMNS}"
)
CURRENT_BALANCE = "SELECT balance_nanos FROM users WHERE id = $1"
USER_EXISTS = "SELECT true FROM users WHERE id = $1"
# One round trip: the balance and what open reservations hold.
BALANCE = (
    "SELECT u.balance_nanos, (SELECT coalesce(sum(r.amount_nanos), 0)::bigint FROM reservations r"
    " WHERE r.user_id = u.id AND r.status = 'open') AS reserved_nanos"
    " FROM users u WHERE u.id = $1"
)
LEDGER_TOTAL = "SELECT (SELECT true FROM users WHERE id = $1) AS known, (SELECT count(*) FROM ledger WHERE user_id = $1)"
LEDGER_PAGE = f"SELECT {LEDGER_COLUMNS} FROM ledger WHERE user_id = $1 ORDER BY id DESC LIMIT $2 OFFSET $3"


class UserNotFound(NotFoundError):
    default_message = "user not found"


async def shift_balance(
    connection: asyncpg.Connection,
    user_id: uuid.UUID,
    delta_nanos: int,
    kind: str,
    *,
    idempotency_key: str | None = None,
    reason: str | None = None,
    charged_nanos: int | None = None,
    maximum: int = MAX_MONEY_NANOS,
) -> Any:
    """The ledger row, or None when the user is unknown or the balance would leave [0, maximum]."""
    row = await connection.fetchrow(
        SHIFT, user_id, delta_nanos, maximum, kind, idempotency_key, reason, charged_nanos
    )
    if row is not None:
        LEDGER_OPERATIONS.labels(kind).inc()
    return row


async def user_exists(connection: asyncpg.Connection, user_id: uuid.UUID) -> bool:
    return await connection.fetchval(USER_EXISTS, user_id) is not None


class AccountService:
    def __init__(self, pg: Pg) -> None:
        self.pg = pg

    async def balance(self, user_id: uuid.UUID) -> BalanceReply:
        row = await self.pg.pool.fetchrow(BALANCE, user_id)
        if row is None:
            raise UserNotFound()
        balance = row["balance_nanos"]
        return BalanceReply(
            user_id=str(user_id), balance=nanos_to_dollars(balance), balance_nanos=balance,
            reserved_nanos=row["reserved_nanos"],
        )

    async def credit(self, user_id: uuid.UUID, request: AmountRequest) -> LedgerEntryReply:
        amount = _amount_of(request)

        async def work(connection: asyncpg.Connection) -> LedgerEntryReply:
            entry = await shift_balance(
                connection, user_id, amount, "credit", idempotency_key=request.idempotency_key, reason=request.reason
            )
            if entry is None:
                if not await user_exists(connection, user_id):
                    raise UserNotFound()
                raise BadRequestError(
                    f"a balance may not exceed {nanos_to_dollars(MAX_MONEY_NANOS)} dollars",
                    details={"max_balance_nanos": MAX_MONEY_NANOS},
                )
            return LedgerEntryReply.of_row(entry)

        return await run_once(
            self.pg.pool, key=request.idempotency_key,
            request_fingerprint=fingerprint("credit", request, user_id), reply_type=LedgerEntryReply,
            status_code=200, work=work,
        )

    async def debit(self, user_id: uuid.UUID, request: AmountRequest) -> LedgerEntryReply:
        """A manual charge. Unlike settling a turn it is refused, not clamped, when the balance
        does not cover it: an operator asked for an exact amount."""
        amount = _amount_of(request)

        async def work(connection: asyncpg.Connection) -> LedgerEntryReply:
            entry = await shift_balance(
                connection, user_id, -amount, "debit", idempotency_key=request.idempotency_key,
                reason=request.reason, charged_nanos=amount,
            )
            if entry is None:
                available = await connection.fetchval(CURRENT_BALANCE, user_id)
                if available is None:
                    raise UserNotFound()
                raise InsufficientBalanceError(details={"balance_nanos": available, "required_nanos": amount})
            return LedgerEntryReply.of_row(entry)

        return await run_once(
            self.pg.pool, key=request.idempotency_key,
            request_fingerprint=fingerprint("debit", request, user_id), reply_type=LedgerEntryReply,
            status_code=200, work=work,
        )

    async def ledger(self, user_id: uuid.UUID, limit: int, offset: int) -> LedgerPage:
        async with self.pg.pool.acquire() as connection:
            known, total = await connection.fetchrow(LEDGER_TOTAL, user_id)
            if not known:
                raise UserNotFound()
            rows = await connection.fetch(LEDGER_PAGE, user_id, limit, offset)
        return LedgerPage(items=[LedgerEntryReply.of_row(row) for row in rows], total=total, limit=limit, offset=offset)


def _amount_of(request: AmountRequest) -> int:
    amount = money_in_nanos(
        request.amount, request.amount_nanos, "amount", "amount_nanos", required=True, positive=True
    )
    assert amount is not None
    return amount
