"""Debits that outlive the gateway process that owes them.

A stored turn must be debited even when billing is unreachable at that moment and the gateway
then dies. Before settling, the turn's settle call is written to Redis (``settle:pending``);
it is removed once billing has answered. Every gateway replica periodically replays entries
older than ``SETTLE_RECONCILE_AFTER_SECONDS``: the call carries the turn's idempotency key, so
a replay of a settle that did go through (or that another replica replays too) charges nothing
more, and billing debits a late settle even after the hold itself expired.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from chat_common.client import ServiceClient
from chat_common.errors import AppError, ServiceUnavailableError, UpstreamError

logger = logging.getLogger(__name__)

PENDING_KEY = "settle:pending"


class PendingSettlements:
    def __init__(self, redis: Redis, billing: ServiceClient, *, reconcile_after_seconds: float) -> None:
        self.redis = redis
        self.billing = billing
        self.reconcile_after_seconds = reconcile_after_seconds

    async def remember(self, turn_id: str, path: str, body: dict[str, Any]) -> None:
        entry = json.dumps({"path": path, "body": body, "since": time.time()})
        try:
            await self.redis.hset(PENDING_KEY, turn_id, entry)
        except RedisError as exc:  # the in-process retry still stands behind this debit
            logger.warning("could not record a pending settle: %s", exc)

    async def forget(self, turn_id: str) -> None:
        try:
            await self.redis.hdel(PENDING_KEY, turn_id)
        except RedisError as exc:  # a later replay is harmless: same idempotency key
            logger.warning("could not clear a pending settle: %s", exc)

    async def settle(self, turn_id: str, path: str, body: dict[str, Any]) -> bool:
        """True when billing has answered for good (settled, or refused for a reason a retry
        cannot change); False when it should be tried again later."""
        try:
            await self.billing.post(path, json=body)
        except (ServiceUnavailableError, UpstreamError):
            return False
        except AppError as exc:
            logger.error("billing refused to settle %s: %s", path, exc.message)
        await self.forget(turn_id)
        return True

    async def reconcile_once(self) -> int:
        """Replay the settles left pending for too long; returns how many were answered."""
        try:
            pending = await self.redis.hgetall(PENDING_KEY)
        except RedisError as exc:
            logger.warning("could not read pending settles: %s", exc)
            return 0
        now = time.time()
        answered = 0
        for raw_turn, raw_entry in pending.items():
            turn_id = raw_turn.decode() if isinstance(raw_turn, bytes) else str(raw_turn)
            try:
                entry = json.loads(raw_entry)
                path, body, since = str(entry["path"]), dict(entry["body"]), float(entry["since"])
            except (ValueError, KeyError, TypeError):
                logger.error("dropping an unreadable pending settle for turn %s", turn_id)
                await self.forget(turn_id)
                continue
            if now - since < self.reconcile_after_seconds:
                continue
            if await self.settle(turn_id, path, body):
                answered += 1
                logger.info("pending settle replayed", extra={"settle_path": path})
        return answered

    async def run_forever(self, every_seconds: float) -> None:
        while True:
            await asyncio.sleep(every_seconds)
            try:
                await self.reconcile_once()
            except Exception:  # the next round tries again
                logger.exception("settle reconciliation failed")
