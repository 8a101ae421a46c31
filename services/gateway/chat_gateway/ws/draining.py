"""Going away gracefully: on SIGTERM the server stops accepting connections, then every open
socket gets to finish what it has in flight (a chat turn included) within the grace period, and
is closed with 1001 "going away" so the client reconnects to another replica."""
from __future__ import annotations

import asyncio
import logging
from typing import Protocol

logger = logging.getLogger(__name__)

WS_GOING_AWAY = 1001


class Drainable(Protocol):
    async def go_away(self, grace_seconds: float) -> None: ...


class SocketRegistry:
    def __init__(self) -> None:
        self.sockets: set[Drainable] = set()
        self.draining = False

    def add(self, socket: Drainable) -> None:
        self.sockets.add(socket)

    def discard(self, socket: Drainable) -> None:
        self.sockets.discard(socket)

    async def drain(self, grace_seconds: float) -> None:
        self.draining = True
        open_now = list(self.sockets)
        if open_now:
            logger.info("draining sockets", extra={"sockets": len(open_now), "grace_seconds": grace_seconds})
        await asyncio.gather(*(socket.go_away(grace_seconds) for socket in open_now), return_exceptions=True)
