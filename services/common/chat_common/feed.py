"""Chunks handed from a producer to a consumer through a small bounded queue: the producer
waits while the consumer is slow (so nothing piles up in memory), and learns at once when the
consumer has ended before taking what it offers. The gateway's upload pipe to the files service
and the files service's stream into the object store both move bytes this way."""
from __future__ import annotations

import asyncio
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class BoundedFeed(Generic[T]):
    def __init__(self, size: int) -> None:
        self.queue: asyncio.Queue[T] = asyncio.Queue(size)

    async def offer(self, item: T, consumer: asyncio.Future[Any]) -> bool:
        """Queue ``item``, waiting for room; False when ``consumer`` ended (done, failed or
        cancelled) before taking it, which is then the consumer's outcome to report."""
        if consumer.done():
            return False
        if not self.queue.full():
            self.queue.put_nowait(item)
            return True
        putter = asyncio.ensure_future(self.queue.put(item))
        try:
            await asyncio.wait({putter, consumer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not putter.done():
                putter.cancel()
        return putter.done() and not putter.cancelled()
