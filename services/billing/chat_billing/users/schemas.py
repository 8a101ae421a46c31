from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Annotated

import msgspec

from chat_billing.inputs import (
    IdempotencyKey,
    ModelId,
    ModelIdList,
    NonNegativeNanos,
    Username,
)
from chat_common import contracts


class CreateUserRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``balance`` in dollars, or (addition) ``balance_nanos``; both optional, default zero."""

    username: Username
    models: ModelIdList = []
    balance: Decimal | None = None
    balance_nanos: NonNegativeNanos | None = None
    user_id: uuid.UUID | None = None
    idempotency_key: IdempotencyKey | None = None


class ModelIdsRequest(msgspec.Struct, forbid_unknown_fields=True):
    model_ids: Annotated[list[ModelId], msgspec.Meta(min_length=1, max_length=1000)]
    idempotency_key: IdempotencyKey | None = None


class UserReply(contracts.User, kw_only=True):
    """The contract's ``User`` plus entitlements, dollars and the creation time."""

    models: list[int]
    balance: float
    created_at: datetime
