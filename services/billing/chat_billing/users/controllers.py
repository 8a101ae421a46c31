from __future__ import annotations

from litestar import Controller, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody

from chat_billing.catalog.schemas import ModelsReply
from chat_billing.users.schemas import CreateUserRequest, ModelIdsRequest, UserReply
from chat_billing.users.services import UserService
from chat_common.errors import parse_uuid

Users = NamedDependency[UserService]


class UserController(Controller):
    path = "/v1/users"
    tags = ["users"]

    @post("/")
    async def create_user(self, data: JSONBody[CreateUserRequest], user_service: Users) -> UserReply:
        """Create a user (idempotent by ``idempotency_key``, and by ``user_id`` when given)."""
        return await user_service.create(data)

    @get("/{user_id:str}")
    async def get_user(self, user_id: FromPath[str], user_service: Users) -> UserReply:
        return await user_service.get(parse_uuid(user_id, "user_id"))

    @get("/{user_id:str}/models")
    async def entitled_models(self, user_id: FromPath[str], user_service: Users) -> ModelsReply:
        """Entitled, active models sorted by name."""
        return await user_service.models(parse_uuid(user_id, "user_id"))

    @post("/{user_id:str}/models/grant", status_code=200)
    async def grant_models(
        self, user_id: FromPath[str], data: JSONBody[ModelIdsRequest], user_service: Users
    ) -> UserReply:
        return await user_service.grant(parse_uuid(user_id, "user_id"), data)

    @post("/{user_id:str}/models/revoke", status_code=200)
    async def revoke_models(
        self, user_id: FromPath[str], data: JSONBody[ModelIdsRequest], user_service: Users
    ) -> UserReply:
        return await user_service.revoke(parse_uuid(user_id, "user_id"), data)
