"""The file part of an upload on its way to the files service: a streamed request body fed
from a small bounded queue, so the gateway holds a few chunks at most, and a slow files service
slows the reading of the client's body instead of piling it up here."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from chat_common import contracts as c
from chat_common.errors import UpstreamError
from chat_common.feed import BoundedFeed
from chat_gateway.clients import FilesClient

QUEUE_CHUNKS = 8
_EOF = None


class FilePipe:
    def __init__(self, files: FilesClient, params: dict[str, str]) -> None:
        self._feed: BoundedFeed[bytes | None] = BoundedFeed(QUEUE_CHUNKS)
        self._task: asyncio.Task[c.StoredFile] = asyncio.create_task(
            files.upload(params, self._body())
        )

    async def _body(self) -> AsyncIterator[bytes]:
        while (chunk := await self._feed.queue.get()) is not _EOF:
            yield chunk

    async def _offer(self, item: bytes | None) -> None:
        if not await self._feed.offer(item, self._task):
            await self._ended_early()

    async def _ended_early(self) -> None:
        # The files service answered before taking the whole body: its answer is the error
        # (raised here as the matching AppError); a success this early would be a bug.
        await self._task
        raise UpstreamError("the files service ended the upload before the file was complete")

    async def write(self, chunk: bytes) -> None:
        if chunk:
            await self._offer(chunk)

    async def finish(self) -> c.StoredFile:
        await self._offer(_EOF)
        return await self._task

    async def abort(self) -> None:
        """Drop the upload: the files service sees the body cut off and stores nothing."""
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
