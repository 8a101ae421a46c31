from __future__ import annotations

from advanced_alchemy.repository import SQLAlchemyAsyncRepository
from sqlalchemy import func
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import IntegrityError

from chat_billing.catalog.models import CatalogModel
from chat_billing.catalog.schemas import ModelReply, ModelsReply, PutModelRequest
from chat_billing.db import Database
from chat_billing.inputs import MAX_PRICE_NANOS_PER_1K, money_in_nanos
from chat_common.errors import ConflictError


class CatalogRepository(SQLAlchemyAsyncRepository[CatalogModel]):
    model_type = CatalogModel


class CatalogService:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def list_models(self) -> ModelsReply:
        async with self.db.sessions() as session:
            models = await CatalogRepository(session=session).get_many(order_by=(CatalogModel.id, False))
        return ModelsReply(models=[ModelReply.of(model) for model in models])

    async def put_model(self, model_id: int, request: PutModelRequest) -> ModelReply:
        prices = {
            "input_price_nanos_per_1k": money_in_nanos(
                request.input_price_per_1k, request.input_price_nanos_per_1k,
                "input_price_per_1k", "input_price_nanos_per_1k",
                required=True, positive=False, maximum=MAX_PRICE_NANOS_PER_1K,
            ),
            "output_price_nanos_per_1k": money_in_nanos(
                request.output_price_per_1k, request.output_price_nanos_per_1k,
                "output_price_per_1k", "output_price_nanos_per_1k",
                required=True, positive=False, maximum=MAX_PRICE_NANOS_PER_1K,
            ),
        }
        values = {
            "name": request.name,
            "provider": request.provider,
            "context_length": request.context_length,
            "active": request.active,
            **prices,
        }
        # One statement, so two concurrent PUTs of a new id cannot both try to insert it.
        statement = (
            insert(CatalogModel)
            .values(id=model_id, **values)
            .on_conflict_do_update(index_elements=[CatalogModel.id], set_={**values, "updated_at": func.now()})
            .returning(CatalogModel)
        )
        async with self.db.sessions.begin() as session:
            try:
                model = (await session.execute(statement)).scalar_one()
            except IntegrityError:
                raise ConflictError(
                    f"model name {request.name!r} is already used by another model",
                    details={"name": request.name},
                ) from None
            return ModelReply.of(model)

