from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, ForeignKey, Integer, Text, Uuid, func
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from chat_billing.db import BillingBase


class LedgerEntry(BillingBase):
    """One change of a balance. Rows are only ever inserted (a trigger refuses the rest)."""

    __tablename__ = "ledger"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("users.id"))
    kind: Mapped[str] = mapped_column(Text)
    amount_nanos: Mapped[int] = mapped_column(BigInteger)
    balance_after_nanos: Mapped[int] = mapped_column(BigInteger)
    model_id: Mapped[int | None] = mapped_column(Integer)
    turn_id: Mapped[str | None] = mapped_column(Text)
    reservation_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    idempotency_key: Mapped[str | None] = mapped_column(Text)
    reason: Mapped[str | None] = mapped_column(Text)
    charged_nanos: Mapped[int | None] = mapped_column(BigInteger)
    shortfall_nanos: Mapped[int] = mapped_column(BigInteger, default=0)
    details: Mapped[Any | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
