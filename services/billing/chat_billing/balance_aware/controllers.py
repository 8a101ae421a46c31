from __future__ import annotations

from litestar import Controller, Router, get, put
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, JSONBody

from chat_billing.balance_aware.schemas import (
    ModelSetting,
    ModelView,
    UserReply,
    UserSetting,
)
from chat_billing.balance_aware.services import BalanceAwareService
from chat_billing.inputs import parse_model_id
from chat_common.errors import parse_uuid

BalanceAware = NamedDependency[BalanceAwareService]


def _service(state: State) -> BalanceAwareService:
    service = state.get("balance_aware_service")
    if service is None:
        service = state["balance_aware_service"] = BalanceAwareService(state.pg)
    return service


class UserBalanceAwareController(Controller):
    path = "/v1/users/{user_id:str}/balance-aware"
    tags = ["balance-aware"]

    @put("/")
    async def set_user(self, user_id: FromPath[str], data: JSONBody[UserSetting], balance_aware: BalanceAware) -> UserReply:
        """Balance-aware turns for this user: ``true`` on, ``false`` off (even on a balance-aware
        model), ``null`` removes the user's own setting (the model's counts)."""
        return await balance_aware.set_user(parse_uuid(user_id, "user_id"), data.enabled)

    @get("/")
    async def show_user(self, user_id: FromPath[str], balance_aware: BalanceAware) -> UserReply:
        """The user's own setting and, for each entitled model, whether its turns are balance-aware."""
        return await balance_aware.show_user(parse_uuid(user_id, "user_id"))


class ModelBalanceAwareController(Controller):
    path = "/v1/models/{model_id:str}/balance-aware"
    tags = ["balance-aware"]

    @put("/")
    async def set_model(self, model_id: FromPath[str], data: JSONBody[ModelSetting], balance_aware: BalanceAware) -> ModelView:
        """Balance-aware turns on this model for every user without a setting of their own."""
        return await balance_aware.set_model(parse_model_id(model_id), data.enabled)

    @get("/")
    async def show_model(self, model_id: FromPath[str], balance_aware: BalanceAware) -> ModelView:
        return await balance_aware.show_model(parse_model_id(model_id))


# One entry for create_app's route handlers: both controllers with their service.
balance_aware_router = Router(
    path="/",
    route_handlers=[UserBalanceAwareController, ModelBalanceAwareController],
    dependencies={"balance_aware": Provide(_service, sync_to_thread=False)},
)
