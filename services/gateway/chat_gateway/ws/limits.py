"""Per-user limits shared by every gateway replica through Redis: requests per time window and
open sockets.

Requests: a fixed-window counter (``rl:req:{subject}:{window}``), INCR and EXPIRE in one Lua
script so a counter can never be left without its expiry. Sockets: a sorted set per subject
(``rl:sockets:{subject}``) whose members are socket ids scored by the time their slot lapses;
each live socket renews its slot on a heartbeat, so the slots of a gateway that crashed free
themselves after ``SOCKET_SLOT_SECONDS`` instead of locking the user out for good. Times come
from Redis (``TIME``), so replicas with skewed clocks still agree on expiry.

Redis trouble opens the limits (logged, at most every 30 s): the limits protect capacity, and
refusing every user because the limiter is down would be the outage they exist to prevent.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from enum import Enum

from redis.asyncio import Redis
from redis.exceptions import RedisError

from chat_gateway.settings import GatewaySettings

logger = logging.getLogger(__name__)

# A subject's window starts with its first request and lasts ARGV[1] seconds, by Redis's own
# clock (the key's expiry): no replica's clock decides where a window begins, and a counter is
# never left without an expiry (a key found without one, however it got there, is given one).
_COUNT = """
local n = redis.call('INCR', KEYS[1])
if redis.call('TTL', KEYS[1]) < 0 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return n
"""

_CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
    if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('EXPIRE', KEYS[1], math.ceil(ttl) + 1)
return 1
"""

_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('EXPIRE', KEYS[1], math.ceil(ttl) + 1)
return 1
"""

_WARN_EVERY_SECONDS = 30.0


class Verdict(Enum):
    OK = "ok"
    LIMITED = "limited"  # answer with an error, keep the socket
    ABUSIVE = "abusive"  # close the socket


def _key_part(subject: str) -> str:
    # A subject is a verified token subject or an address; the bound keeps a key sane anyway.
    return subject[:200]


class _Warner:
    def __init__(self) -> None:
        self._last = 0.0

    def warn(self, what: str, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last >= _WARN_EVERY_SECONDS:
            self._last = now
            logger.warning("%s unavailable, limit not enforced: %s", what, type(exc).__name__)


@dataclass
class RateLimiter:
    redis: Redis
    limit: int
    window_seconds: int
    # past ``abuse_factor * limit`` requests in one window the socket is closed
    abuse_factor: int = 2

    def __post_init__(self) -> None:
        self._script = self.redis.register_script(_COUNT)
        self._warner = _Warner()
        self.window_seconds = max(1, self.window_seconds)

    @property
    def enabled(self) -> bool:
        return self.limit > 0

    async def hit(self, subject: str) -> Verdict:
        if not self.enabled:
            return Verdict.OK
        key = f"rl:req:{_key_part(subject)}"
        try:
            count = int(await self._script(keys=[key], args=[self.window_seconds]))
        except (RedisError, OSError) as exc:
            self._warner.warn("rate limiter", exc)
            return Verdict.OK
        if count <= self.limit:
            return Verdict.OK
        if count > self.limit * self.abuse_factor:
            return Verdict.ABUSIVE
        return Verdict.LIMITED


class SocketSlots:
    """``async with slots.hold(subject) as granted``: at most ``limit`` live sockets per subject."""

    def __init__(self, redis: Redis, limit: int, slot_seconds: float) -> None:
        self.redis = redis
        self.limit = limit
        self.slot_seconds = slot_seconds
        self._claim = redis.register_script(_CLAIM)
        self._renew = redis.register_script(_RENEW)
        self._warner = _Warner()

    @property
    def enabled(self) -> bool:
        return self.limit > 0

    def hold(self, subject: str) -> "_Slot":
        return _Slot(self, f"rl:sockets:{_key_part(subject)}")


class _Slot:
    def __init__(self, slots: SocketSlots, key: str) -> None:
        self.slots = slots
        self.key = key
        self.member = uuid.uuid4().hex
        self.granted = False
        self.claimed = False
        self._heartbeat: asyncio.Task[None] | None = None

    async def __aenter__(self) -> bool:
        slots = self.slots
        if not slots.enabled:
            self.granted = True
            return True
        try:
            self.claimed = bool(
                await slots._claim(keys=[self.key], args=[self.member, slots.limit, slots.slot_seconds])
            )
        except (RedisError, OSError) as exc:
            slots._warner.warn("socket limiter", exc)
            self.granted = True
            return True
        self.granted = self.claimed
        if self.claimed:
            self._heartbeat = asyncio.create_task(self._beat(), name="ws-slot-heartbeat")
        return self.granted

    async def _beat(self) -> None:
        slots = self.slots
        while True:
            await asyncio.sleep(slots.slot_seconds / 3)
            try:
                await slots._renew(keys=[self.key], args=[self.member, slots.slot_seconds])
            except (RedisError, OSError) as exc:
                slots._warner.warn("socket limiter", exc)

    async def __aexit__(self, *exc: object) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        if self.claimed:
            try:
                await asyncio.shield(self.slots.redis.zrem(self.key, self.member))
            except (RedisError, OSError, asyncio.CancelledError):
                pass  # the slot lapses on its own


@dataclass
class Limits:
    requests: RateLimiter
    sockets: SocketSlots


def make_limits(redis: Redis, settings: GatewaySettings) -> Limits:
    return Limits(
        requests=RateLimiter(redis, settings.rate_limit_requests, settings.rate_limit_window_seconds),
        sockets=SocketSlots(redis, settings.max_sockets_per_user, settings.socket_slot_seconds),
    )


def subject_of(user_id: str | None, client: object) -> str:
    """Whom a limit counts: the authenticated user, else the client's address (a claimed
    user_id is free to vary, so it cannot be what a flood is counted by)."""
    if user_id is not None:
        return f"user:{user_id}"
    host = getattr(client, "host", None)
    return f"addr:{host or 'unknown'}"
