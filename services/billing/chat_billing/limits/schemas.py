"""Spending limits: ``PUT /v1/users/{id}/limits`` takes dollars (a field absent keeps that limit,
``null`` removes it); the reply shows each limit with what is spent and held against it now."""
from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal

import msgspec


class LimitsRequest(msgspec.Struct, forbid_unknown_fields=True):
    daily: Decimal | None | msgspec.UnsetType = msgspec.UNSET
    monthly: Decimal | None | msgspec.UnsetType = msgspec.UNSET
    per_session: Decimal | None | msgspec.UnsetType = msgspec.UNSET


class LimitView(msgspec.Struct, kw_only=True):
    """One limit (``limit`` null: none set). ``spent``: what settled charges took in the period
    (for ``per_session``: in the session asked for with ``?session_id=``); ``held``: open
    reservations that count against it; ``left``: what a reservation may still take."""

    limit: float | None
    limit_nanos: int | None
    spent: float | None
    spent_nanos: int | None
    held: float | None
    held_nanos: int | None
    left_nanos: int | None
    period_start: date | None = None
    session_id: str | None = None


class LimitsReply(msgspec.Struct, kw_only=True):
    user_id: str
    daily: LimitView
    monthly: LimitView
    per_session: LimitView
    updated_at: datetime | None
