from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.di import Provide

from chat_common.app import ServicePlugin
from chat_common.db import plain_dsn
from chat_sessions.sessions.admin import SessionsAdmin, SessionsAdminController
from chat_sessions.sessions.controllers import (
    OutboxController,
    RetentionController,
    SearchController,
    SessionsController,
)
from chat_sessions.sessions.services import SessionsService
from chat_sessions.settings import SessionsSettings


def create_app(settings: SessionsSettings | None = None) -> Litestar:
    settings = settings or SessionsSettings.from_env()
    service = SessionsService(plain_dsn(settings.database_url), settings.db_schema)
    admin = SessionsAdmin(service)

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
        route_handlers=[SessionsController, SearchController, OutboxController, RetentionController, SessionsAdminController],
        dependencies={
            "sessions": Provide(lambda: service, sync_to_thread=False),
            "admin": Provide(lambda: admin, sync_to_thread=False),
        },
        plugins=[plugin],
        lifespan=[lifespan],
        debug=False,
    )
    app.state.settings = settings
    app.state.sessions_service = service
    return app
