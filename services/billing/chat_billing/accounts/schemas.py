from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

import msgspec

from chat_billing.inputs import IdempotencyKey, PositiveNanos, Reason
from chat_common import contracts
from chat_common.money import nanos_to_dollars


class AmountRequest(msgspec.Struct, forbid_unknown_fields=True):
    """A credit or debit: ``amount`` in dollars or ``amount_nanos`` in nano-dollars."""

    idempotency_key: IdempotencyKey
    amount: Decimal | None = None
    amount_nanos: PositiveNanos | None = None
    reason: Reason | None = None


class LedgerEntryReply(msgspec.Struct):
    entry_id: int
    user_id: uuid.UUID
    kind: str
    amount_nanos: int
    amount: float
    balance_after_nanos: int
    balance_after: float
    model_id: int | None
    turn_id: str | None
    reservation_id: uuid.UUID | None
    idempotency_key: str | None
    reason: str | None
    charged_nanos: int | None
    shortfall_nanos: int
    details: Any
    created_at: datetime

    @classmethod
    def of_row(cls, entry: Any) -> "LedgerEntryReply":
        """From a ledger row whose ``details`` is selected as text."""
        details = entry["details"]
        return cls(
            entry_id=entry["id"],
            user_id=entry["user_id"],
            kind=entry["kind"],
            amount_nanos=entry["amount_nanos"],
            amount=nanos_to_dollars(entry["amount_nanos"]),
            balance_after_nanos=entry["balance_after_nanos"],
            balance_after=nanos_to_dollars(entry["balance_after_nanos"]),
            model_id=entry["model_id"],
            turn_id=entry["turn_id"],
            reservation_id=entry["reservation_id"],
            idempotency_key=entry["idempotency_key"],
            reason=entry["reason"],
            charged_nanos=entry["charged_nanos"],
            shortfall_nanos=entry["shortfall_nanos"],
            details=None if details is None else msgspec.json.decode(details),
            created_at=entry["created_at"],
        )


class LedgerPage(msgspec.Struct):
    items: list[LedgerEntryReply]
    total: int
    limit: int
    offset: int


class BalanceReply(contracts.Balance, kw_only=True):
    # Held by open reservations; already taken out of balance_nanos.
    reserved_nanos: int
