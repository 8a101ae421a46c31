"""The billing database on asyncpg directly: one pool for the app's life, created in its
lifespan and handed to the services (through DI, in the services they are built with).

Every statement is a module constant, so asyncpg's per-connection statement cache prepares each
once per connection and then runs it in one round trip. The pool's release does no reset query
(no ``RESET ALL`` round trip per request): billing never changes session state, and a
connection released inside a transaction is still rolled back by asyncpg before it is reused.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from litestar import Request, Response

from chat_common.db import check_schema_name, plain_dsn
from chat_common.errors import (
    BadRequestError,
    ConflictError,
    ServiceUnavailableError,
    unhandled_exception_handler,
)

# serialization_failure, deadlock_detected, lock_not_available, query_canceled: rolled back,
# nothing applied, safe to retry
TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "55P03", "57014"})


async def _no_reset(connection: asyncpg.Connection) -> None:
    """asyncpg has already rolled back a transaction left open; nothing else needs resetting."""


class Pg:
    """Holds the pool once the app has started; services keep a reference to this holder."""

    def __init__(
        self, url: str, schema: str, *, min_size: int = 2, max_size: int = 20,
        init: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
    ) -> None:
        self.dsn = plain_dsn(url)
        # Run on every new connection (tests attach a query logger with it).
        self.init = init
        self.schema = check_schema_name(schema)
        self.min_size = min(min_size, max_size)
        self.max_size = max_size
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        self._pool = await asyncpg.create_pool(
            self.dsn,
            min_size=self.min_size,
            max_size=self.max_size,
            reset=_no_reset,
            init=self.init,
            server_settings={"search_path": self.schema, "application_name": f"chat-{self.schema}"},
        )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise ServiceUnavailableError("the database pool is not open")
        return self._pool

    async def ping(self) -> None:
        async with self.pool.acquire() as connection:
            await connection.fetchval("SELECT 1")


def postgres_error_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """asyncpg's own errors, as the SQLAlchemy ones are answered by chat_common.errors: a
    retryable database state is 503, a constraint 409, a bad value 400, anything else 500."""
    sqlstate = getattr(exc, "sqlstate", None)
    known: BadRequestError | ConflictError | ServiceUnavailableError | None = None
    if sqlstate in TRANSIENT_SQLSTATES:
        known = ServiceUnavailableError("database busy; retry the request")
    elif isinstance(exc, asyncpg.IntegrityConstraintViolationError):
        known = ConflictError("the request conflicts with stored data")
    elif isinstance(exc, asyncpg.DataError):
        known = BadRequestError("a value in the request is out of range or malformed")
    if known is None:
        return unhandled_exception_handler(request, exc)
    return Response(content=known.to_body(), status_code=known.status_code)

