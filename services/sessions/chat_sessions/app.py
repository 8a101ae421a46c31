from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from litestar import Litestar, Request, Response
from litestar.di import Provide

from chat_common.app import ServicePlugin
from chat_common.db import plain_dsn
from chat_common.errors import AppError, BadRequestError, ConflictError, ServiceUnavailableError
from chat_sessions.sessions.controllers import (
    OutboxController,
    RetentionController,
    SearchController,
    SessionsController,
)
from chat_sessions.sessions.services import SessionsService
from chat_sessions.settings import SessionsSettings

logger = logging.getLogger(__name__)

# serialization_failure, deadlock_detected, lock_not_available, query_canceled: rolled back,
# nothing applied, safe to retry.
_TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "55P03", "57014"})


def classify_database_error(exc: Exception) -> AppError | None:
    """What an asyncpg error stands for (chat_common.errors classifies SQLAlchemy's wrappers;
    this service talks to asyncpg directly): an outage or restart is a 503 the caller may
    retry, a constraint a 409, a bad value a 400; None for a bug."""
    if isinstance(exc, asyncpg.InterfaceError):  # connection closed or lost mid-call
        return ServiceUnavailableError("a dependency is unavailable; retry the request")
    sqlstate = getattr(exc, "sqlstate", None) or ""
    if sqlstate in _TRANSIENT_SQLSTATES:
        return ServiceUnavailableError("database busy; retry the request")
    # 08 connection exception, 53 insufficient resources, 57P0x admin/crash shutdown, cannot connect now
    if sqlstate.startswith(("08", "53", "57P")):
        return ServiceUnavailableError("a dependency is unavailable; retry the request")
    if sqlstate.startswith("23"):
        return ConflictError("the request conflicts with stored data")
    if sqlstate.startswith("22"):
        return BadRequestError("a value in the request is out of range or malformed")
    return None


def database_error_handler(_: Request, exc: Exception) -> Response:
    known = classify_database_error(exc)
    if known is None:
        logger.exception("unhandled database error", exc_info=exc)
        return Response(content=AppError().to_body(), status_code=500)
    logger.warning("request failed: %s (%s)", known.message, type(exc).__name__)
    return Response(content=known.to_body(), status_code=known.status_code)


def create_app(settings: SessionsSettings | None = None) -> Litestar:
    settings = settings or SessionsSettings.from_env()
    service = SessionsService(plain_dsn(settings.database_url), settings.db_schema)

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.close()

    plugin = ServicePlugin(
        name="sessions",
        service_token=settings.service.service_token,
        readiness_checks={"database": service.ping},
    )
    app = Litestar(
        route_handlers=[SessionsController, SearchController, OutboxController, RetentionController],
        dependencies={"sessions": Provide(lambda: service, sync_to_thread=False)},
        plugins=[plugin],
        lifespan=[lifespan],
        # The plugin's handlers cover the rest; these are more specific than its Exception one.
        exception_handlers={
            asyncpg.PostgresError: database_error_handler,
            asyncpg.InterfaceError: database_error_handler,
        },
        debug=False,
    )
    app.state.settings = settings
    app.state.sessions_service = service
    return app
