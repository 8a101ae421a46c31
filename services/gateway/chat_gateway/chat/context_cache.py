"""The hot chat context in Redis, and the per-session turn lock.

Redis is a cache and a coordinator, never the truth: ``ctx:{session_id}`` holds what the next
turn needs (owner, name, prompt, summary, how far the summary reaches, the entry count and the
entries not yet folded into the summary, or the last N if more) and can vanish at any moment
(TTL, eviction, FLUSHALL); it is then rebuilt from the sessions service. Only a turn holding the
session's lock writes it.

``lock:session:{session_id}`` orders turns of one session across sockets and gateway processes:
``SET NX PX`` with a random token and a short lease that the process renews while the turn runs,
released only by its owner (compare-and-delete). The lease is short so that a session whose
gateway died takes a new turn within seconds; how long a waiter waits is a separate setting.
The lock is an optimisation of order, not its guarantee: should Redis forget it, the sessions
service's fenced append refuses the second of two turns that both believed they held it.

Each step is one Redis round trip: taking the lock also reads the cached context, and releasing
it also writes the context the next turn starts from.
"""
from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time

import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError

from chat_common import contracts as c

logger = logging.getLogger(__name__)

CONTEXT_KEY = "ctx:{}"
LOCK_KEY = "lock:session:{}"
CONTEXT_VERSION = 2


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
    # the session's last entries, oldest first: at least the last ``window_size`` (or all) and
    # every entry the summary does not cover yet
    entries: list[Entry] = []
    window_size: int = 0
    version: int = CONTEXT_VERSION

    @property
    def first_cached(self) -> int:
        """Seq (0-based, in the whole session) of ``entries[0]``."""
        return self.entry_count - len(self.entries)

    def window(self) -> list[Entry]:
        """The last ``window_size`` entries: the history the AI gets."""
        if self.window_size <= 0:
            return []
        return self.entries[-self.window_size:]

    def has_gap(self) -> bool:
        """True when the summary plus the window would leave entries out."""
        return self.summarized_upto < self.entry_count - self.window_size

    def unsummarized(self) -> list[Entry] | None:
        """The entries the summary does not cover, or None when they are not all cached."""
        if self.summarized_upto < self.first_cached:
            return None
        return self.entries[self.summarized_upto - self.first_cached:]

    def trimmed(self) -> "SessionContext":
        """Only what the next turn needs: the window and every entry not yet summarized."""
        keep = max(min(self.window_size, self.entry_count), self.entry_count - self.summarized_upto)
        if len(self.entries) > keep:
            self.entries = self.entries[len(self.entries) - keep:]
        return self


def context_from_remote(remote: c.SessionContext, window_size: int) -> SessionContext:
    session = remote.session
    entries = [Entry(e.role, e.content) for e in remote.entries]
    return SessionContext(
        session_id=session.session_id,
        owner=session.user_id,
        name=session.session_name,
        prompt=session.prompt,
        model_name=session.model_name,
        summary=session.summary,
        summarized_upto=session.summarized_upto,
        entry_count=session.entry_count,
        entries=entries[-window_size:] if window_size else [],
        window_size=window_size,
    )


_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""


class LockTimeout(Exception):
    pass


class ContextStore:
    """The cached contexts and the session locks of one gateway process."""

    def __init__(
        self,
        redis: Redis,
        *,
        window_size: int,
        ttl_seconds: int,
        lease_seconds: float,
        wait_seconds: float,
    ) -> None:
        self.redis = redis
        self.window_size = window_size
        self.ttl_seconds = max(1, ttl_seconds)
        self.lease_ms = max(1000, int(lease_seconds * 1000))
        # held leases are renewed three times per lease (chat_common.periodic.every runs renew_held)
        self.renew_seconds = self.lease_ms / 3000
        self.wait_seconds = wait_seconds
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.json.Decoder(SessionContext)
        # locks this process holds: key -> token, renewed together by one loop
        self.held: dict[str, str] = {}

    # -- the context ------------------------------------------------------------------------

    def decode(self, raw: bytes | str | None, session_id: str) -> SessionContext | None:
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

    async def cached(self, session_id: str) -> SessionContext | None:
        try:
            raw = await self.redis.get(CONTEXT_KEY.format(session_id))
        except RedisError as exc:
            logger.warning("context cache read failed, using the sessions service: %s", exc)
            return None
        return self.decode(raw, session_id)

    async def invalidate(self, session_id: str) -> None:
        try:
            await self.redis.delete(CONTEXT_KEY.format(session_id))
        except RedisError as exc:
            logger.warning("context cache delete failed: %s", exc)

    # -- the lock ---------------------------------------------------------------------------

    async def lock(self, session_id: str, *, read_context: bool) -> tuple[str, SessionContext | None]:
        """Take the session's lock (waiting up to ``wait_seconds``); returns its token and, when
        asked, the cached context read in the same round trip."""
        key = LOCK_KEY.format(session_id)
        token = secrets.token_hex(16)
        deadline = time.monotonic() + self.wait_seconds
        delay = 0.005
        while True:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.set(key, token, nx=True, px=self.lease_ms)
                if read_context:
                    pipe.get(CONTEXT_KEY.format(session_id))
                replies = await pipe.execute()
            if replies[0]:
                self.held[key] = token
                return token, self.decode(replies[1], session_id) if read_context else None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LockTimeout(key)
            # jitter so that waiters on many replicas do not poll in lockstep
            await asyncio.sleep(min(remaining, delay * (0.5 + random.random())))  # noqa: S311 - jitter, not a secret
            delay = min(0.1, delay * 2)

    async def unlock(self, session_id: str, token: str, context: SessionContext | None) -> None:
        """Release the lock; with ``context``, write it as the next turn's start (one round trip)."""
        key = LOCK_KEY.format(session_id)
        self.held.pop(key, None)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                if context is not None:
                    pipe.set(CONTEXT_KEY.format(session_id), self._encoder.encode(context.trimmed()), ex=self.ttl_seconds)
                pipe.eval(_RELEASE, 1, key, token)
                await pipe.execute()
        except RedisError as exc:
            # the lease runs out on its own; a context not written is rebuilt from sessions
            logger.warning("could not release the turn lock %s: %s", key, exc)

    async def renew_held(self) -> int:
        """Push every held lease forward; returns how many were lost (expired or wiped)."""
        if not self.held:
            return 0
        items = list(self.held.items())
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, token in items:
                pipe.eval(_RENEW, 1, key, token, self.lease_ms)
            replies = await pipe.execute()
        lost = 0
        for (key, token), renewed in zip(items, replies, strict=True):
            if not renewed and self.held.get(key) == token:
                # Nothing to do but say so: the fenced append keeps the order.
                logger.warning("lost the turn lock %s (expired or Redis wiped)", key)
                lost += 1
        return lost
