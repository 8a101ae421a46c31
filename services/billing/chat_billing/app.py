from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.di import Provide

from chat_billing.accounts.controllers import AccountController
from chat_billing.accounts.services import AccountService
from chat_billing.catalog.controllers import CatalogController
from chat_billing.catalog.services import CatalogService
from chat_billing.db import Database
from chat_billing.reservations.controllers import ReservationController
from chat_billing.reservations.services import ReservationService
from chat_billing.reservations.sweeper import sweep_expired_reservations
from chat_billing.settings import BillingSettings
from chat_billing.users.controllers import UserController
from chat_billing.users.services import UserService
from chat_billing.web import ExactJsonRequest
from chat_common.app import ServicePlugin
from chat_common.db import ping

# The largest valid body (a grant of 1000 model ids, settle details) is far below this.
MAX_BODY_BYTES = 64 * 1024


def create_app(settings: BillingSettings | None = None) -> Litestar:
    settings = settings or BillingSettings.from_env()
    # The engine opens no connection until first used, so building it here is safe outside a loop.
    db = Database.connect(
        settings.database_url, settings.db_schema,
        pool_size=settings.db_pool_size, max_overflow=settings.db_max_overflow,
    )
    users = UserService(db)
    catalog = CatalogService(db)
    accounts = AccountService(db)
    reservations = ReservationService(db, settings.reservation_ttl_seconds)

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        sweeper = asyncio.create_task(
            sweep_expired_reservations(reservations, settings.reservation_sweep_seconds), name="reservation-sweep"
        )
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            await db.close()

    plugin = ServicePlugin(
        name="billing",
        service_token=settings.service.service_token,
        readiness_checks={"database": lambda: ping(db.engine)},
    )

    def constant(value: object) -> Provide:
        return Provide(lambda: value, sync_to_thread=False, use_cache=True)

    app = Litestar(
        route_handlers=[UserController, AccountController, CatalogController, ReservationController],
        dependencies={
            "user_service": constant(users),
            "catalog": constant(catalog),
            "accounts": constant(accounts),
            "reservations": constant(reservations),
        },
        plugins=[plugin],
        lifespan=[lifespan],
        request_class=ExactJsonRequest,
        request_max_body_size=MAX_BODY_BYTES,
        debug=False,
    )
    app.state.settings = settings
    app.state.db = db
    return app
