"""Request and reply bodies. Size limits live here so that Litestar rejects oversize input with
a 400 before any of it reaches the database. The replies a chat turn reads are the structs of
``chat_common.contracts``, extended here (ids as UUIDs, timestamps), not declared twice.
Request bodies refuse unknown fields (400 ``validation_error``), nested ones included: every
field a caller's contract struct sends is declared here (tests/foundation/test_one_answer.py)."""
from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

import msgspec

from chat_common import contracts

MAX_NAME_CHARS = 200
MAX_PROMPT_CHARS = 100_000
MAX_SUMMARY_CHARS = 100_000
MAX_CONTENT_BYTES = 1024 * 1024
MAX_ENTRIES_PER_TURN = 100
MAX_IDEMPOTENCY_KEY_CHARS = 200
DEFAULT_PAGE_LIMIT = 50
MAX_PAGE_LIMIT = 500
DEFAULT_CONTEXT_WINDOW = 10
# PostgreSQL integer columns; larger numbers would overflow in the driver, not fail cleanly.
MAX_INT4 = 2**31 - 1
MAX_INT8 = 2**63 - 1
DEFAULT_OUTBOX_LIMIT = 200
MAX_OUTBOX_LIMIT = 500
MAX_OUTBOX_ACK = 1000
DEFAULT_SEARCH_LIMIT = 20
MAX_SEARCH_LIMIT = 100
# Longer queries are cut (a search needs no more words than this; the gateway allows a message's length).
MAX_SEARCH_QUERY_CHARS = 32_000

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_CHARS)]
Prompt = Annotated[str, msgspec.Meta(max_length=MAX_PROMPT_CHARS)]
Summary = Annotated[str, msgspec.Meta(max_length=MAX_SUMMARY_CHARS)]
# Characters bound here; the byte bound (1 MiB of UTF-8) is checked by the service.
Content = Annotated[str, msgspec.Meta(max_length=MAX_CONTENT_BYTES)]
IdempotencyKey = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_IDEMPOTENCY_KEY_CHARS)]
Role = Literal["user", "assistant", "file"]


class SessionCreate(msgspec.Struct, forbid_unknown_fields=True):
    user_id: uuid.UUID
    name: Name
    model_name: Name
    prompt: Prompt = ""
    session_id: uuid.UUID | None = None
    idempotency_key: IdempotencyKey | None = None


class EntryIn(msgspec.Struct, forbid_unknown_fields=True):
    role: Role
    content: Content


Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT8)]
Seq = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT4)]


class Receipt(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    """``contracts.ReceiptDetails`` with bounds: kept with the owed charge (migration 0007) and
    handed back with it, so a charge replayed from the outbox gets a complete receipt."""

    input_tokens: Count | None = None
    output_tokens: Count | None = None
    first_seq: Seq | None = None
    last_seq: Seq | None = None
    summarized_upto: Seq | None = None
    prompt_sha256: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")] | None = None


class OwedCharge(msgspec.Struct, forbid_unknown_fields=True):
    """What the stored turn (or summary) owes billing; goes to the outbox in its transaction."""

    cost_nanos: Annotated[int, msgspec.Meta(ge=0, le=MAX_INT8)]
    reservation_id: IdempotencyKey | None = None
    model_name: Name | None = None
    receipt: Receipt | None = None


class TurnAppend(msgspec.Struct, forbid_unknown_fields=True):
    user_id: uuid.UUID
    turn_id: uuid.UUID
    entries: Annotated[list[EntryIn], msgspec.Meta(min_length=1, max_length=MAX_ENTRIES_PER_TURN)]
    # The fence: refused (409 stale_turn) unless the session has exactly this many entries.
    expected_entry_count: Annotated[int, msgspec.Meta(ge=0, le=MAX_INT4)] | None = None
    prompt: Prompt | None = None
    model_name: Name | None = None
    charge: OwedCharge | None = None


class SummaryUpdate(msgspec.Struct, forbid_unknown_fields=True):
    user_id: uuid.UUID
    summary: Summary
    summarized_upto: Annotated[int, msgspec.Meta(ge=0, le=MAX_INT4)]
    turn_id: uuid.UUID
    charge: OwedCharge | None = None


class Session(contracts.Session, kw_only=True):
    session_id: uuid.UUID  # type: ignore[assignment]
    user_id: uuid.UUID  # type: ignore[assignment]
    session_name: str
    model_name: str
    prompt: str
    summary: str
    summarized_upto: int
    entry_count: int
    created_at: datetime
    updated_at: datetime


class SessionPage(msgspec.Struct):
    items: list[Session]
    total: int
    limit: int
    offset: int


class Entry(contracts.Entry, kw_only=True):
    seq: int
    role: str
    content: str
    turn_id: uuid.UUID  # type: ignore[assignment]
    created_at: datetime


class EntryList(contracts.EntryList, kw_only=True):
    items: list[Entry]  # type: ignore[assignment]


class SessionContext(contracts.SessionContext, kw_only=True):
    session: Session
    entries: list[Entry]  # type: ignore[assignment]


class TurnResult(contracts.TurnResult, kw_only=True):
    session_id: uuid.UUID  # type: ignore[assignment]
    turn_id: uuid.UUID  # type: ignore[assignment]
    first_seq: int
    # Entries this turn added (or added the first time, on a replay).
    count: int
    # The session's entry count right after this turn (also on a replay): first_seq + count.
    entry_count: int
    created: bool


class Charge(contracts.Charge, kw_only=True, omit_defaults=True):
    key: str
    kind: str  # type: ignore[assignment]
    user_id: uuid.UUID  # type: ignore[assignment]
    session_id: uuid.UUID  # type: ignore[assignment]
    turn_id: uuid.UUID  # type: ignore[assignment]
    cost_nanos: int
    reservation_id: str | None = None
    model_name: str | None = None


class OutboxItem(contracts.OutboxItem, kw_only=True):
    outbox_id: int
    charge: Charge


class OutboxPage(contracts.OutboxPage, kw_only=True):
    items: list[OutboxItem]  # type: ignore[assignment]


class OutboxAck(msgspec.Struct, forbid_unknown_fields=True):
    outbox_ids: Annotated[list[Annotated[int, msgspec.Meta(ge=1, le=MAX_INT8)]], msgspec.Meta(max_length=MAX_OUTBOX_ACK)]


class OutboxAcked(contracts.OutboxAcked, kw_only=True):
    pass


class SearchHit(msgspec.Struct):
    session_id: uuid.UUID
    session_name: str
    seq: int
    role: str
    # plain text: a fragment or two of the entry around the matching words
    snippet: str
    created_at: datetime


class SearchResult(msgspec.Struct):
    items: list[SearchHit]


MAX_RETENTION_BATCH = 500


class ExpireRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Remove sessions idle for longer than ``older_than_seconds`` (at most ``limit``)."""

    older_than_seconds: Annotated[float, msgspec.Meta(ge=0, le=10**11)]
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_RETENTION_BATCH)] = 100


class ExpiredSession(msgspec.Struct):
    session_id: uuid.UUID
    user_id: uuid.UUID


class ExpiredPage(msgspec.Struct):
    items: list[ExpiredSession]


class ExpiredAck(msgspec.Struct, forbid_unknown_fields=True):
    session_ids: Annotated[list[uuid.UUID], msgspec.Meta(max_length=MAX_OUTBOX_ACK)]


class ExpiredAcked(msgspec.Struct):
    acked: int
