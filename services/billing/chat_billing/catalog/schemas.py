from __future__ import annotations

from decimal import Decimal

import msgspec

from chat_billing.catalog.models import CatalogModel
from chat_billing.inputs import ContextLength, IdempotencyKey, ModelName, PriceNanos, ProviderName
from chat_common import contracts
from chat_common.money import nanos_to_dollars


class ModelReply(contracts.ModelInfo, kw_only=True):
    """The contract's ``ModelInfo`` plus prices in dollars and whether it may be used."""

    input_price_per_1k: float
    output_price_per_1k: float
    active: bool

    @classmethod
    def of(cls, model: CatalogModel) -> "ModelReply":
        return cls(
            model_id=model.id,
            name=model.name,
            provider=model.provider,
            context_length=model.context_length,
            input_price_nanos_per_1k=model.input_price_nanos_per_1k,
            output_price_nanos_per_1k=model.output_price_nanos_per_1k,
            input_price_per_1k=nanos_to_dollars(model.input_price_nanos_per_1k),
            output_price_per_1k=nanos_to_dollars(model.output_price_nanos_per_1k),
            active=model.active,
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
