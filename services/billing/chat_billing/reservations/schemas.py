from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import msgspec
from sqlalchemy import Row

from chat_billing.catalog.models import CatalogModel
from chat_billing.catalog.schemas import ModelReply
from chat_billing.inputs import IdempotencyKey, ModelId, ModelName, NonNegativeNanos, Tokens, TtlSeconds, TurnId
from chat_billing.reservations.models import Reservation
from chat_common.money import nanos_to_dollars


class ReserveRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Hold the estimated cost of a turn. ``model_id`` or ``model_name`` (or both, naming the
    same model). ``turn_id`` is an addition: it is copied to the ledger rows of the turn."""

    user_id: uuid.UUID
    input_tokens: Tokens
    output_tokens: Tokens
    idempotency_key: IdempotencyKey
    model_id: ModelId | None = None
    model_name: ModelName | None = None
    ttl_seconds: TtlSeconds | None = None
    turn_id: TurnId | None = None


class SettleRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``user_id`` is an addition: when given, a reservation of another user is not found."""

    cost_nanos: NonNegativeNanos
    idempotency_key: IdempotencyKey
    turn_id: TurnId | None = None
    details: dict[str, Any] | None = None
    user_id: uuid.UUID | None = None


class ReleaseRequest(msgspec.Struct, forbid_unknown_fields=True):
    idempotency_key: IdempotencyKey
    user_id: uuid.UUID | None = None


class ReservationReply(msgspec.Struct):
    reservation_id: uuid.UUID
    user_id: uuid.UUID
    model: ModelReply
    amount_nanos: int
    status: str
    # The user's balance after this call (for a replay: after the first call).
    balance_nanos: int
    balance: float
    expires_at: datetime
    created_at: datetime
    input_tokens: int
    output_tokens: int
    turn_id: str | None
    cost_nanos: int | None
    # Taken from the balance for the cost; below cost_nanos only when the balance ran out.
    charged_nanos: int
    # The part of the hold the charge did not use, given back to the balance.
    released_nanos: int
    shortfall_nanos: int
    release_reason: str | None
    released_at: datetime | None
    settled_at: datetime | None

    @classmethod
    def of(cls, reservation: Reservation | Row[Any], model: CatalogModel, balance_nanos: int) -> "ReservationReply":
        released = 0
        if reservation.status != "open":
            released = reservation.amount_nanos - min(reservation.charged_nanos, reservation.amount_nanos)
        return cls(
            reservation_id=reservation.id,
            user_id=reservation.user_id,
            model=ModelReply.of(model),
            amount_nanos=reservation.amount_nanos,
            status=reservation.status,
            balance_nanos=balance_nanos,
            balance=nanos_to_dollars(balance_nanos),
            expires_at=reservation.expires_at.astimezone(UTC),
            created_at=reservation.created_at.astimezone(UTC),
            input_tokens=reservation.input_tokens,
            output_tokens=reservation.output_tokens,
            turn_id=reservation.turn_id,
            cost_nanos=reservation.cost_nanos,
            charged_nanos=reservation.charged_nanos,
            released_nanos=released,
            shortfall_nanos=reservation.shortfall_nanos,
            release_reason=reservation.release_reason,
            released_at=_utc(reservation.released_at),
            settled_at=_utc(reservation.settled_at),
        )


class ExpireReply(msgspec.Struct):
    released: int


def _utc(moment: datetime | None) -> datetime | None:
    return None if moment is None else moment.astimezone(UTC)
