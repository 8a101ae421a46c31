"""The files domain: streaming uploads with their limits, ownership-scoped reads and deletes,
the lifecycle (staged -> attached -> used) and the sweep."""
from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import asyncpg

from chat_common.db import create_pool
from chat_common.errors import (
    BadRequestError,
    ConflictError,
    NotFoundError,
    PayloadTooLargeError,
    QuotaExceededError,
    ServiceUnavailableError,
)
from chat_files.files import content_types, schemas, sql
from chat_files.files.metrics import UPLOADED_BYTES, UPLOADED_FILES
from chat_files.files.models import ATTACHED, STAGED, USED
from chat_files.files.storage import ObjectMissing, ObjectStorage, StorageError
from chat_files.settings import MAX_PRESIGNED_SECONDS, FilesSettings

logger = logging.getLogger(__name__)

_FILE_NOT_FOUND = "file not found"


def _mb(size: int) -> str:
    return f"{size / (1024 * 1024):g} MB"


def _to_schema(row: asyncpg.Record) -> schemas.File:
    return schemas.File(
        file_name=row["file_name"],
        original_name=row["original_name"],
        user_id=row["user_id"],
        session_id=row["session_id"],
        content_type=row["content_type"],
        size=row["size"],
        sha256=row["sha256"],
        status=row["status"],
        created_at=row["created_at"],
        used_at=row["used_at"],
        turn_id=row["turn_id"],
    )


class _CountedStream:
    """The request body, counted and hashed as it passes; the size limit and the quota are
    enforced on every chunk, whatever Content-Length said."""

    def __init__(self, source: AsyncIterator[bytes], limit: int, quota_left: int | None) -> None:
        self._source = source
        self.limit = limit
        self.quota_left = quota_left
        self.size = 0
        self.sha256 = hashlib.sha256()
        self.exhausted = False

    def _count(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise PayloadTooLargeError(f"file is larger than the {_mb(self.limit)} limit")
        if self.quota_left is not None and self.size > self.quota_left:
            raise QuotaExceededError("storage quota exceeded: this file does not fit in what is left")
        self.sha256.update(chunk)

    async def next_chunk(self) -> bytes | None:
        while not self.exhausted:
            try:
                chunk = await self._source.__anext__()
            except StopAsyncIteration:
                self.exhausted = True
                return None
            if chunk:
                self._count(chunk)
                return chunk
        return None

    async def head(self, size: int) -> bytes:
        pieces: list[bytes] = []
        got = 0
        while got < size:
            chunk = await self.next_chunk()
            if chunk is None:
                break
            pieces.append(chunk)
            got += len(chunk)
        return b"".join(pieces)

    async def drain(self) -> None:
        """Read and drop the rest (at most up to the size limit), so that an error reply is
        read by a client that sends its whole body before it reads (httpx does)."""
        try:
            while not self.exhausted and self.size <= self.limit:
                chunk = await self._source.__anext__()
                self.size += len(chunk)
        except StopAsyncIteration:
            self.exhausted = True
        except Exception:  # noqa: S110 - a client gone while draining: nothing left to tell it
            pass


@dataclass
class FilesService:
    """File metadata on asyncpg (prebuilt statements in ``sql.py``, as in sessions), bytes in
    the object store. ``start``/``close`` are the app's lifespan."""

    database_url: str
    schema: str
    storage: ObjectStorage
    settings: FilesSettings
    pool: asyncpg.Pool | None = None

    async def start(self) -> None:
        if self.pool is None:
            self.pool = await create_pool(self.database_url, self.schema, max_size=20)  # checks the schema name

    async def close(self) -> None:
        if self.pool is not None:
            pool, self.pool = self.pool, None
            await pool.close()

    def _pool(self) -> asyncpg.Pool:
        if self.pool is None:
            raise RuntimeError("files service used before start()")
        return self.pool

    async def ping(self) -> None:
        await self._pool().fetchval(sql.PING)

    # ---------------------------------------------------------------- reads

    async def get(self, file_name: str, user_id: uuid.UUID | None) -> schemas.File:
        """``user_id`` None: the name is the capability (the gateway's link without a user);
        a staged file that has no owner yet is never served that way."""
        row = await self._pool().fetchrow(sql.GET, file_name)
        if row is None or row["user_id"] is None or (user_id is not None and row["user_id"] != user_id):
            raise NotFoundError(_FILE_NOT_FOUND)
        return _to_schema(row)

    async def open_content(self, file_name: str, user_id: uuid.UUID | None) -> tuple[schemas.File, AsyncIterator[bytes]]:
        meta = await self.get(file_name, user_id)
        try:
            chunks = await self.storage.open(ObjectStorage.key_for(file_name))
        except ObjectMissing as exc:
            raise NotFoundError(_FILE_NOT_FOUND) from exc
        except StorageError as exc:
            raise ServiceUnavailableError(str(exc)) from exc
        return meta, chunks

    async def presigned_url(self, file_name: str, user_id: uuid.UUID, expires_seconds: int | None) -> schemas.PresignedUrl:
        expires = self.settings.presigned_url_seconds if expires_seconds is None else expires_seconds
        if not 1 <= expires <= MAX_PRESIGNED_SECONDS:
            raise BadRequestError(f"expires_seconds must be between 1 and {MAX_PRESIGNED_SECONDS}")
        await self.get(file_name, user_id)
        url = self.storage.presigned_get(ObjectStorage.key_for(file_name), expires)
        return schemas.PresignedUrl(url=url, expires_seconds=expires)

    async def session_files(self, session_id: uuid.UUID, user_id: uuid.UUID) -> schemas.FileList:
        rows = await self._pool().fetch(sql.SESSION_FILES, session_id, user_id)
        return schemas.FileList(items=[_to_schema(r) for r in rows])

    async def usage(self, user_id: uuid.UUID) -> schemas.Usage:
        used, count = await self._usage(self._pool(), user_id)
        return schemas.Usage(user_id=user_id, used_bytes=used, quota_bytes=self.settings.user_quota_bytes, files=count)

    @staticmethod
    async def _usage(conn: asyncpg.Connection | asyncpg.Pool, user_id: uuid.UUID) -> tuple[int, int]:
        row = await conn.fetchrow(sql.USAGE, user_id)
        return int(row[0]), int(row[1])

    @staticmethod
    async def _lock_user(conn: asyncpg.Connection, user_id: uuid.UUID) -> None:
        # Serialises quota decisions of one user across requests and replicas.
        await conn.execute(sql.LOCK_USER, f"files-quota:{user_id}")

    # ---------------------------------------------------------------- uploads

    def check_type(self, original_name_raw: str, head: bytes, complete: bool) -> schemas.TypeCheck:
        original = content_types.sanitize_original_name(original_name_raw)
        ext = content_types.check_extension(original, self.settings.allowed_file_types)
        content_type = content_types.check_content(ext, head[: content_types.HEAD_BYTES], complete)
        return schemas.TypeCheck(original_name=original, extension=ext, content_type=content_type)

    async def check_quota(self, user_id: uuid.UUID, incoming: int = 0) -> int:
        """What is left of the user's quota; 413 when nothing (or not ``incoming``) fits."""
        used, _ = await self._usage(self._pool(), user_id)
        left = self.settings.user_quota_bytes - used
        if left <= 0 or incoming > left:
            raise QuotaExceededError(
                f"storage quota of {_mb(self.settings.user_quota_bytes)} exceeded ({_mb(max(used, 0))} used)"
            )
        return left

    async def upload(
        self,
        body: AsyncIterator[bytes],
        *,
        original_name: str,
        user_id: uuid.UUID | None,
        session_id: uuid.UUID | None,
        content_length: int | None,
    ) -> schemas.File:
        if session_id is not None and user_id is None:
            raise BadRequestError("session_id needs user_id")
        limit = self.settings.max_file_size_bytes
        if content_length is not None and content_length > limit:
            raise PayloadTooLargeError(f"file is larger than the {_mb(limit)} limit")
        stream = _CountedStream(body, limit, None)
        try:
            original = content_types.sanitize_original_name(original_name)
            ext = content_types.check_extension(original, self.settings.allowed_file_types)
            if user_id is not None:
                stream.quota_left = await self.check_quota(user_id, content_length or 0)
            head = await stream.head(content_types.HEAD_BYTES)
            content_type = content_types.check_content(ext, head, stream.exhausted)
        except PayloadTooLargeError:
            raise
        except Exception:
            await stream.drain()
            raise

        file_name = f"{uuid.uuid4().hex}.{ext}"
        key = ObjectStorage.key_for(file_name)
        upload = self.storage.start_upload(key, content_type)
        try:
            await upload.write(head)
            del head
            while (chunk := await stream.next_chunk()) is not None:
                await upload.write(chunk)
            await upload.finish()
        except BaseException as exc:
            await upload.abort()
            if isinstance(exc, StorageError):
                await stream.drain()
                raise ServiceUnavailableError(str(exc)) from exc
            if isinstance(exc, QuotaExceededError):
                await stream.drain()
            raise

        # The object is stored; now the row. Any failure from here removes the object again.
        try:
            stored = await self._insert(
                file_name=file_name,
                key=key,
                original=original,
                content_type=content_type,
                size=stream.size,
                sha256=stream.sha256.hexdigest(),
                user_id=user_id,
                session_id=session_id,
            )
        except BaseException:
            await asyncio.shield(self.storage.remove_quietly(key))
            raise
        UPLOADED_BYTES.inc(stream.size)
        UPLOADED_FILES.labels(content_type).inc()
        return stored

    async def _insert(
        self,
        *,
        file_name: str,
        key: str,
        original: str,
        content_type: str,
        size: int,
        sha256: str,
        user_id: uuid.UUID | None,
        session_id: uuid.UUID | None,
    ) -> schemas.File:
        now = datetime.now(timezone.utc)
        async with self._pool().acquire() as conn, conn.transaction():
            if user_id is not None:
                # Checked again under the lock: two uploads streaming at once each saw room.
                await self._lock_user(conn, user_id)
                used, _ = await self._usage(conn, user_id)
                if used + size > self.settings.user_quota_bytes:
                    raise QuotaExceededError(
                        f"storage quota of {_mb(self.settings.user_quota_bytes)} exceeded"
                    )
            row = await conn.fetchrow(
                sql.INSERT, file_name, user_id, session_id, original, content_type, size, sha256, key,
                ATTACHED if session_id is not None else STAGED, now, now if session_id is not None else None,
            )
        return _to_schema(row)

    # ---------------------------------------------------------------- lifecycle

    async def attach(self, file_name: str, data: schemas.Attach) -> schemas.File:
        """Give a staged file its session (and, for an upload staged before the form's user_id
        was read, its owner). Re-attaching to the same session returns the file unchanged."""
        over_quota: str | None = None
        async with self._pool().acquire() as conn, conn.transaction():
            await self._lock_user(conn, data.user_id)
            row = await conn.fetchrow(sql.GET_FOR_UPDATE, file_name)
            if row is None or (row["user_id"] is not None and row["user_id"] != data.user_id):
                raise NotFoundError(_FILE_NOT_FOUND)
            if row["session_id"] is not None:
                if row["session_id"] != data.session_id:
                    raise ConflictError("file is attached to another session")
                return _to_schema(row)
            if row["user_id"] is None:
                used, _ = await self._usage(conn, data.user_id)
                if used + row["size"] > self.settings.user_quota_bytes:
                    # Nobody owns it and it cannot be kept: remove it now rather than at the sweep.
                    await conn.execute(sql.DELETE_ROW, file_name)
                    over_quota = row["object_key"]
            if over_quota is None:
                status = ATTACHED if row["status"] == STAGED else row["status"]
                row = await conn.fetchrow(sql.ATTACH, file_name, data.user_id, data.session_id, status)
        if over_quota is not None:
            await self.storage.remove_quietly(over_quota)
            raise QuotaExceededError(f"storage quota of {_mb(self.settings.user_quota_bytes)} exceeded")
        return _to_schema(row)

    async def mark_used(self, file_name: str, data: schemas.MarkUsed) -> schemas.File:
        async with self._pool().acquire() as conn, conn.transaction():
            row = await conn.fetchrow(sql.GET_FOR_UPDATE, file_name)
            if row is None or row["user_id"] != data.user_id:
                raise NotFoundError(_FILE_NOT_FOUND)
            if row["session_id"] is not None and row["session_id"] != data.session_id:
                raise ConflictError("file is attached to another session")
            if row["status"] == USED:
                return _to_schema(row)
            row = await conn.fetchrow(sql.MARK_USED, file_name, data.session_id, data.turn_id)
        return _to_schema(row)

    async def delete(self, file_name: str, user_id: uuid.UUID | None) -> None:
        """Row first, then object: a crash in between leaves an orphan object for the sweep,
        never a row pointing at nothing."""
        key = await self._pool().fetchval(sql.DELETE_OWNED, file_name, user_id)
        if key is None:
            raise NotFoundError(_FILE_NOT_FOUND)
        await self.storage.remove_quietly(key)

    async def delete_session_files(self, session_id: uuid.UUID, user_id: uuid.UUID) -> schemas.Deleted:
        keys = [row[0] for row in await self._pool().fetch(sql.DELETE_SESSION_FILES, session_id, user_id)]
        await self.storage.remove_many(keys)
        return schemas.Deleted(deleted=len(keys))

    # ---------------------------------------------------------------- sweep

    async def sweep(self) -> schemas.SweepResult:
        return schemas.SweepResult(stale_removed=await self._sweep_stale(), orphans_removed=await self._sweep_orphans())

    async def _sweep_stale(self, batch: int = 500) -> int:
        """Uploads never attached, and files attached to a session no turn ever used, once
        they are older than STALE_UPLOAD_SECONDS."""
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=self.settings.stale_upload_seconds)
        removed = 0
        while True:
            keys = [row[0] for row in await self._pool().fetch(sql.SWEEP_STALE, cutoff, batch)]
            await self.storage.remove_many(keys)
            removed += len(keys)
            if len(keys) < batch:
                return removed

    async def _sweep_orphans(self) -> int:
        """Objects with no row: a crash between storing the bytes and writing the row. Only
        objects older than ORPHAN_GRACE_SECONDS, so an upload between its two writes is safe."""
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=self.settings.orphan_grace_seconds)
        removed = 0
        async for keys in self.storage.old_keys(cutoff):
            known = {row[0] for row in await self._pool().fetch(sql.KNOWN_KEYS, list(keys))}
            orphans = [k for k in keys if k not in known]
            if orphans:
                logger.info("removing %d orphan objects", len(orphans))
                await self.storage.remove_many(orphans)
                removed += len(orphans)
        return removed
