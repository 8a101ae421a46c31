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

# Printable only: PostgreSQL text cannot hold NUL, and ids have no business holding controls.
TurnId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TURN_ID_CHARS, pattern=r"^[^\x00-\x1f\x7f]+$")]


class File(contracts.StoredFile, kw_only=True):
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


# Request bodies refuse unknown fields (400 validation_error), like every service's. Neither
# takes an idempotency_key: attaching a file to the session it is attached to, or marking a
# used file used, answers the file as it is, so a repeat is harmless without one, and a key
# accepted and then ignored would only suggest a guarantee that is not there.
class Attach(msgspec.Struct, forbid_unknown_fields=True):
    user_id: uuid.UUID
    session_id: uuid.UUID


class MarkUsed(contracts.FileUse, kw_only=True, forbid_unknown_fields=True):
    user_id: uuid.UUID  # type: ignore[assignment]
    session_id: uuid.UUID  # type: ignore[assignment]
    turn_id: TurnId


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
