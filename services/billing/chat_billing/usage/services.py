"""Usage and receipts (docs/limits-and-usage.md and docs/user-data.md (the operator's commands)): read from the receipts of migration 0004, one
statement per call. Dollars spent are the receipts' ``charged_nanos``, which are the ledger's
charges (settle and summary debit rows) one for one, so totals equal the ledger exactly."""
from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import msgspec

from chat_billing.accounts.services import UserNotFound
from chat_billing.pg import Pg
from chat_common.errors import BadRequestError
from chat_common.money import nanos_to_dollars

_FILTER = (
    " FROM users u LEFT JOIN receipts r ON r.user_id = u.id"
    " AND ($2::text IS NULL OR r.session_id = $2)"
    " AND ($3::timestamptz IS NULL OR r.created_at >= $3)"
    " AND ($4::timestamptz IS NULL OR r.created_at < $4)"
    " WHERE u.id = $1"
)
_SUMS = (
    "count(r.key) FILTER (WHERE r.kind = 'turn') AS turns,"
    " count(r.key) FILTER (WHERE r.kind = 'summary') AS summaries,"
    " coalesce(sum(r.input_tokens), 0)::bigint AS input_tokens,"
    " coalesce(sum(r.output_tokens), 0)::bigint AS output_tokens,"
    " coalesce(sum(r.charged_nanos), 0)::bigint AS spent_nanos,"
    " coalesce(sum(r.charged_nanos) FILTER (WHERE r.kind = 'turn'), 0)::bigint AS reply_nanos,"
    " coalesce(sum(r.charged_nanos) FILTER (WHERE r.kind = 'summary'), 0)::bigint AS summary_nanos,"
    " coalesce(sum(r.cost_nanos), 0)::bigint AS cost_nanos"
)
GROUPS = {
    "day": "to_char(r.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    "session": "r.session_id",
    "model": "r.model_name",
}
USAGE = {
    by: f"SELECT {expr} AS grp, {_SUMS}{_FILTER} GROUP BY 1 ORDER BY 1 NULLS LAST" for by, expr in GROUPS.items()
}
USAGE_TOTAL = f"SELECT NULL::text AS grp, {_SUMS}{_FILTER} HAVING count(u.id) > 0"
RECEIPTS = (
    "SELECT r.key, r.kind, r.turn_id, r.session_id, r.model_name, r.input_tokens, r.output_tokens, r.first_seq,"
    " r.last_seq, r.summarized_upto, r.prompt_sha256, r.cost_nanos, r.charged_nanos, r.shortfall_nanos,"
    " r.reservation_id::text AS reservation_id, r.created_at"
    f"{_FILTER} AND r.key IS NOT NULL ORDER BY r.created_at, r.key LIMIT $5"
)
USER_EXISTS = "SELECT true FROM users WHERE id = $1"


class UsageGroup(msgspec.Struct, kw_only=True):
    """``turns``: charged replies; ``summaries``: summary folds charged; tokens as the AI
    service reported them; ``spent``: what was taken (reply and summary), ``cost``: what the
    calls cost (above ``spent`` only when the balance ran out)."""

    key: str | None = None
    turns: int
    summaries: int
    input_tokens: int
    output_tokens: int
    spent_nanos: int
    spent: float
    reply_nanos: int
    summary_nanos: int
    cost_nanos: int


class UsageReply(msgspec.Struct, kw_only=True):
    user_id: str
    by: str | None
    session_id: str | None
    since: datetime | None
    until: datetime | None
    groups: list[UsageGroup]
    total: UsageGroup


class Receipt(msgspec.Struct, kw_only=True):
    key: str
    kind: str
    turn_id: str
    session_id: str | None
    model_name: str | None
    input_tokens: int | None
    output_tokens: int | None
    first_seq: int | None
    last_seq: int | None
    summarized_upto: int | None
    prompt_sha256: str | None
    cost_nanos: int
    charged_nanos: int
    shortfall_nanos: int
    reservation_id: str | None
    created_at: datetime


class ReceiptPage(msgspec.Struct, kw_only=True):
    items: list[Receipt]


def _group(row: Any, key: bool) -> UsageGroup:
    return UsageGroup(
        key=row["grp"] if key else None, turns=row["turns"], summaries=row["summaries"],
        input_tokens=row["input_tokens"], output_tokens=row["output_tokens"], spent_nanos=row["spent_nanos"],
        spent=nanos_to_dollars(row["spent_nanos"]), reply_nanos=row["reply_nanos"],
        summary_nanos=row["summary_nanos"], cost_nanos=row["cost_nanos"],
    )


def _window(since: datetime | None, until: datetime | None) -> None:
    if since is not None and until is not None and until < since:
        raise BadRequestError("until is before since")


class UsageService:
    def __init__(self, pg: Pg) -> None:
        self.pg = pg

    async def usage(
        self, user_id: uuid.UUID, session_id: str | None, since: datetime | None, until: datetime | None,
        by: str | None,
    ) -> UsageReply:
        _window(since, until)
        if by is not None and by not in USAGE:
            raise BadRequestError("by must be day, session or model", details={"field": "by"})
        rows = await self.pg.pool.fetch(USAGE[by] if by else USAGE_TOTAL, user_id, session_id, since, until)
        if not rows:
            raise UserNotFound()
        if by:
            groups = [_group(row, True) for row in rows if row["turns"] or row["summaries"]]
            total = UsageGroup(
                turns=sum(g.turns for g in groups), summaries=sum(g.summaries for g in groups),
                input_tokens=sum(g.input_tokens for g in groups), output_tokens=sum(g.output_tokens for g in groups),
                spent_nanos=sum(g.spent_nanos for g in groups), spent=0.0,
                reply_nanos=sum(g.reply_nanos for g in groups), summary_nanos=sum(g.summary_nanos for g in groups),
                cost_nanos=sum(g.cost_nanos for g in groups),
            )
            total.spent = nanos_to_dollars(total.spent_nanos)
        else:
            groups, total = [], _group(rows[0], False)
        return UsageReply(
            user_id=str(user_id), by=by, session_id=session_id, since=since, until=until, groups=groups, total=total
        )

    async def receipts(
        self, user_id: uuid.UUID, session_id: str | None, since: datetime | None, until: datetime | None, limit: int
    ) -> ReceiptPage:
        _window(since, until)
        rows = await self.pg.pool.fetch(RECEIPTS, user_id, session_id, since, until, limit)
        if not rows and await self.pg.pool.fetchval(USER_EXISTS, user_id) is None:
            raise UserNotFound()
        return ReceiptPage(items=[Receipt(**dict(row)) for row in rows])
