from __future__ import annotations

from typing import Annotated

from litestar import Controller, delete, get, put
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter

from chat_billing.limits.schemas import LimitsReply, LimitsRequest
from chat_billing.limits.services import LimitService
from chat_common.errors import parse_uuid

Limits = NamedDependency[LimitService]


class LimitController(Controller):
    path = "/v1/users/{user_id:str}/limits"
    tags = ["limits"]

    @put("/")
    async def set_limits(self, user_id: FromPath[str], data: JSONBody[LimitsRequest], limits: Limits) -> LimitsReply:
        """Set spending limits in dollars: ``daily`` and ``monthly`` (UTC calendar periods) and
        ``per_session``. A field left out keeps its limit; ``null`` removes it."""
        return await limits.set(parse_uuid(user_id, "user_id"), data)

    @delete("/", status_code=200)
    async def clear_limits(self, user_id: FromPath[str], limits: Limits) -> LimitsReply:
        """Remove every limit of the user."""
        return await limits.clear(parse_uuid(user_id, "user_id"))

    @get("/")
    async def show_limits(
        self,
        user_id: FromPath[str],
        limits: Limits,
        session_id: Annotated[str | None, QueryParameter(max_length=100)] = None,
    ) -> LimitsReply:
        """Each limit with what is spent and held against it in the current UTC day and month
        (and, with ``session_id``, in that session)."""
        return await limits.show(parse_uuid(user_id, "user_id"), session_id)
