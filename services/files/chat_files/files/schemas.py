"""Request and reply bodies (msgspec). Bounds live here so bad input is a 400 before any work.
The bodies a chat turn exchanges with this service are those of ``chat_common.contracts``
(FileRecord, SignedUrl, FileUse), extended here with this service's further fields and bounds."""
from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

import msgspec

from chat_common import contracts

MAX_ORIGINAL_NAME_INPUT = 1024
MAX_TURN_ID_CHARS = 200
MAX_IDEMPOTENCY_KEY_CHARS = 200

# Printable only: PostgreSQL text cannot hold NUL, and ids have no business holding controls.
TurnId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TURN_ID_CHARS, pattern=r"^[^\x00-\x1f\x7f]+$")]
IdempotencyKey = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_IDEMPOTENCY_KEY_CHARS)]


class File(contracts.FileRecord, kw_only=True):
    file_name: str
    original_name: str
    user_id: uuid.UUID | None
    session_id: uuid.UUID | None  # type: ignore[assignment]
    content_type: str
    size: int
    sha256: str
    status: str
    created_at: datetime
    used_at: datetime | None = None
    turn_id: str | None = None


class Attach(msgspec.Struct):
    user_id: uuid.UUID
    session_id: uuid.UUID
    # Attaching is idempotent by itself; the key is accepted for the common contract.
    idempotency_key: IdempotencyKey | None = None


class MarkUsed(contracts.FileUse, kw_only=True):
    user_id: uuid.UUID  # type: ignore[assignment]
    session_id: uuid.UUID  # type: ignore[assignment]
    turn_id: TurnId
    idempotency_key: IdempotencyKey | None = None


class FileList(msgspec.Struct):
    items: list[File]


class PresignedUrl(contracts.SignedUrl, kw_only=True):
    expires_seconds: int


class Deleted(msgspec.Struct):
    deleted: int


class SweepResult(msgspec.Struct):
    stale_removed: int
    orphans_removed: int


class TypeCheck(msgspec.Struct):
    original_name: str
    extension: str
    content_type: str


class Usage(msgspec.Struct):
    user_id: uuid.UUID
    used_bytes: int
    quota_bytes: int
    files: int
