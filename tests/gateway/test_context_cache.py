"""The Redis context cache and the per-session turn lock, against a real Redis."""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from chat_common.errors import NotFoundError
from chat_gateway.chat.context_cache import (
    CONTEXT_KEY,
    LOCK_KEY,
    ContextCache,
    Entry,
    LockTimeout,
    SessionContext,
    SessionLock,
)


@pytest.fixture
async def redis(redis_server) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url(), decode_responses=False)
    yield client
    await client.aclose()


class FakeSessions:
    """Stands in for the sessions service's context endpoint (the truth the cache rebuilds from)."""

    def __init__(self) -> None:
        self.sessions: dict[str, dict[str, Any]] = {}
        self.calls = 0

    def add(self, owner: str, entries: int) -> str:
        session_id = str(uuid.uuid4())
        self.sessions[session_id] = {
            "session": {
                "session_id": session_id,
                "user_id": owner,
                "session_name": "name",
                "model_name": "m",
                "prompt": "p",
                "summary": "s",
                "summarized_upto": max(0, entries - 4),
                "entry_count": entries,
                "created_at": "x",
            },
            "entries": [
                {"seq": i + 1, "role": "user" if i % 2 == 0 else "assistant", "content": f"e{i + 1}", "turn_id": "t"}
                for i in range(entries)
            ],
        }
        return session_id

    async def get(self, path: str, params: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        session_id = path.split("/")[3]
        found = self.sessions.get(session_id)
        if found is None or found["session"]["user_id"] != params["user_id"]:
            raise NotFoundError("session not found")
        return {"session": found["session"], "entries": found["entries"][-params["window"]:]}


async def test_miss_rebuilds_from_sessions_and_hit_checks_owner(redis: Redis) -> None:
    sessions = FakeSessions()
    owner, other = str(uuid.uuid4()), str(uuid.uuid4())
    session_id = sessions.add(owner, entries=7)
    cache = ContextCache(redis, sessions, window_size=4, ttl_seconds=60)  # type: ignore[arg-type]

    # a read outside the lock does not populate the cache
    context = await cache.load(session_id, owner)
    assert [e.content for e in context.window] == ["e4", "e5", "e6", "e7"]
    assert context.window_start == 4 and context.entry_count == 7
    assert await redis.get(CONTEXT_KEY.format(session_id)) is None

    await cache.load(session_id, owner, write_back=True)
    assert await redis.ttl(CONTEXT_KEY.format(session_id)) > 0
    calls = sessions.calls
    assert (await cache.load(session_id, owner)).summary == "s"
    assert sessions.calls == calls  # served from Redis

    # the ownership check holds on a cache hit, not only in the sessions service
    with pytest.raises(NotFoundError):
        await cache.load(session_id, other)
    assert sessions.calls == calls
    with pytest.raises(NotFoundError):
        await cache.load(str(uuid.uuid4()), owner)


async def test_wiped_or_garbled_cache_is_rebuilt(redis: Redis) -> None:
    sessions = FakeSessions()
    owner = str(uuid.uuid4())
    session_id = sessions.add(owner, entries=3)
    cache = ContextCache(redis, sessions, window_size=10, ttl_seconds=60)  # type: ignore[arg-type]
    stored = SessionContext(
        session_id=session_id, owner=owner, name="cached", prompt="p", entry_count=3,
        window=[Entry("user", "a"), Entry("assistant", "b"), Entry("user", "c")], window_size=10,
    )
    await cache.store(stored)
    assert (await cache.load(session_id, owner)).name == "cached"

    await redis.flushall()
    assert (await cache.load(session_id, owner)).name == "name"

    await redis.set(CONTEXT_KEY.format(session_id), b"{not json")
    assert (await cache.load(session_id, owner)).name == "name"

    # a context built for another window size is not trusted
    await cache.store(stored)
    other = ContextCache(redis, sessions, window_size=2, ttl_seconds=60)  # type: ignore[arg-type]
    rebuilt = await other.load(session_id, owner)
    assert rebuilt.name == "name" and len(rebuilt.window) == 2

    await cache.invalidate(session_id)
    assert await redis.get(CONTEXT_KEY.format(session_id)) is None


async def test_lock_serialises_holders_across_clients(redis_server, redis: Redis) -> None:
    # two clients stand for two gateway processes sharing one Redis
    second = Redis.from_url(redis_server.url(), decode_responses=False)
    session_id = str(uuid.uuid4())
    inside = 0
    overlaps = 0
    order: list[int] = []

    async def turn(i: int) -> None:
        nonlocal inside, overlaps
        client = redis if i % 2 == 0 else second
        async with SessionLock(client, session_id, ttl_seconds=5, wait_seconds=10):
            inside += 1
            overlaps += inside > 1
            await asyncio.sleep(0.01)
            order.append(i)
            inside -= 1

    await asyncio.gather(*(turn(i) for i in range(20)))
    await second.aclose()
    assert overlaps == 0
    assert sorted(order) == list(range(20))
    assert await redis.get(LOCK_KEY.format(session_id)) is None


async def test_lock_wait_is_bounded(redis: Redis) -> None:
    session_id = str(uuid.uuid4())
    async with SessionLock(redis, session_id, ttl_seconds=5, wait_seconds=1):
        started = asyncio.get_running_loop().time()
        with pytest.raises(LockTimeout):
            await SessionLock(redis, session_id, ttl_seconds=5, wait_seconds=0.3).acquire()
        assert 0.25 < asyncio.get_running_loop().time() - started < 1.0
    # released: free again at once
    lock = SessionLock(redis, session_id, ttl_seconds=5, wait_seconds=0.1)
    await lock.acquire()
    await lock.release()


async def test_lock_is_extended_while_held(redis: Redis) -> None:
    session_id = str(uuid.uuid4())
    async with SessionLock(redis, session_id, ttl_seconds=1, wait_seconds=1):
        # held three times its TTL: a waiter must still not get in
        with pytest.raises(LockTimeout):
            await SessionLock(redis, session_id, ttl_seconds=1, wait_seconds=2.5).acquire()


async def test_release_never_frees_someone_elses_lock(redis: Redis) -> None:
    session_id = str(uuid.uuid4())
    first = SessionLock(redis, session_id, ttl_seconds=5, wait_seconds=1)
    await first.acquire()
    await redis.delete(LOCK_KEY.format(session_id))  # as after expiry or FLUSHALL
    second = SessionLock(redis, session_id, ttl_seconds=5, wait_seconds=1)
    await second.acquire()
    await first.release()  # compare-and-delete: not its token any more
    assert await redis.get(LOCK_KEY.format(session_id)) == second.token.encode()
    await second.release()
    assert await redis.get(LOCK_KEY.format(session_id)) is None
