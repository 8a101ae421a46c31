from __future__ import annotations

from litestar import Controller, get, put
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody

from chat_billing.catalog.schemas import ModelReply, ModelsReply, PutModelRequest
from chat_billing.catalog.services import CatalogService
from chat_billing.inputs import parse_model_id

Catalog = NamedDependency[CatalogService]


class CatalogController(Controller):
    path = "/v1/models"
    tags = ["catalogue"]

    @get("/")
    async def list_models(self, catalog: Catalog) -> ModelsReply:
        return await catalog.list_models()

    @put("/{model_id:str}")
    async def put_model(self, model_id: FromPath[str], data: JSONBody[PutModelRequest], catalog: Catalog) -> ModelReply:
        """Create or replace a catalogue entry; prices in dollars per 1K tokens."""
        return await catalog.put_model(parse_model_id(model_id), data)
