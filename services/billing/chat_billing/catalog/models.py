from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, DateTime, Integer, Text, func
from sqlalchemy.orm import Mapped, mapped_column

from chat_billing.db import BillingBase


class CatalogModel(BillingBase):
    """An AI model users can be entitled to, with its price in nano-dollars per 1K tokens."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(Text, unique=True)
    provider: Mapped[str] = mapped_column(Text)
    context_length: Mapped[int] = mapped_column(Integer)
    input_price_nanos_per_1k: Mapped[int] = mapped_column(BigInteger)
    output_price_nanos_per_1k: Mapped[int] = mapped_column(BigInteger)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
