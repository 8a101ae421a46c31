from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from grpc_health.v1 import health_pb2, health_pb2_grpc
from litestar import Litestar
from litestar.config.cors import CORSConfig

from chat_common.app import ServicePlugin, parse_networks
from chat_gateway.admin import AdminController
from chat_gateway.auth import check_configuration
from chat_gateway.chat.retention import RetentionSweeper
from chat_gateway.chat.periodic import every
from chat_gateway.context import GatewayContext
from chat_gateway.settings import GatewaySettings
from chat_gateway.uploads.controllers import upload_routes
from chat_gateway.ws.draining import SocketRegistry
from chat_gateway.ws.handlers import turn_runner, websocket_routes


def create_app(settings: GatewaySettings | None = None) -> Litestar:
    settings = settings or GatewaySettings.from_env()
    # A jwt configuration that could verify nothing stops the start (ValueError), not the
    # first request; what it merely warns about is logged by __main__ once logging is set.
    configuration_notes = check_configuration(settings)
    holder: dict[str, GatewayContext] = {}

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        context = GatewayContext.create(settings)
        holder["context"] = context
        app.state.gateway = context
        runner = turn_runner(app.state, context)
        workers = [
            asyncio.create_task(every(settings.outbox_sweep_seconds, runner.owed.settle_once, "owed charges")),
            asyncio.create_task(every(runner.store.renew_seconds, runner.store.renew_held, "turn lock renewal")),
            asyncio.create_task(
                every(max(1.0, settings.reservation_lease_seconds / 3), runner.renew_holds, "hold renewal")
            ),
        ]
        if settings.session_retention_days is not None:
            sweeper = RetentionSweeper(
                context.sessions, context.files, runner.store, retention_days=settings.session_retention_days
            )
            app.state.retention = sweeper
            workers.append(asyncio.create_task(every(settings.retention_sweep_seconds, sweeper.sweep_once, "retention sweep")))
        try:
            yield
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            # shielded turns and postponed debits still in flight finish before the clients close
            in_flight = getattr(app.state, "turn_runner", None)
            if in_flight is not None:
                await in_flight.drain(settings.service.shutdown_grace_seconds)
            await context.close()

    def context() -> GatewayContext:
        return holder["context"]

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
        plugins=[plugin],
        lifespan=[lifespan],
        cors_config=cors,
        debug=False,
    )
    app.state.settings = settings
    app.state.configuration_notes = configuration_notes
    app.state.sockets = SocketRegistry()
    return app
