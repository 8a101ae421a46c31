from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from grpc_health.v1 import health_pb2, health_pb2_grpc
from litestar import Litestar
from litestar.config.cors import CORSConfig
from litestar.di import Provide
from redis.exceptions import RedisError

from chat_common.app import ServicePlugin, parse_networks
from chat_common.periodic import every
from chat_gateway.admin import AdminController
from chat_gateway.auth import check_configuration
from chat_gateway.chat.retention import RetentionSweeper
from chat_gateway.context import GatewayContext
from chat_gateway.gateway import Gateway
from chat_gateway.settings import GatewaySettings
from chat_gateway.uploads.controllers import upload_routes
from chat_gateway.ws.handlers import websocket_routes


def create_app(settings: GatewaySettings | None = None) -> Litestar:
    settings = settings or GatewaySettings.from_env()
    # A jwt configuration that could verify nothing stops the start (ValueError), not the
    # first request; what it merely warns about is logged by __main__ once logging is set.
    configuration_notes = check_configuration(settings)
    gateway = Gateway(settings)

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        await gateway.start()
        context, runner = gateway.context, gateway.runner
        # Redis away is expected (its clients reconnect); other failures the loop classifies
        redis = (RedisError,)
        workers = [
            asyncio.create_task(
                every(settings.outbox_sweep_seconds, runner.owed.settle_once, "owed charges", expected=redis)
            ),
            asyncio.create_task(
                every(runner.store.renew_seconds, runner.store.renew_held, "turn lock renewal", expected=redis)
            ),
            asyncio.create_task(
                every(max(1.0, settings.reservation_lease_seconds / 3), runner.renew_holds, "hold renewal",
                      expected=redis)
            ),
        ]
        if settings.session_retention_days is not None:
            sweeper = RetentionSweeper(
                context.sessions, context.files, runner.store, retention_days=settings.session_retention_days
            )
            workers.append(asyncio.create_task(every(settings.retention_sweep_seconds, sweeper.sweep_once, "retention sweep", expected=redis)))
        try:
            yield
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            await gateway.close(settings.service.shutdown_grace_seconds)

    def context() -> GatewayContext:
        return gateway.context

    async def redis_ready() -> None:
        await context().redis.ping()

    async def ai_ready() -> None:
        stub = health_pb2_grpc.HealthStub(context().ai_channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError("AI service not serving")

    plugin = ServicePlugin(
        name="gateway",
        service_token=None,
        # /metrics and /schema are not for the public (chat_common.app.GuardMiddleware)
        private_from=parse_networks(settings.metrics_allow_from),
        metrics_token=settings.metrics_token,
        readiness_checks={
            "redis": redis_ready,
            "sessions": lambda: context().sessions.ping(),
            "files": lambda: context().files.ping(),
            "billing": lambda: context().billing.ping(),
            "ai": ai_ready,
        },
    )
    cors = None
    if settings.allowed_origins:
        # Headers: "*" makes Litestar echo the preflight's list, which is how `Authorization`
        # gets through (a literal "*" does not cover it in browsers). No credentials: tokens
        # travel in headers, never in cookies, so no other site can ride on them.
        cors = CORSConfig(
            allow_origins=list(settings.allowed_origins),
            allow_headers=["*"],
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_credentials=False,
            max_age=600,
        )
    app = Litestar(
        route_handlers=[*websocket_routes, *upload_routes, AdminController],
        dependencies={"gateway": Provide(lambda: gateway, sync_to_thread=False)},
        plugins=[plugin],
        lifespan=[lifespan],
        cors_config=cors,
        debug=False,
    )
    # for the entry point only (chat_gateway.__main__: the warnings to log, the sockets to drain
    # on SIGTERM); handlers get the gateway by injection
    app.state.gateway = gateway
    app.state.configuration_notes = configuration_notes
    return app
