from __future__ import annotations

from decimal import Decimal
from typing import Any

import msgspec

from chat_billing.inputs import (
    ContextLength,
    IdempotencyKey,
    ModelName,
    PriceNanos,
    ProviderName,
)
from chat_common import contracts
from chat_common.money import nanos_to_dollars


class ModelReply(contracts.ModelInfo, kw_only=True):
    """The contract's ``ModelInfo`` plus prices in dollars and whether it may be used."""

    input_price_per_1k: float
    output_price_per_1k: float
    active: bool

    @classmethod
    def of_row(cls, row: Any) -> "ModelReply":
        return cls(
            model_id=row["id"],
            name=row["name"],
            provider=row["provider"],
            context_length=row["context_length"],
            input_price_nanos_per_1k=row["input_price_nanos_per_1k"],
            output_price_nanos_per_1k=row["output_price_nanos_per_1k"],
            input_price_per_1k=nanos_to_dollars(row["input_price_nanos_per_1k"]),
            output_price_per_1k=nanos_to_dollars(row["output_price_nanos_per_1k"]),
            active=row["active"],
        )


class ModelsReply(msgspec.Struct):
    models: list[ModelReply]


class PutModelRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Prices in dollars per 1K tokens, or (addition) directly in nano-dollars per 1K tokens."""

    name: ModelName
    provider: ProviderName
    context_length: ContextLength
    input_price_per_1k: Decimal | None = None
    output_price_per_1k: Decimal | None = None
    input_price_nanos_per_1k: PriceNanos | None = None
    output_price_nanos_per_1k: PriceNanos | None = None
    active: bool = True
    # Accepted so callers may send a key on every write; PUT is idempotent by itself.
    idempotency_key: IdempotencyKey | None = None
