"""Per-socket scheduling: concurrency across types, order within a type, one writer at a time."""
from __future__ import annotations

import asyncio

from chat_gateway.ws.dispatcher import Dispatcher


class Recorder:
    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.writing = False
        self.overlaps = 0

    async def send(self, frame: bytes) -> None:
        if self.writing:
            self.overlaps += 1
        self.writing = True
        await asyncio.sleep(0.001)  # a write that yields, as a real socket's may
        self.frames.append(frame)
        self.writing = False


def job(label: str, delay: float):
    async def run() -> bytes:
        await asyncio.sleep(delay)
        return label.encode()

    return run


async def test_slow_type_does_not_hold_up_others_and_order_holds_per_type() -> None:
    out = Recorder()
    dispatcher = Dispatcher(out.send)
    # a slow turn first, then quick requests of other types, then more of the slow type
    await dispatcher.submit(3, job("3a", 0.6))
    await dispatcher.submit(3, job("3b", 0.0))
    await dispatcher.submit(3, job("3c", 0.05))
    for i in range(5):
        await dispatcher.submit(1, job(f"1-{i}", 0.02 * (5 - i)))  # later ones faster: order must hold
    await dispatcher.submit(6, job("6", 0.0))
    await asyncio.wait_for(dispatcher.drain(), 5)
    labels = [f.decode() for f in out.frames]
    assert sorted(labels) == sorted(["3a", "3b", "3c", "1-0", "1-1", "1-2", "1-3", "1-4", "6"])
    assert [x for x in labels if x.startswith("3")] == ["3a", "3b", "3c"]
    assert [x for x in labels if x.startswith("1")] == [f"1-{i}" for i in range(5)]
    # everything of the other types was answered while the slow one was still running
    assert labels.index("3a") > max(labels.index("6"), labels.index("1-4"))
    assert out.overlaps == 0
    await dispatcher.close()


async def test_many_concurrent_writers_never_interleave() -> None:
    out = Recorder()
    dispatcher = Dispatcher(out.send)
    for t in range(7):
        for i in range(20):
            await dispatcher.submit(t, job(f"{t}-{i}", 0.0))
    await asyncio.wait_for(dispatcher.drain(), 5)
    assert len(out.frames) == 140
    assert out.overlaps == 0
    for t in range(7):
        assert [f.decode() for f in out.frames if f.decode().startswith(f"{t}-")] == [f"{t}-{i}" for i in range(20)]
    await dispatcher.close()


async def test_a_failing_job_does_not_stop_its_queue() -> None:
    out = Recorder()
    dispatcher = Dispatcher(out.send)

    async def broken() -> bytes:
        raise RuntimeError("bug")

    await dispatcher.submit(0, broken)
    await dispatcher.submit(0, job("after", 0.0))
    await asyncio.wait_for(dispatcher.drain(), 5)
    assert out.frames == [b"after"]
    await dispatcher.close()


async def test_closing_cancels_workers_but_not_shielded_work() -> None:
    out = Recorder()
    dispatcher = Dispatcher(out.send)
    finished = asyncio.Event()

    async def durable() -> None:
        await asyncio.sleep(0.2)
        finished.set()

    task = asyncio.ensure_future(durable())

    async def turn() -> bytes:
        await asyncio.shield(task)
        return b"never sent"

    await dispatcher.submit(3, turn)
    await asyncio.sleep(0.05)
    await dispatcher.close()  # the client went away mid-turn
    await asyncio.wait_for(finished.wait(), 2)
    assert out.frames == []


async def test_writes_after_peer_is_gone_are_dropped() -> None:
    async def broken_send(frame: bytes) -> None:
        raise ConnectionResetError("gone")

    dispatcher = Dispatcher(broken_send)
    await dispatcher.submit(0, job("a", 0.0))
    await dispatcher.submit(0, job("b", 0.0))
    await asyncio.wait_for(dispatcher.drain(), 5)
    assert dispatcher.closed
    await dispatcher.close()


async def test_full_queue_applies_back_pressure() -> None:
    out = Recorder()
    dispatcher = Dispatcher(out.send, max_pending_per_type=2)
    gate = asyncio.Event()

    async def blocked() -> bytes:
        await gate.wait()
        return b"x"

    for _ in range(3):  # one running, two queued
        await dispatcher.submit(3, blocked)
    pending = asyncio.ensure_future(dispatcher.submit(3, blocked))
    await asyncio.sleep(0.05)
    assert not pending.done()  # the reader waits instead of queueing without bound
    await dispatcher.submit(1, job("other", 0.0))  # other types are still served
    await asyncio.sleep(0.05)
    assert b"other" in out.frames
    gate.set()
    await asyncio.wait_for(pending, 2)
    await asyncio.wait_for(dispatcher.drain(), 5)
    assert out.frames.count(b"x") == 4
    await dispatcher.close()
