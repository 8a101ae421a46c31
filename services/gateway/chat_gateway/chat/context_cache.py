"""The hot chat context in Redis, and the per-session turn lock.

Redis is a cache and a coordinator, never the truth: ``ctx:{session_id}`` holds what the next
turn needs (owner, name, prompt, summary, how far the summary reaches, the entry count and the
last-N window) and can vanish at any moment (TTL, eviction, FLUSHALL); it is then rebuilt from the
sessions service. Only a turn holding the session's lock writes it, so a reader that raced a turn
can never put an older context back.

``lock:session:{session_id}`` orders turns of one session across sockets and gateway processes:
``SET NX PX`` with a random token, extended while held (a turn may outlive the TTL when the AI is
slow), released only by its owner via compare-and-delete.
"""
from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from types import TracebackType

import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError

from chat_common.client import ServiceClient
from chat_common.errors import NotFoundError

logger = logging.getLogger(__name__)

CONTEXT_KEY = "ctx:{}"
LOCK_KEY = "lock:session:{}"
CONTEXT_VERSION = 1


class Entry(msgspec.Struct):
    role: str
    content: str


class SessionContext(msgspec.Struct, kw_only=True):
    session_id: str
    owner: str
    name: str
    prompt: str
    model_name: str = ""
    summary: str = ""
    # the first ``summarized_upto`` entries of the session are folded into ``summary``
    summarized_upto: int = 0
    entry_count: int = 0
    # the last min(window_size, entry_count) entries, oldest first
    window: list[Entry] = []
    window_size: int = 0
    version: int = CONTEXT_VERSION

    @property
    def window_start(self) -> int:
        """Position (1-based, in the whole session) of ``window[0]``."""
        return self.entry_count - len(self.window) + 1


class _RemoteSession(msgspec.Struct):
    session_id: str
    user_id: str
    session_name: str = ""
    model_name: str = ""
    prompt: str = ""
    summary: str = ""
    summarized_upto: int = 0
    entry_count: int = 0


class _RemoteEntry(msgspec.Struct):
    role: str
    content: str


class _RemoteContext(msgspec.Struct):
    session: _RemoteSession
    entries: list[_RemoteEntry] = []


def context_from_remote(payload: object, window_size: int) -> SessionContext:
    remote = msgspec.convert(payload, _RemoteContext, strict=False)
    session = remote.session
    entries = [Entry(e.role, e.content) for e in remote.entries][-window_size:] if window_size else []
    return SessionContext(
        session_id=session.session_id,
        owner=session.user_id,
        name=session.session_name,
        prompt=session.prompt,
        model_name=session.model_name,
        summary=session.summary,
        summarized_upto=session.summarized_upto,
        entry_count=session.entry_count,
        window=entries,
        window_size=window_size,
    )


class ContextCache:
    def __init__(self, redis: Redis, sessions: ServiceClient, *, window_size: int, ttl_seconds: int) -> None:
        self.redis = redis
        self.sessions = sessions
        self.window_size = window_size
        self.ttl_seconds = max(1, ttl_seconds)
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.json.Decoder(SessionContext)

    async def cached(self, session_id: str) -> SessionContext | None:
        try:
            raw = await self.redis.get(CONTEXT_KEY.format(session_id))
        except RedisError as exc:
            logger.warning("context cache read failed, using the sessions service: %s", exc)
            return None
        if raw is None:
            return None
        try:
            context = self._decoder.decode(raw)
        except msgspec.DecodeError:
            logger.warning("unreadable cached context for session %s; rebuilding", session_id)
            return None
        if context.version != CONTEXT_VERSION or context.window_size != self.window_size:
            return None  # built by a gateway with other settings
        return context

    async def fetch(self, session_id: str, user_id: str) -> SessionContext:
        """From the sessions service (the truth); raises NotFoundError for a foreign session."""
        payload = await self.sessions.get(
            f"/v1/sessions/{session_id}/context",
            params={"user_id": user_id, "window": self.window_size},
        )
        return context_from_remote(payload, self.window_size)

    async def load(self, session_id: str, user_id: str, *, write_back: bool = False) -> SessionContext:
        """The session's context, checked against ``user_id`` whether it came from Redis or not.

        ``write_back`` only under the session lock: a reader outside it may hold a context that a
        concurrent turn has already superseded.
        """
        context = await self.cached(session_id)
        if context is not None:
            if context.owner != user_id:
                # exactly what the sessions service says for a foreign session
                raise NotFoundError("session not found")
            return context
        context = await self.fetch(session_id, user_id)
        if context.owner != user_id:  # the service already checks; this is belt and braces
            raise NotFoundError("session not found")
        if write_back:
            await self.store(context)
        return context

    async def store(self, context: SessionContext) -> None:
        try:
            await self.redis.set(
                CONTEXT_KEY.format(context.session_id), self._encoder.encode(context), ex=self.ttl_seconds
            )
        except RedisError as exc:
            logger.warning("context cache write failed: %s", exc)

    async def invalidate(self, session_id: str) -> None:
        try:
            await self.redis.delete(CONTEXT_KEY.format(session_id))
        except RedisError as exc:
            logger.warning("context cache delete failed: %s", exc)


# ---------------------------------------------------------------------------------------------

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""
_EXTEND = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""


class LockTimeout(Exception):
    pass


class SessionLock:
    """``async with SessionLock(redis, session_id, ...)``: one holder at a time, everywhere."""

    def __init__(
        self,
        redis: Redis,
        session_id: str,
        *,
        ttl_seconds: float,
        wait_seconds: float,
        min_backoff: float = 0.005,
        max_backoff: float = 0.1,
    ) -> None:
        self.redis = redis
        self.key = LOCK_KEY.format(session_id)
        self.token = secrets.token_hex(16)
        self.ttl_ms = max(1000, int(ttl_seconds * 1000))
        self.wait_seconds = wait_seconds
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self._keeper: asyncio.Task[None] | None = None
        self.held = False

    async def acquire(self) -> None:
        deadline = time.monotonic() + self.wait_seconds
        delay = self.min_backoff
        while True:
            if await self.redis.set(self.key, self.token, nx=True, px=self.ttl_ms):
                self.held = True
                self._keeper = asyncio.create_task(self._keep())
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LockTimeout(self.key)
            # jitter so that waiters on many replicas do not poll in lockstep
            await asyncio.sleep(min(remaining, delay * (0.5 + random.random())))
            delay = min(self.max_backoff, delay * 2)

    async def _keep(self) -> None:
        interval = self.ttl_ms / 3000
        while True:
            await asyncio.sleep(interval)
            try:
                if not await self.redis.eval(_EXTEND, 1, self.key, self.token, self.ttl_ms):
                    logger.warning("lost the turn lock %s (expired or Redis wiped)", self.key)
                    return
            except RedisError as exc:
                logger.warning("could not extend the turn lock %s: %s", self.key, exc)

    async def release(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            self._keeper = None
        if not self.held:
            return
        self.held = False
        try:
            await self.redis.eval(_RELEASE, 1, self.key, self.token)
        except RedisError as exc:
            # it expires on its own after the TTL
            logger.warning("could not release the turn lock %s: %s", self.key, exc)

    async def __aenter__(self) -> "SessionLock":
        await self.acquire()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.shield(self.release())
