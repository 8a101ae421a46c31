from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.di import Provide
from sqlalchemy.ext.asyncio import async_sessionmaker

from chat_common.app import ServicePlugin
from chat_common.db import make_engine, ping
from chat_sessions.sessions.controllers import SessionsController
from chat_sessions.sessions.services import SessionsService
from chat_sessions.settings import SessionsSettings


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
        debug=False,
    )
    app.state.settings = settings
    app.state.engine = engine
    return app
