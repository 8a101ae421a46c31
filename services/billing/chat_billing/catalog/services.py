from __future__ import annotations

import asyncpg

from chat_billing.catalog.schemas import ModelReply, ModelsReply, PutModelRequest
from chat_billing.inputs import MAX_PRICE_NANOS_PER_1K, money_in_nanos
from chat_billing.pg import Pg
from chat_common.errors import ConflictError

MODEL_COLUMNS = (
    "m.id, m.name, m.provider, m.context_length, m.input_price_nanos_per_1k, m.output_price_nanos_per_1k, m.active"
)
LIST_MODELS = f"SELECT {MODEL_COLUMNS} FROM models m ORDER BY m.id"
# One statement, so two concurrent PUTs of a new id cannot both try to insert it.
PUT_MODEL = (
    "INSERT INTO models AS m (id, name, provider, context_length, input_price_nanos_per_1k,"
    " output_price_nanos_per_1k, active) VALUES ($1, $2, $3, $4, $5, $6, $7)"
    " ON CONFLICT (id) DO UPDATE SET name = excluded.name, provider = excluded.provider,"
    " context_length = excluded.context_length, input_price_nanos_per_1k = excluded.input_price_nanos_per_1k,"
    " output_price_nanos_per_1k = excluded.output_price_nanos_per_1k, active = excluded.active,"
    " updated_at = now()"
    f" RETURNING {MODEL_COLUMNS}"
)


class CatalogService:
    def __init__(self, pg: Pg) -> None:
        self.pg = pg

    async def list_models(self) -> ModelsReply:
        rows = await self.pg.pool.fetch(LIST_MODELS)
        return ModelsReply(models=[ModelReply.of_row(row) for row in rows])

    async def put_model(self, model_id: int, request: PutModelRequest) -> ModelReply:
        input_price = money_in_nanos(
            request.input_price_per_1k, request.input_price_nanos_per_1k,
            "input_price_per_1k", "input_price_nanos_per_1k",
            required=True, positive=False, maximum=MAX_PRICE_NANOS_PER_1K,
        )
        output_price = money_in_nanos(
            request.output_price_per_1k, request.output_price_nanos_per_1k,
            "output_price_per_1k", "output_price_nanos_per_1k",
            required=True, positive=False, maximum=MAX_PRICE_NANOS_PER_1K,
        )
        try:
            row = await self.pg.pool.fetchrow(
                PUT_MODEL, model_id, request.name, request.provider, request.context_length,
                input_price, output_price, request.active,
            )
        except asyncpg.UniqueViolationError:
            raise ConflictError(
                f"model name {request.name!r} is already used by another model", details={"name": request.name}
            ) from None
        return ModelReply.of_row(row)
