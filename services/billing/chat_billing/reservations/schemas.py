"""Reservation request and reply bodies. Requests carry the field names of
``chat_common.contracts`` (ReserveRequest, SettleRequest, ReleaseRequest, LeaseRequest) with
billing's validation bounds; replies are the contract's ``Reservation`` plus billing's details."""
from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

import msgspec

from chat_billing.catalog.schemas import ModelReply
from chat_billing.inputs import (
    IdempotencyKey,
    ModelId,
    ModelName,
    NonNegativeNanos,
    SessionId,
    Tokens,
    TtlSeconds,
    TurnId,
)
from chat_common import contracts
from chat_common.money import nanos_to_dollars


class ReserveRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Hold the estimated cost of a turn. ``model_id`` or ``model_name`` (or both, naming the
    same model). With ``turn_id`` the reserve is idempotent on it: the same turn reserved again
    gets its first hold back (``idempotency_key`` is then only recorded on the ledger row)."""

    user_id: uuid.UUID
    input_tokens: Tokens
    output_tokens: Tokens
    idempotency_key: IdempotencyKey
    model_id: ModelId | None = None
    model_name: ModelName | None = None
    ttl_seconds: TtlSeconds | None = None
    turn_id: TurnId | None = None
    session_id: SessionId | None = None
    # balance-aware turns (migration 0006): made smaller, down to this many output tokens, when
    # the balance or a limit refuses the hold asked for and the user or model is balance-aware
    min_output_tokens: Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)] | None = None


Count = Annotated[int, msgspec.Meta(ge=0, le=2**62)]
Seq = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
Sha256 = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]


class ReceiptIn(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """``chat_common.contracts.ReceiptDetails`` with bounds: what the charged call saw."""

    input_tokens: Count | None = None
    output_tokens: Count | None = None
    first_seq: Seq | None = None
    last_seq: Seq | None = None
    summarized_upto: Seq | None = None
    prompt_sha256: Sha256 | None = None


class SettleRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``user_id`` is an addition: when given, a reservation of another user is not found."""

    cost_nanos: NonNegativeNanos
    idempotency_key: IdempotencyKey
    turn_id: TurnId | None = None
    details: dict[str, Any] | None = None
    user_id: uuid.UUID | None = None
    receipt: ReceiptIn | None = None


class ReleaseRequest(msgspec.Struct, forbid_unknown_fields=True):
    idempotency_key: IdempotencyKey
    user_id: uuid.UUID | None = None


class LeaseRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Push an open hold's expiry to now + ``ttl_seconds`` (a live turn's heartbeat)."""

    user_id: uuid.UUID
    ttl_seconds: TtlSeconds


class ReservationReply(contracts.Reservation, kw_only=True):
    # ``balance_nanos``: the user's balance after the call that last changed the reservation
    # (for a repeated call: after the first one).
    model: ModelReply
    balance: float
    expires_at: datetime
    created_at: datetime
    input_tokens: int
    output_tokens: int
    # Taken from the balance for the cost (contract field ``charged_nanos``) is below
    # cost_nanos only when the balance ran out; this is the part of the hold given back.
    released_nanos: int
    release_reason: str | None
    released_at: datetime | None
    settled_at: datetime | None

    @classmethod
    def of_row(cls, row: Any) -> "ReservationReply":
        """From a ``reservation_view`` row (migration 0002)."""
        status = row["status"]
        amount = row["amount_nanos"]
        charged = row["charged_nanos"]
        balance = row["balance_nanos"]
        return cls(
            reservation_id=str(row["id"]),
            user_id=str(row["user_id"]),
            model=ModelReply(
                model_id=row["model_id"],
                name=row["model_name"],
                provider=row["provider"],
                context_length=row["context_length"],
                input_price_nanos_per_1k=row["input_price_nanos_per_1k"],
                output_price_nanos_per_1k=row["output_price_nanos_per_1k"],
                input_price_per_1k=nanos_to_dollars(row["input_price_nanos_per_1k"]),
                output_price_per_1k=nanos_to_dollars(row["output_price_nanos_per_1k"]),
                active=row["active"],
            ),
            amount_nanos=amount,
            status=status,
            balance_nanos=balance,
            balance=nanos_to_dollars(balance),
            expires_at=row["expires_at"],
            created_at=row["created_at"],
            input_tokens=row["input_tokens"],
            output_tokens=row["output_tokens"],
            turn_id=row["turn_id"],
            cost_nanos=row["cost_nanos"],
            charged_nanos=charged,
            released_nanos=0 if status == "open" else amount - min(charged, amount),
            shortfall_nanos=row["shortfall_nanos"],
            release_reason=row["release_reason"],
            released_at=row["released_at"],
            settled_at=row["settled_at"],
        )


class ExpireReply(msgspec.Struct):
    released: int
