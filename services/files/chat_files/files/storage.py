"""The S3 bucket, through the ``minio`` SDK (which is blocking: every call runs in a thread).

Uploads stream: the request body is handed chunk by chunk to a thread running
``put_object(length=-1)``, through a small bounded queue, so neither side ever holds more than
a few chunks plus the part minio is sending (``PART_SIZE``).
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from itertools import islice
from typing import Any, BinaryIO, TypeVar, cast

import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import S3Error

from chat_common.feed import BoundedFeed
from chat_files.settings import FilesSettings

logger = logging.getLogger(__name__)

T = TypeVar("T")

PART_SIZE = 5 * 1024 * 1024  # the S3 minimum part size: the least memory a multipart upload needs
QUEUE_CHUNKS = 8
DOWNLOAD_CHUNK = 64 * 1024
# A stalled producer (a client that stopped sending) must not pin an upload thread forever.
STREAM_IDLE_SECONDS = 120.0
OBJECT_PREFIX = "uploads/"
_MISSING = {"NoSuchKey", "NoSuchObject", "NoSuchBucket", "NotFound"}


class StorageError(Exception):
    """The bucket could not be reached or refused the operation."""


class ObjectMissing(StorageError):
    pass


class _Abort(Exception):
    """Raised inside the upload thread to make minio abort the multipart upload."""


_EOF = object()
_ABORT = object()


def _http_client(pool_size: int) -> urllib3.PoolManager:
    # minio's default retries for minutes with a 5-minute timeout; a dead bucket should show
    # up as a prompt 503 and a failed readiness check instead.
    return urllib3.PoolManager(
        num_pools=4,
        maxsize=pool_size,
        timeout=urllib3.Timeout(connect=5.0, read=60.0),
        retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
    )


class _QueueReader:
    """A blocking ``read()`` over an asyncio queue, for minio running in a worker thread."""

    def __init__(self, queue: asyncio.Queue[object], loop: asyncio.AbstractEventLoop) -> None:
        self._queue = queue
        self._loop = loop
        self._pending = memoryview(b"")
        self._eof = False

    def _next(self) -> object:
        future = asyncio.run_coroutine_threadsafe(self._queue.get(), self._loop)
        try:
            return future.result(STREAM_IDLE_SECONDS)
        except TimeoutError as exc:
            future.cancel()
            raise _Abort("upload stream stalled") from exc

    def read(self, size: int = -1) -> bytes:
        # Gather up to ``size`` bytes into one object: minio asks for a whole part at a time.
        # BytesIO.getvalue() hands over its own buffer without a copy, so a part exists once
        # here, not as chunks plus their join.
        wanted = size if size >= 0 else PART_SIZE
        buffer = io.BytesIO()
        got = 0
        while got < wanted and not self._eof:
            if not self._pending:
                item = self._next()
                if item is _EOF:
                    self._eof = True
                    break
                if item is _ABORT:
                    raise _Abort("upload aborted")
                self._pending = memoryview(item)  # type: ignore[arg-type]
            take = self._pending[: wanted - got]
            buffer.write(take)
            self._pending = self._pending[len(take):]
            got += len(take)
        return buffer.getvalue()


class StreamingUpload:
    """One object being written from an async stream of chunks."""

    def __init__(self, storage: "ObjectStorage", key: str, content_type: str) -> None:
        self._loop = asyncio.get_running_loop()
        self._feed: BoundedFeed[object] = BoundedFeed(QUEUE_CHUNKS)
        self._queue = self._feed.queue
        reader = _QueueReader(self._queue, self._loop)
        self._worker = self._loop.run_in_executor(
            storage.upload_executor,
            functools.partial(
                # minio only calls read() on its data argument
                storage.client.put_object, storage.bucket, key, cast(BinaryIO, reader), -1,
                content_type=content_type, part_size=PART_SIZE, num_parallel_uploads=1,
            ),
        )

    async def _offer(self, item: object) -> None:
        if not await self._feed.offer(item, self._worker):
            # The worker ended before taking the chunk: that is its failure to report.
            await self._result()
            raise StorageError("upload ended early")

    async def write(self, chunk: bytes) -> None:
        if chunk:
            await self._offer(chunk)

    async def finish(self) -> None:
        await self._offer(_EOF)
        await self._result()

    async def _result(self) -> None:
        try:
            await self._worker
        except S3Error as exc:
            raise StorageError(f"object store refused the upload: {exc.code}") from exc
        except Exception as exc:  # urllib3 and OS errors, an abort, or minio refusing the stream
            raise StorageError(f"object store upload failed: {type(exc).__name__}") from exc

    async def abort(self) -> None:
        """Stop the upload; minio aborts a multipart upload it had started. Never raises."""
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(_ABORT)
        with contextlib.suppress(BaseException):  # the outcome of an aborted upload does not matter
            await asyncio.wait_for(asyncio.shield(self._worker), 30)


class ObjectStorage:
    def __init__(self, settings: FilesSettings) -> None:
        self.bucket = settings.s3_bucket
        host, secure = settings.s3_address()
        self.client = Minio(
            host, settings.s3_access_key or None, settings.s3_secret_key or None,
            secure=secure, region=settings.s3_region, http_client=_http_client(settings.upload_threads + 8),
        )
        public_host, public_secure = settings.s3_address(public=True)
        # Signing is local arithmetic; with the region given, this client never makes a request.
        self.presigner = Minio(
            public_host, settings.s3_access_key or None, settings.s3_secret_key or None,
            secure=public_secure, region=settings.s3_region,
        )
        # Upload threads block for the life of an upload; keep them off the default pool that
        # short calls (stat, delete, download reads) use.
        self.upload_executor = ThreadPoolExecutor(settings.upload_threads, thread_name_prefix="s3-upload")
        self.io_executor = ThreadPoolExecutor(16, thread_name_prefix="s3-io")

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.io_executor, functools.partial(fn, *args, **kwargs))
        except S3Error as exc:
            if exc.code in _MISSING:
                raise ObjectMissing(exc.code) from exc
            raise StorageError(f"object store error: {exc.code}") from exc
        except (OSError, urllib3.exceptions.HTTPError) as exc:
            raise StorageError(f"object store unreachable: {type(exc).__name__}") from exc

    def close(self) -> None:
        self.upload_executor.shutdown(wait=False, cancel_futures=True)
        self.io_executor.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    def key_for(file_name: str) -> str:
        return OBJECT_PREFIX + file_name

    async def ensure_bucket(self) -> None:
        if not await self._call(self.client.bucket_exists, self.bucket):
            try:
                await self._call(self.client.make_bucket, self.bucket)
            except StorageError as exc:
                # Another replica made it between the two calls.
                if "BucketAlreadyOwnedByYou" not in str(exc) and "BucketAlreadyExists" not in str(exc):
                    raise

    async def ping(self) -> None:
        if not await self._call(self.client.bucket_exists, self.bucket):
            raise StorageError(f"bucket {self.bucket} does not exist")

    def start_upload(self, key: str, content_type: str) -> StreamingUpload:
        return StreamingUpload(self, key, content_type)

    async def remove(self, key: str) -> None:
        await self._call(self.client.remove_object, self.bucket, key)

    async def remove_quietly(self, key: str) -> bool:
        """Remove an object; a failure is logged and left for the orphan sweep."""
        try:
            await self.remove(key)
            return True
        except StorageError as exc:
            logger.warning("could not remove object %s: %s", key, exc)
            return False

    async def remove_many(self, keys: list[str]) -> None:
        if not keys:
            return

        def run() -> list[str]:
            errors = self.client.remove_objects(self.bucket, [DeleteObject(k) for k in keys])
            return [f"{e.name}: {e.code}" for e in errors]

        try:
            failed = await self._call(run)
        except StorageError as exc:
            logger.warning("could not remove %d objects: %s", len(keys), exc)
            return
        if failed:
            logger.warning("could not remove objects: %s", "; ".join(failed[:10]))

    async def open(self, key: str) -> AsyncIterator[bytes]:
        """The object's bytes in chunks. Raises ObjectMissing before the first chunk."""
        response = await self._call(self.client.get_object, self.bucket, key)

        async def chunks() -> AsyncIterator[bytes]:
            try:
                while True:
                    chunk = await self._call(response.read, DOWNLOAD_CHUNK)
                    if not chunk:
                        return
                    yield chunk
            finally:
                response.close()
                response.release_conn()

        return chunks()

    def presigned_get(self, key: str, expires_seconds: int) -> str:
        return self.presigner.presigned_get_object(self.bucket, key, expires=timedelta(seconds=expires_seconds))

    async def old_keys(self, older_than: datetime, batch: int = 500) -> AsyncIterator[list[str]]:
        """Keys under the service's prefix last written before ``older_than``, in batches."""
        listing: Iterator[Any] = iter(self.client.list_objects(self.bucket, prefix=OBJECT_PREFIX, recursive=True))

        def next_batch() -> list[Any]:
            return list(islice(listing, batch))

        while True:
            objects = await self._call(next_batch)
            if not objects:
                return
            keys = [
                o.object_name for o in objects
                if o.object_name and o.last_modified is not None and o.last_modified < older_than
            ]
            if keys:
                yield keys
