"""Set, clear and show a user's spending limits. The check itself is in the reserve
(``billing_reserve`` of migration 0003); these are the operator's statements, one each."""
from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import msgspec

from chat_billing.accounts.services import UserNotFound
from chat_billing.inputs import dollars_to_exact_nanos
from chat_billing.limits.schemas import LimitsReply, LimitsRequest, LimitView
from chat_billing.pg import Pg
from chat_common.money import nanos_to_dollars

# $5/$7/$9: whether $2/$3/$4 replace the stored value (a field absent keeps it).
SET = (
    "INSERT INTO limits AS l (user_id, daily_nanos, monthly_nanos, per_session_nanos)"
    " SELECT u.id, $2, $3, $4 FROM users u WHERE u.id = $1"
    " ON CONFLICT (user_id) DO UPDATE SET"
    " daily_nanos = CASE WHEN $5 THEN EXCLUDED.daily_nanos ELSE l.daily_nanos END,"
    " monthly_nanos = CASE WHEN $6 THEN EXCLUDED.monthly_nanos ELSE l.monthly_nanos END,"
    " per_session_nanos = CASE WHEN $7 THEN EXCLUDED.per_session_nanos ELSE l.per_session_nanos END,"
    " updated_at = now()"
    " RETURNING user_id"
)
CLEAR = (
    "WITH gone AS (DELETE FROM limits WHERE user_id = $1)"
    " SELECT true FROM users WHERE id = $1"
)
SHOW = (
    "SELECT l.daily_nanos, l.monthly_nanos, l.per_session_nanos, l.updated_at, t.today,"
    " date_trunc('month', t.today)::date AS month_start,"
    " (SELECT coalesce(sum(d.spent_nanos), 0)::bigint FROM daily_spend d"
    "   WHERE d.user_id = u.id AND d.day = t.today) AS spent_today,"
    " (SELECT coalesce(sum(d.spent_nanos), 0)::bigint FROM daily_spend d"
    "   WHERE d.user_id = u.id AND d.day >= date_trunc('month', t.today)::date AND d.day <= t.today) AS spent_month,"
    " (SELECT coalesce(sum(r.amount_nanos), 0)::bigint FROM reservations r"
    "   WHERE r.user_id = u.id AND r.status = 'open') AS held,"
    " (SELECT coalesce(sum(s.spent_nanos), 0)::bigint FROM session_spend s"
    "   WHERE s.session_id = $2 AND s.user_id = u.id) AS session_spent,"
    " (SELECT coalesce(sum(r.amount_nanos), 0)::bigint FROM reservations r"
    "   WHERE r.user_id = u.id AND r.status = 'open' AND r.session_id = $2) AS session_held"
    " FROM users u CROSS JOIN (SELECT (now() AT TIME ZONE 'UTC')::date AS today) t"
    " LEFT JOIN limits l ON l.user_id = u.id"
    " WHERE u.id = $1"
)


def _nanos(value: Decimal | None | msgspec.UnsetType, name: str) -> int | None:
    if value is None or value is msgspec.UNSET:
        return None
    return dollars_to_exact_nanos(Decimal(value), name)


def _dollars(nanos: int | None) -> float | None:
    return None if nanos is None else nanos_to_dollars(nanos)


def _view(limit: int | None, spent: int | None, held: int | None, **extra: Any) -> LimitView:
    left = None if limit is None or spent is None or held is None else max(0, limit - spent - held)
    return LimitView(
        limit=_dollars(limit), limit_nanos=limit, spent=_dollars(spent), spent_nanos=spent,
        held=_dollars(held), held_nanos=held, left_nanos=left, **extra,
    )


class LimitService:
    def __init__(self, pg: Pg) -> None:
        self.pg = pg

    async def set(self, user_id: uuid.UUID, request: LimitsRequest) -> LimitsReply:
        values = (
            _nanos(request.daily, "daily"), _nanos(request.monthly, "monthly"),
            _nanos(request.per_session, "per_session"),
        )
        given = (
            request.daily is not msgspec.UNSET, request.monthly is not msgspec.UNSET,
            request.per_session is not msgspec.UNSET,
        )
        if await self.pg.pool.fetchval(SET, user_id, *values, *given) is None:
            raise UserNotFound()
        return await self.show(user_id)

    async def clear(self, user_id: uuid.UUID) -> LimitsReply:
        if await self.pg.pool.fetchval(CLEAR, user_id) is None:
            raise UserNotFound()
        return await self.show(user_id)

    async def show(self, user_id: uuid.UUID, session_id: str | None = None) -> LimitsReply:
        row = await self.pg.pool.fetchrow(SHOW, user_id, session_id)
        if row is None:
            raise UserNotFound()
        return LimitsReply(
            user_id=str(user_id),
            daily=_view(row["daily_nanos"], row["spent_today"], row["held"], period_start=row["today"]),
            monthly=_view(row["monthly_nanos"], row["spent_month"], row["held"], period_start=row["month_start"]),
            per_session=_view(
                row["per_session_nanos"],
                row["session_spent"] if session_id else None,
                row["session_held"] if session_id else None,
                session_id=session_id,
            ),
            updated_at=row["updated_at"],
        )
