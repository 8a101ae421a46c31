"""Per-socket request scheduling.

One FIFO queue and one worker per message type: requests of different types run concurrently
(a slow chat turn never holds up a session list), requests of the same type are served one after
another so their replies leave in the order they came. Writes to the socket go through one lock:
a frame is never interleaved with another.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger(__name__)

Send = Callable[[bytes], Awaitable[None]]
# a job produces the reply frame; it must not raise (the caller turns errors into frames)
Job = Callable[[], Awaitable[bytes]]


class Dispatcher:
    def __init__(self, send: Send, *, max_pending_per_type: int = 64) -> None:
        self._send = send
        self._write_lock = asyncio.Lock()
        self._queues: dict[Any, asyncio.Queue[Job]] = {}
        self._workers: dict[Any, asyncio.Task[None]] = {}
        self._max_pending = max_pending_per_type
        self.closed = False

    async def submit(self, key: Any, job: Job) -> None:
        """Queue ``job`` behind earlier jobs of the same ``key``.

        Waits when that queue is full: the socket is then simply not read until the client's
        own backlog drains (back-pressure instead of unbounded memory).
        """
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = asyncio.Queue(self._max_pending)
            self._workers[key] = asyncio.create_task(self._work(queue), name=f"ws-worker-{key}")
        await queue.put(job)

    async def idle(self) -> None:
        """Until every queued request has been answered (replies written)."""
        await asyncio.gather(*(queue.join() for queue in list(self._queues.values())))

    async def reply_now(self, frame: bytes) -> None:
        """For frames that belong to no queue (unreadable or of an unknown type)."""
        await self.write(frame)

    async def write(self, frame: bytes) -> None:
        if self.closed:
            return
        async with self._write_lock:
            try:
                await self._send(frame)
            except Exception as exc:  # the peer went away; its replies have nowhere to go
                logger.debug("socket write failed: %s", exc)
                self.closed = True

    async def shut(self, closer: Callable[[], Awaitable[None]]) -> None:
        """Run ``closer`` (the close frame) after any frame being written, and write no more:
        a close frame in the middle of a reply would corrupt the stream."""
        async with self._write_lock:
            if self.closed:
                return
            self.closed = True
            try:
                await closer()
            except Exception as exc:  # already gone
                logger.debug("socket close failed: %s", exc)

    async def _work(self, queue: asyncio.Queue[Job]) -> None:
        while True:
            job = await queue.get()
            try:
                frame = await job()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in a handler must not end the worker of its type
                logger.exception("request handler failed")
                queue.task_done()
                continue
            await self.write(frame)
            queue.task_done()

    async def drain(self) -> None:
        """Wait until every queued job has been answered (tests, graceful close)."""
        for queue in list(self._queues.values()):
            await queue.join()

    async def close(self) -> None:
        """Stop the workers. Jobs that protect their durable part (``asyncio.shield``) go on."""
        self.closed = True
        workers = list(self._workers.values())
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
