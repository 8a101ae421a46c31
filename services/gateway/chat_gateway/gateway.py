"""The gateway's running parts, handed to its handlers by Litestar's dependency injection
(a ``gateway: Gateway`` parameter, ``GatewayDependency`` in signatures), the way the other
services hand out their service objects. Built with the app; the lifespan starts it (the
internal clients, Redis and the AI channel belong to the event loop) and closes it."""
from __future__ import annotations

from litestar.di import NamedDependency

from chat_gateway.chat.turn import TurnRunner
from chat_gateway.context import GatewayContext
from chat_gateway.settings import GatewaySettings
from chat_gateway.ws.draining import SocketRegistry
from chat_gateway.ws.limits import Limits, make_limits


class Gateway:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        # before the start: the entry point drains sockets on SIGTERM whatever the lifespan did
        self.sockets = SocketRegistry()
        self._context: GatewayContext | None = None
        self._runner: TurnRunner | None = None
        self._limits: Limits | None = None

    async def start(self) -> None:
        context = GatewayContext.create(self.settings)
        self._context = context
        # one runner per process: it remembers the AI's capabilities and owns background tasks
        self._runner = TurnRunner(context)
        # sockets, uploads and downloads draw on the same per-user budget, on this Redis client
        self._limits = make_limits(context.redis, self.settings)

    async def close(self, grace_seconds: float) -> None:
        """Shielded turns and postponed debits still in flight finish, then the clients close."""
        if self._runner is not None:
            await self._runner.drain(grace_seconds)
        if self._context is not None:
            await self._context.close()

    @property
    def context(self) -> GatewayContext:
        if self._context is None:
            raise RuntimeError("gateway used before its lifespan started it")
        return self._context

    @property
    def runner(self) -> TurnRunner:
        if self._runner is None:
            raise RuntimeError("gateway used before its lifespan started it")
        return self._runner

    @property
    def limits(self) -> Limits:
        if self._limits is None:
            raise RuntimeError("gateway used before its lifespan started it")
        return self._limits


GatewayDependency = NamedDependency[Gateway]
