"""The billing database on asyncpg directly: one pool for the app's life, created in its
lifespan and handed to the services (through DI, in the services they are built with).

Every statement is a module constant, so asyncpg's per-connection statement cache prepares each
once per connection and then runs it in one round trip. Releasing a connection sends nothing
(no ``RESET ALL`` round trip per request): billing never changes session state, and a
connection given back inside a transaction is closed rather than reused.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from chat_common.db import check_schema_name, plain_dsn
from chat_common.errors import ServiceUnavailableError

logger = logging.getLogger(__name__)


def _reusable_after(exc: Exception, connection: asyncpg.Connection) -> bool:
    """Whether a connection is fit for the next request after ``exc`` ended its block: yes
    after a failed statement or a refusal of the caller's own, no when the connection itself
    failed (closed, SQLSTATE class 08 connection exception, 57P0x shutdown or termination)."""
    if connection.is_closed():
        return False
    if isinstance(exc, asyncpg.PostgresError):
        state = str(getattr(exc, "sqlstate", "") or "")
        return not (state.startswith("08") or state.startswith("57P"))
    return True


class ConnectionPool:
    """A small pool of plain asyncpg connections. asyncpg's own pool costs about 100 us of CPU
    per acquire and release here (a shielded task, a proxy object, an inactivity timer and a
    reset query unless told otherwise); this one is a list and a queue of waiters.

    A connection is reused if the block that used it ended normally or with an ordinary error
    (a statement failed, the caller refused the request; a transaction opened by
    ``connection.transaction()`` has rolled back by then). A cancelled block (perhaps in the
    middle of a query), a connection-level error, or a connection still in a transaction
    closes it, and a new one is opened when needed.
    """

    def __init__(
        self, dsn: str, *, max_size: int, server_settings: dict[str, str],
        init: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
    ) -> None:
        self.dsn = dsn
        self.max_size = max_size
        self.server_settings = server_settings
        self.init = init
        self._idle: list[asyncpg.Connection] = []
        self._waiters: deque[asyncio.Future[asyncpg.Connection | None]] = deque()
        self._size = 0
        self._closed = False

    async def _connect(self) -> asyncpg.Connection:
        connection = await asyncpg.connect(self.dsn, server_settings=self.server_settings)
        try:
            if self.init is not None:
                await self.init(connection)
        except BaseException:
            connection.terminate()
            raise
        return connection

    async def _take(self) -> asyncpg.Connection:
        while True:
            if self._closed:
                raise ServiceUnavailableError("the database pool is closed")
            while self._idle:
                connection = self._idle.pop()
                if not connection.is_closed():
                    return connection
                self._size -= 1
            if self._size < self.max_size:
                self._size += 1
                try:
                    return await self._connect()
                except BaseException:
                    self._size -= 1
                    self._wake()
                    raise
            waiter: asyncio.Future[asyncpg.Connection | None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                connection = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled() and waiter.result() is not None:
                    self._give_back(waiter.result())  # handed over just as this request was cancelled
                raise
            if connection is not None:
                return connection
            # None: a slot came free (a connection was dropped); loop and open one.

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _give_back(self, connection: asyncpg.Connection) -> None:
        if self._closed or connection.is_closed() or connection.is_in_transaction():
            connection.terminate()
            self._size -= 1
            self._wake()
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return
        self._idle.append(connection)

    def _drop(self, connection: asyncpg.Connection) -> None:
        connection.terminate()
        self._size -= 1
        self._wake()

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[asyncpg.Connection]:
        connection = await self._take()
        try:
            yield connection
        except (asyncpg.InterfaceError, asyncpg.InternalClientError, OSError, asyncio.TimeoutError):
            self._drop(connection)  # the connection itself may be in any state
            raise
        except Exception as exc:
            if _reusable_after(exc, connection):
                self._give_back(connection)  # a statement failed or the caller refused
            else:
                self._drop(connection)
            raise
        except BaseException:
            self._drop(connection)  # cancelled, perhaps in the middle of a query
            raise
        self._give_back(connection)

    async def fetchrow(self, query: str, *args: Any) -> Any:
        async with self.acquire() as connection:
            return await connection.fetchrow(query, *args)

    async def fetchval(self, query: str, *args: Any) -> Any:
        async with self.acquire() as connection:
            return await connection.fetchval(query, *args)

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        async with self.acquire() as connection:
            return await connection.fetch(query, *args)

    async def execute(self, query: str, *args: Any) -> str:
        async with self.acquire() as connection:
            return await connection.execute(query, *args)

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            self._size -= 1
            try:
                await asyncio.wait_for(connection.close(), 5)
            except (Exception, asyncio.TimeoutError):
                connection.terminate()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)


class Pg:
    """Holds the pool once the app has started; services keep a reference to this holder."""

    def __init__(
        self, url: str, schema: str, *, min_size: int = 2, max_size: int = 20,
        init: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
    ) -> None:
        self.dsn = plain_dsn(url)
        self.schema = check_schema_name(schema)
        self.min_size = min(min_size, max_size)
        self.max_size = max_size
        # Run on every new connection (tests attach a query logger with it).
        self.init = init
        self._pool: ConnectionPool | None = None

    async def open(self) -> None:
        pool = ConnectionPool(
            self.dsn, max_size=self.max_size, init=self.init,
            server_settings={"search_path": self.schema, "application_name": f"chat-{self.schema}"},
        )
        self._pool = pool
        # Open min_size connections now, so the first requests do not wait for them. A database
        # that is not up yet is no reason to fail the start: /ready reports it meanwhile.
        held = []
        try:
            for _ in range(self.min_size):
                held.append(await pool._take())
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            logger.warning("database not reachable at start", extra={"error": f"{type(exc).__name__}: {exc}"[:300]})
        for connection in held:
            pool._give_back(connection)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @property
    def pool(self) -> ConnectionPool:
        if self._pool is None:
            raise ServiceUnavailableError("the database pool is not open")
        return self._pool

    async def ping(self) -> None:
        await self.pool.fetchval("SELECT 1")
