from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from litestar import Controller, get
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, QueryParameter

from chat_billing.usage.services import ReceiptPage, UsageReply, UsageService
from chat_common.errors import parse_uuid

Usage = NamedDependency[UsageService]
SessionQuery = Annotated[str | None, QueryParameter(max_length=100)]


class UsageController(Controller):
    path = "/v1/users/{user_id:str}"
    tags = ["usage"]

    @get("/usage")
    async def usage(
        self,
        user_id: FromPath[str],
        usage: Usage,
        session_id: SessionQuery = None,
        since: FromQuery[datetime | None] = None,
        until: FromQuery[datetime | None] = None,
        by: FromQuery[Literal["day", "session", "model"] | None] = None,
    ) -> UsageReply:
        """Turns, summary folds, tokens and dollars spent from the receipts, per group (``by``:
        UTC day, session or model) and in total; ``since`` inclusive, ``until`` exclusive
        (ISO 8601). ``spent_nanos`` totals equal the ledger's charges exactly."""
        return await usage.usage(parse_uuid(user_id, "user_id"), session_id, since, until, by)

    @get("/receipts")
    async def receipts(
        self,
        user_id: FromPath[str],
        usage: Usage,
        session_id: SessionQuery = None,
        since: FromQuery[datetime | None] = None,
        until: FromQuery[datetime | None] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
    ) -> ReceiptPage:
        """A receipt per charge, oldest first: a turn's (kind ``turn``, key its turn id) and a
        summary fold's (kind ``summary``, key ``summary:{session}:{upto}``, turn_id the turn that
        folded it)."""
        return await usage.receipts(parse_uuid(user_id, "user_id"), session_id, since, until, limit)
