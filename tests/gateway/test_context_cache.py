"""The Redis context cache and the per-session turn lock (short lease, renewed while held),
against a real Redis; and the context's rules for the window and the summary."""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from chat_common.periodic import every
from chat_gateway.chat.context_cache import (
    CONTEXT_KEY,
    LOCK_KEY,
    ContextStore,
    Entry,
    LockTimeout,
    SessionContext,
)


@pytest.fixture
async def redis(redis_server) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url(), decode_responses=False)
    yield client
    await client.aclose()


def store_for(redis: Redis, *, window: int = 4, lease: float = 5.0, wait: float = 1.0) -> ContextStore:
    return ContextStore(redis, window_size=window, ttl_seconds=60, lease_seconds=lease, wait_seconds=wait)


def context(session_id: str, *, entries: int, summarized: int, window: int = 4, cached: int | None = None) -> SessionContext:
    count = entries if cached is None else cached
    return SessionContext(
        session_id=session_id, owner="u", name="n", prompt="p", summary="s", summarized_upto=summarized,
        entry_count=entries, entries=[Entry("user", f"e{i}") for i in range(entries - count, entries)],
        window_size=window,
    )


# -- the context's rules ------------------------------------------------------------------------


def test_window_is_the_last_n_entries() -> None:
    ctx = context("s", entries=7, summarized=3)
    assert [e.content for e in ctx.window()] == ["e3", "e4", "e5", "e6"]
    assert context("s", entries=2, summarized=0).window() == [Entry("user", "e0"), Entry("user", "e1")]
    assert context("s", entries=5, summarized=0, window=0).window() == []


def test_gap_means_the_summary_and_window_would_leave_entries_out() -> None:
    assert not context("s", entries=4, summarized=0).has_gap()
    assert context("s", entries=5, summarized=0).has_gap()
    assert not context("s", entries=9, summarized=5).has_gap()
    assert context("s", entries=10, summarized=5).has_gap()
    # the summary may overlap the window
    assert not context("s", entries=10, summarized=10).has_gap()


def test_unsummarized_entries_come_from_the_cache_only_when_all_are_there() -> None:
    ctx = context("s", entries=9, summarized=3)
    assert [e.content for e in ctx.unsummarized() or []] == ["e3", "e4", "e5", "e6", "e7", "e8"]
    assert context("s", entries=9, summarized=3, cached=4).unsummarized() is None


def test_trimmed_keeps_the_window_and_everything_not_yet_summarized() -> None:
    ctx = context("s", entries=12, summarized=6).trimmed()
    assert [e.content for e in ctx.entries] == [f"e{i}" for i in range(6, 12)]
    ctx = context("s", entries=12, summarized=12).trimmed()
    assert [e.content for e in ctx.entries] == ["e8", "e9", "e10", "e11"]


# -- the lock and the cache ---------------------------------------------------------------------


async def test_lock_reads_and_unlock_writes_the_context(redis: Redis) -> None:
    store = store_for(redis)
    session_id = str(uuid.uuid4())
    token, cached = await store.lock(session_id, read_context=True)
    assert cached is None
    await store.unlock(session_id, token, context(session_id, entries=12, summarized=12))
    assert await redis.get(LOCK_KEY.format(session_id)) is None
    assert await redis.ttl(CONTEXT_KEY.format(session_id)) > 0
    token, cached = await store.lock(session_id, read_context=True)
    assert cached is not None and cached.entry_count == 12
    assert [e.content for e in cached.entries] == ["e8", "e9", "e10", "e11"]  # stored trimmed
    # released without a context: the cached one stays as it was
    await store.unlock(session_id, token, None)
    assert (await store.cached(session_id)) is not None


async def test_garbled_or_foreign_settings_context_is_not_trusted(redis: Redis) -> None:
    store = store_for(redis, window=4)
    session_id = str(uuid.uuid4())
    await redis.set(CONTEXT_KEY.format(session_id), b"{not json")
    assert await store.cached(session_id) is None
    token, _ = await store.lock(session_id, read_context=True)
    await store.unlock(session_id, token, context(session_id, entries=3, summarized=0))
    assert await store_for(redis, window=2).cached(session_id) is None  # built for another window
    await store.invalidate(session_id)
    assert await redis.get(CONTEXT_KEY.format(session_id)) is None


async def test_lock_serialises_holders_across_clients(redis_server, redis: Redis) -> None:
    # two clients stand for two gateway processes sharing one Redis
    second = Redis.from_url(redis_server.url(), decode_responses=False)
    stores = [store_for(redis, wait=10), store_for(second, wait=10)]
    session_id = str(uuid.uuid4())
    inside = 0
    overlaps = 0
    done: list[int] = []

    async def turn(i: int) -> None:
        nonlocal inside, overlaps
        store = stores[i % 2]
        token, _ = await store.lock(session_id, read_context=True)
        inside += 1
        overlaps += inside > 1
        await asyncio.sleep(0.01)
        done.append(i)
        inside -= 1
        await store.unlock(session_id, token, None)

    await asyncio.gather(*(turn(i) for i in range(20)))
    await second.aclose()
    assert overlaps == 0 and sorted(done) == list(range(20))
    assert await redis.get(LOCK_KEY.format(session_id)) is None


async def test_lock_wait_is_bounded_and_separate_from_the_lease(redis: Redis) -> None:
    session_id = str(uuid.uuid4())
    holder = store_for(redis, lease=5)
    token, _ = await holder.lock(session_id, read_context=False)
    with pytest.raises(LockTimeout):
        await store_for(redis, lease=5, wait=0.3).lock(session_id, read_context=False)
    await holder.unlock(session_id, token, None)
    # released: free again at once
    token, _ = await store_for(redis, wait=0.1).lock(session_id, read_context=False)
    assert await redis.get(LOCK_KEY.format(session_id)) == token.encode()


async def test_an_unrenewed_lease_runs_out_and_a_renewed_one_does_not(redis: Redis) -> None:
    session_id = str(uuid.uuid4())
    dead = store_for(redis, lease=1)  # a gateway that died: nobody renews its lease
    await dead.lock(session_id, read_context=False)
    token, _ = await store_for(redis, lease=1, wait=5).lock(session_id, read_context=False)
    assert await redis.get(LOCK_KEY.format(session_id)) == token.encode()

    other = str(uuid.uuid4())
    alive = store_for(redis, lease=1)
    await alive.lock(other, read_context=False)
    keeper = asyncio.create_task(every(alive.renew_seconds, alive.renew_held, "turn lock renewal", expected=(RedisError,)))
    try:
        with pytest.raises(LockTimeout):  # held well past its 1 s lease
            await store_for(redis, lease=1, wait=2.5).lock(other, read_context=False)
    finally:
        keeper.cancel()


async def test_release_never_frees_someone_elses_lock(redis: Redis) -> None:
    session_id = str(uuid.uuid4())
    first = store_for(redis)
    token, _ = await first.lock(session_id, read_context=False)
    await redis.delete(LOCK_KEY.format(session_id))  # as after expiry or FLUSHALL
    assert await first.renew_held() == 1  # it notices it lost the lock
    second = store_for(redis)
    token2, _ = await second.lock(session_id, read_context=False)
    await first.unlock(session_id, token, None)  # compare-and-delete: not its token any more
    assert await redis.get(LOCK_KEY.format(session_id)) == token2.encode()
    await second.unlock(session_id, token2, None)
    assert await redis.get(LOCK_KEY.format(session_id)) is None
