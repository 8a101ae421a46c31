"""The billing database: its own declarative base (so billing tables never share metadata with
another service imported in the same process) and the engine plus session factory."""
from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase

from chat_common.db import make_engine


class BillingBase(DeclarativeBase):
    metadata = MetaData()


@dataclass(frozen=True)
class Database:
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]

    @classmethod
    def connect(cls, url: str, schema: str, *, pool_size: int, max_overflow: int) -> "Database":
        engine = make_engine(url, schema, pool_size=pool_size, max_overflow=max_overflow)
        return cls(engine=engine, sessions=async_sessionmaker(engine, expire_on_commit=False))

    async def close(self) -> None:
        await self.engine.dispose()
