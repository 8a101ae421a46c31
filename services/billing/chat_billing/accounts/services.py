"""Balances and the ledger.

Every balance change is one statement: a conditional UPDATE of the user's row (whose row lock
orders concurrent changes of one user) feeding the INSERT of the ledger row that records it.
Only settling reads the balance first, and it reads it under that same row lock.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import msgspec
from advanced_alchemy.filters import LimitOffset
from advanced_alchemy.repository import SQLAlchemyAsyncRepository
from sqlalchemy import BigInteger, ColumnElement, Integer, Row, Text, Uuid, cast, func, insert, literal, select, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession

from chat_billing.accounts.models import LedgerEntry
from chat_billing.accounts.schemas import AmountRequest, BalanceReply, LedgerEntryReply, LedgerPage
from chat_billing.db import Database
from chat_billing.pg import Pg
from chat_billing.idempotency import fingerprint, run_once
from chat_billing.metrics import LEDGER_OPERATIONS
from chat_billing.inputs import MAX_MONEY_NANOS, money_in_nanos
from chat_billing.reservations.models import Reservation
from chat_billing.users.models import User
from chat_common.errors import BadRequestError, InsufficientBalanceError, NotFoundError
from chat_common.money import nanos_to_dollars

_DETAILS_JSON = msgspec.json.Encoder(decimal_format="number")


class LedgerRepository(SQLAlchemyAsyncRepository[LedgerEntry]):
    model_type = LedgerEntry
    # The window-function count reports 0 for a page past the end; a page must report the total.
    count_with_window_function = False


class UserNotFound(NotFoundError):
    default_message = "user not found"


@dataclass(frozen=True)
class LedgerNote:
    """What a ledger row records besides the amounts."""

    kind: str
    model_id: int | None = None
    turn_id: str | None = None
    reservation_id: uuid.UUID | None = None
    idempotency_key: str | None = None
    reason: str | None = None
    details: Any = None


_USERS = User.__table__
_LEDGER = LedgerEntry.__table__


async def shift_balance(
    session: AsyncSession,
    user_id: uuid.UUID,
    delta_nanos: int,
    note: LedgerNote,
    *conditions: ColumnElement[bool],
    charged_nanos: int | None = None,
    shortfall_nanos: int = 0,
) -> Row[Any] | None:
    """Add ``delta_nanos`` (signed) to the balance when ``conditions`` hold on the user's row,
    and write the ledger row, in one statement: the conditional UPDATE is the atomicity (its row
    lock orders concurrent changes) and no balance ever changes without its ledger row.

    Returns the ledger row, or None when the user is unknown or a condition does not hold.
    """
    moved = (
        update(_USERS)
        .where(_USERS.c.id == user_id, *conditions)
        .values(balance_nanos=_USERS.c.balance_nanos + delta_nanos)
        .returning(_USERS.c.balance_nanos)
        .cte("moved")
    )
    return await _write_ledger(
        session, note, moved,
        user_id=user_id,
        amount_nanos=literal(delta_nanos, BigInteger),
        balance_after_nanos=moved.c.balance_nanos,
        charged_nanos=literal(charged_nanos, BigInteger),
        shortfall_nanos=literal(shortfall_nanos, BigInteger),
    )


async def settle_balance(
    session: AsyncSession, user_id: uuid.UUID, returned_nanos: int, cost_nanos: int, note: LedgerNote
) -> Row[Any]:
    """Give back ``returned_nanos`` and take ``cost_nanos``, never below zero; the ledger row
    records what was charged and the shortfall (cost the balance could not cover).

    The row is locked by a statement of its own before the change. Locking inside the UPDATE
    (``UPDATE ... FROM (SELECT ... FOR NO KEY UPDATE)``) deadlocks under load: the UPDATE part
    queues on the older row version its snapshot saw, behind transactions waiting for this one.
    After the lock, the next statement's snapshot already sees the version this one holds.
    """
    before = (
        await session.execute(
            select(_USERS.c.balance_nanos).where(_USERS.c.id == user_id).with_for_update(key_share=True)
        )
    ).scalar_one()
    charged = min(cost_nanos, before + returned_nanos)
    entry = await shift_balance(
        session, user_id, returned_nanos - charged, note,
        charged_nanos=charged, shortfall_nanos=cost_nanos - charged,
    )
    assert entry is not None  # the row is locked by this transaction
    return entry


async def _write_ledger(
    session: AsyncSession, note: LedgerNote, moved: Any, *, user_id: uuid.UUID, **amounts: ColumnElement[Any]
) -> Row[Any] | None:
    details = None
    if note.details is not None:
        # Encoded here so decimals in caller-supplied details stay numbers (json.dumps refuses them).
        details = _DETAILS_JSON.encode(note.details).decode()
    values: dict[str, ColumnElement[Any]] = {
        "user_id": literal(user_id, Uuid),
        "kind": literal(note.kind, Text),
        "model_id": literal(note.model_id, Integer),
        "turn_id": literal(note.turn_id, Text),
        "reservation_id": literal(note.reservation_id, Uuid),
        "idempotency_key": literal(note.idempotency_key, Text),
        "reason": literal(note.reason, Text),
        "details": cast(literal(details, Text), JSONB),
        **amounts,
    }
    statement = (
        insert(_LEDGER)
        .from_select(list(values), select(*values.values()).select_from(moved))
        .returning(*_LEDGER.c)
    )
    row = (await session.execute(statement)).first()
    if row is not None:
        LEDGER_OPERATIONS.labels(note.kind).inc()
    return row


async def user_exists(session: AsyncSession, user_id: uuid.UUID) -> bool:
    return (await session.execute(select(User.id).where(User.id == user_id))).first() is not None


async def current_balance(session: AsyncSession, user_id: uuid.UUID) -> int | None:
    return (await session.execute(select(User.balance_nanos).where(User.id == user_id))).scalar_one_or_none()


# One round trip: the balance and what open reservations hold.
BALANCE = (
    "SELECT u.balance_nanos, (SELECT coalesce(sum(r.amount_nanos), 0)::bigint FROM reservations r"
    " WHERE r.user_id = u.id AND r.status = 'open') AS reserved_nanos"
    " FROM users u WHERE u.id = $1"
)


class AccountService:
    def __init__(self, db: Database, pg: Pg) -> None:
        self.db = db
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

    async def credit(self, user_id: uuid.UUID, request: AmountRequest) -> Any:
        amount = _amount_of(request)

        async def work(session: AsyncSession) -> LedgerEntryReply:
            note = LedgerNote("credit", idempotency_key=request.idempotency_key, reason=request.reason)
            entry = await shift_balance(
                session, user_id, amount, note, User.balance_nanos <= MAX_MONEY_NANOS - amount
            )
            if entry is None:
                if not await user_exists(session, user_id):
                    raise UserNotFound()
                raise BadRequestError(
                    f"a balance may not exceed {nanos_to_dollars(MAX_MONEY_NANOS)} dollars",
                    details={"max_balance_nanos": MAX_MONEY_NANOS},
                )
            return LedgerEntryReply.of(entry)

        return await run_once(
            self.db, key=request.idempotency_key, request_fingerprint=fingerprint("credit", request, user_id),
            status_code=200, work=work,
        )

    async def debit(self, user_id: uuid.UUID, request: AmountRequest) -> Any:
        """A manual charge. Unlike settling a turn it is refused, not clamped, when the balance
        does not cover it: an operator asked for an exact amount."""
        amount = _amount_of(request)

        async def work(session: AsyncSession) -> LedgerEntryReply:
            note = LedgerNote("debit", idempotency_key=request.idempotency_key, reason=request.reason)
            entry = await shift_balance(
                session, user_id, -amount, note, User.balance_nanos >= amount, charged_nanos=amount
            )
            if entry is None:
                available = await current_balance(session, user_id)
                if available is None:
                    raise UserNotFound()
                raise InsufficientBalanceError(
                    details={"balance_nanos": available, "required_nanos": amount}
                )
            return LedgerEntryReply.of(entry)

        return await run_once(
            self.db, key=request.idempotency_key, request_fingerprint=fingerprint("debit", request, user_id),
            status_code=200, work=work,
        )

    async def ledger(self, user_id: uuid.UUID, limit: int, offset: int) -> LedgerPage:
        async with self.db.sessions() as session:
            if not await user_exists(session, user_id):
                raise UserNotFound()
            entries, total = await LedgerRepository(session=session).get_many_and_count(
                LimitOffset(limit=limit, offset=offset),
                LedgerEntry.user_id == user_id,
                order_by=(LedgerEntry.id, True),
            )
        return LedgerPage(items=[LedgerEntryReply.of(e) for e in entries], total=total, limit=limit, offset=offset)


def _amount_of(request: AmountRequest) -> int:
    amount = money_in_nanos(
        request.amount, request.amount_nanos, "amount", "amount_nanos", required=True, positive=True
    )
    assert amount is not None
    return amount
