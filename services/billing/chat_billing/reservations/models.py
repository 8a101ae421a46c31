from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import BigInteger, DateTime, ForeignKey, Integer, Text, Uuid, func
from sqlalchemy.orm import Mapped, mapped_column

from chat_billing.db import BillingBase


class Reservation(BillingBase):
    """Money held for a turn in progress: open until settled with the real cost, released by
    the caller, or released by the expiry sweep."""

    __tablename__ = "reservations"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("users.id"))
    model_id: Mapped[int] = mapped_column(Integer, ForeignKey("models.id"))
    amount_nanos: Mapped[int] = mapped_column(BigInteger)
    input_tokens: Mapped[int] = mapped_column(Integer)
    output_tokens: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(Text, default="open")
    turn_id: Mapped[str | None] = mapped_column(Text)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    released_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    release_reason: Mapped[str | None] = mapped_column(Text)
    settled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cost_nanos: Mapped[int | None] = mapped_column(BigInteger)
    charged_nanos: Mapped[int] = mapped_column(BigInteger, default=0)
    shortfall_nanos: Mapped[int] = mapped_column(BigInteger, default=0)
