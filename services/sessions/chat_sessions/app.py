from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from litestar import Litestar, Request, Response
from litestar.di import Provide
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import async_sessionmaker

from chat_common.app import ServicePlugin
from chat_common.db import make_engine, ping
from chat_common.errors import (
    BadRequestError,
    ServiceUnavailableError,
    app_error_handler,
    unhandled_exception_handler,
)
from chat_sessions.sessions.controllers import SessionsController
from chat_sessions.sessions.services import SessionsService
from chat_sessions.settings import SessionsSettings

logger = logging.getLogger(__name__)

_UNAVAILABLE = (
    OperationalError,
    InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    ConnectionError,
    asyncio.TimeoutError,
)


def _database_unavailable(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, _UNAVAILABLE):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def unexpected_error_handler(request: Request, exc: Exception) -> Response:
    # A database that is down or restarting is a 503 (the internal client retries those),
    # not a 500 with a traceback.
    if _database_unavailable(exc):
        logger.warning("database unavailable: %s", type(exc).__name__)
        return app_error_handler(request, ServiceUnavailableError("database unavailable"))
    # msgspec raises UnicodeDecodeError (not a DecodeError) for a body that is not UTF-8.
    if isinstance(exc, UnicodeDecodeError):
        return app_error_handler(request, BadRequestError("request body is not valid UTF-8"))
    return unhandled_exception_handler(request, exc)


def create_app(settings: SessionsSettings | None = None) -> Litestar:
    settings = settings or SessionsSettings.from_env()
    engine = make_engine(settings.database_url, settings.db_schema)
    # expire_on_commit off: an attribute read after commit would otherwise need a lazy load,
    # which an asyncio session cannot do (it raises instead).
    sessionmaker = async_sessionmaker(engine, expire_on_commit=False)
    service = SessionsService(sessionmaker)

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await engine.dispose()

    plugin = ServicePlugin(
        name="sessions",
        service_token=settings.service.service_token,
        readiness_checks={"database": lambda: ping(engine)},
    )
    app = Litestar(
        route_handlers=[SessionsController],
        dependencies={"sessions": Provide(lambda: service, sync_to_thread=False)},
        plugins=[plugin],
        lifespan=[lifespan],
        exception_handlers={Exception: unexpected_error_handler},
        debug=False,
    )
    app.state.settings = settings
    app.state.engine = engine
    return app
