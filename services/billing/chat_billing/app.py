from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.di import Provide

from chat_billing.accounts.controllers import AccountController
from chat_billing.accounts.services import AccountService
from chat_billing.admin import BillingAdmin, BillingAdminController
from chat_billing.balance_aware.controllers import balance_aware_router
from chat_billing.catalog.controllers import CatalogController
from chat_billing.catalog.services import CatalogService
from chat_billing.charges.controllers import ChargeController
from chat_billing.charges.services import ChargeService
from chat_billing.limits.controllers import LimitController
from chat_billing.limits.services import LimitService
from chat_billing.pg import Pg
from chat_billing.reservations.controllers import ReservationController
from chat_billing.reservations.services import ReservationService
from chat_billing.reservations.sweeper import sweep_expired_reservations
from chat_billing.settings import BillingSettings
from chat_billing.usage.controllers import UsageController
from chat_billing.usage.services import UsageService
from chat_billing.users.controllers import UserController
from chat_billing.users.services import UserService
from chat_billing.web import ExactJsonRequest
from chat_common.app import ServicePlugin
from chat_common.periodic import every

# The largest valid body (a grant of 1000 model ids, settle details) is far below this.
MAX_BODY_BYTES = 64 * 1024


def create_app(settings: BillingSettings | None = None) -> Litestar:
    settings = settings or BillingSettings.from_env()
    # asyncpg directly; the pool opens in the lifespan (and holds up to pool size + overflow).
    pg = Pg(settings.database_url, settings.db_schema, max_size=settings.db_pool_size + settings.db_max_overflow)
    users = UserService(pg)
    catalog = CatalogService(pg)
    accounts = AccountService(pg)
    reservations = ReservationService(pg, settings.reservation_ttl_seconds)
    charges = ChargeService(pg)
    limits = LimitService(pg)
    usage = UsageService(pg)

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        await pg.open()
        sweeper = asyncio.create_task(
            every(settings.reservation_sweep_seconds, lambda: sweep_expired_reservations(reservations),
                  "reservation sweep"),
            name="reservation-sweep",
        )
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            await pg.close()

    plugin = ServicePlugin(
        name="billing",
        service_token=settings.service.service_token,
        readiness_checks={"database": pg.ping},
    )

    def constant(value: object) -> Provide:
        return Provide(lambda: value, sync_to_thread=False, use_cache=True)

    app = Litestar(
        route_handlers=[UserController, AccountController, CatalogController, ReservationController, ChargeController,
                        LimitController, UsageController, BillingAdminController],
        dependencies={
            "user_service": constant(users),
            "catalog": constant(catalog),
            "accounts": constant(accounts),
            "reservations": constant(reservations),
            "charges": constant(charges),
            "limits": constant(limits),
            "usage": constant(usage),
            "billing_admin": constant(BillingAdmin(pg)),
        },
        plugins=[plugin],
        lifespan=[lifespan],
        request_class=ExactJsonRequest,
        request_max_body_size=MAX_BODY_BYTES,
        debug=False,
    )
    app.state.settings = settings
    app.state.pg = pg
    app.register(balance_aware_router)  # balance-aware turns' switch (migration 0006)
    return app
