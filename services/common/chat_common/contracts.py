"""The typed internal contract: every request and reply body that crosses a service boundary on
a chat turn, in one place. Services decode their requests into these (their own schemas add
only validation bounds) and the gateway's clients decode replies into them, so a field renamed
on one side fails to type-check or to decode on the other instead of silently going missing.

Money is integer nano-dollars (1e-9 $) everywhere; ids travel as strings in canonical UUID form.
Unknown reply fields are ignored (a newer service may add some); request structs of the
services forbid them.
"""
from __future__ import annotations

from datetime import date, datetime
from typing import Any, Literal

import msgspec

# -- billing ------------------------------------------------------------------------------------


class ModelInfo(msgspec.Struct, kw_only=True):
    model_id: int
    name: str
    provider: str = ""
    context_length: int = 0
    input_price_nanos_per_1k: int = 0
    output_price_nanos_per_1k: int = 0


class ReserveRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Hold a turn's estimated cost. Idempotent on ``turn_id``: the same turn reserved twice
    gets the first hold back. ``ttl_seconds`` is the hold's lease; a live turn renews it
    (``LeaseRequest``) and a dead one's money comes back when it runs out. ``session_id``: the
    turn's session (checked against a per-session limit, and its spend counted to it)."""

    user_id: str
    input_tokens: int
    output_tokens: int
    turn_id: str
    idempotency_key: str
    model_id: int | None = None
    model_name: str | None = None
    ttl_seconds: int | None = None
    session_id: str | None = None
    # balance-aware turns (docs/limits-and-usage.md): the fewest output tokens worth a turn; where
    # the user or model is balance-aware, a reserve the balance or a limit refuses is made smaller,
    # down to this many output tokens. None: never made smaller.
    min_output_tokens: int | None = None


class Reservation(msgspec.Struct, kw_only=True):
    reservation_id: str
    user_id: str
    model: ModelInfo
    amount_nanos: int
    status: str
    balance_nanos: int
    turn_id: str | None = None
    cost_nanos: int | None = None
    charged_nanos: int = 0
    shortfall_nanos: int = 0
    # set when the hold was made smaller than asked (balance-aware): ask the AI for at most this
    # many output tokens; the settle takes no more than ``amount_nanos``
    max_output_tokens: int | None = None


class ReceiptDetails(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What a charged call saw, for its receipt (billing stores it with the charge, in the same
    transaction): tokens as the AI service reported them (0 when it reports none), the window's
    first and last entry seq (None: an empty window), the summary's extent, and the SHA-256 of
    the session prompt. For a summary fold: the entries folded (first_seq..last_seq) and the
    extent it reached (summarized_upto)."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    first_seq: int | None = None
    last_seq: int | None = None
    summarized_upto: int | None = None
    prompt_sha256: str | None = None


class SettleRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Charge a turn's actual cost against its hold, exactly once per reservation (a repeat, or
    a settle of a reservation already settled, charges nothing more)."""

    cost_nanos: int
    idempotency_key: str
    user_id: str
    turn_id: str | None = None
    receipt: ReceiptDetails | None = None


class ReleaseRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    idempotency_key: str
    user_id: str


class LeaseRequest(msgspec.Struct, kw_only=True):
    """Push an open hold's expiry to now + ``ttl_seconds`` (a live turn's heartbeat)."""

    user_id: str
    ttl_seconds: int


ChargeKind = Literal["turn", "summary"]


class Charge(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One owed charge, as the sessions outbox recorded it beside the stored turn or summary.

    ``key`` makes it exactly-once in billing: ``turn:{turn_id}`` settles the turn's
    reservation, ``summary:{session_id}:{summarized_upto}`` is a debit of its own ledger line.
    """

    key: str
    kind: ChargeKind
    user_id: str
    session_id: str
    turn_id: str
    cost_nanos: int
    reservation_id: str | None = None
    model_name: str | None = None
    receipt: ReceiptDetails | None = None


class ChargeBatch(msgspec.Struct, kw_only=True):
    items: list[Charge]


ChargeStatus = Literal["charged", "already", "refused"]


class ChargeResult(msgspec.Struct, kw_only=True):
    key: str
    status: ChargeStatus
    charged_nanos: int = 0
    shortfall_nanos: int = 0
    message: str = ""


class ChargeBatchResult(msgspec.Struct, kw_only=True):
    results: list[ChargeResult]


class Balance(msgspec.Struct, kw_only=True):
    user_id: str
    balance_nanos: int
    balance: float


class User(msgspec.Struct, kw_only=True):
    user_id: str
    username: str
    balance_nanos: int = 0


class ModelList(msgspec.Struct, kw_only=True):
    """``GET /v1/users/{id}/models``: the models the user is entitled to (active ones)."""

    models: list[ModelInfo]


# -- sessions -----------------------------------------------------------------------------------

Role = Literal["user", "assistant", "file"]


class EntryIn(msgspec.Struct, kw_only=True):
    role: Role
    content: str


class OwedCharge(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What a stored turn (or summary) owes billing; written in the same transaction."""

    cost_nanos: int
    reservation_id: str | None = None
    model_name: str | None = None
    # for the receipt; the sessions outbox keeps it with the charge (its migration 0007) and
    # hands it back in the listing, so a charge replayed from there gets the same receipt
    receipt: ReceiptDetails | None = None


class TurnAppend(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Append one turn's entries. Idempotent on ``turn_id``. ``expected_entry_count`` fences
    it: the append is refused (409 ``stale_turn``) unless the session still has exactly the
    entries the turn saw, so two turns that both believed they held the lock can never both be
    stored, nor in the wrong order. ``charge`` goes to the outbox with the entries."""

    user_id: str
    turn_id: str
    entries: list[EntryIn]
    expected_entry_count: int | None = None
    prompt: str | None = None
    model_name: str | None = None
    charge: OwedCharge | None = None


class TurnResult(msgspec.Struct, kw_only=True):
    session_id: str
    turn_id: str
    first_seq: int
    count: int
    entry_count: int
    created: bool


class SessionCreate(msgspec.Struct, kw_only=True, omit_defaults=True):
    user_id: str
    name: str
    model_name: str
    prompt: str = ""
    session_id: str | None = None
    idempotency_key: str | None = None


class Session(msgspec.Struct, kw_only=True):
    session_id: str
    user_id: str
    session_name: str
    model_name: str = ""
    prompt: str = ""
    summary: str = ""
    # the first ``summarized_upto`` entries of the session are folded into ``summary``
    summarized_upto: int = 0
    entry_count: int = 0


class Entry(msgspec.Struct, kw_only=True):
    seq: int
    role: str
    content: str
    turn_id: str | None = None


class EntryList(msgspec.Struct, kw_only=True):
    items: list[Entry]


class SessionPage(msgspec.Struct, kw_only=True):
    """``GET /v1/sessions``: one page of a user's sessions, newest first."""

    items: list[Session]
    total: int
    limit: int
    offset: int


class SessionContext(msgspec.Struct, kw_only=True):
    session: Session
    entries: list[Entry] = []


class SummaryUpdate(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Store a fold. Monotonic: an older ``summarized_upto`` than the stored one is ignored.
    ``charge`` (its cost) goes to the outbox under ``summary:{session_id}:{summarized_upto}``."""

    user_id: str
    summary: str
    summarized_upto: int
    turn_id: str
    charge: OwedCharge | None = None


class SearchHit(msgspec.Struct, kw_only=True):
    """One entry matching a search (``GET /v1/search``); ``snippet`` is plain text around the
    matching words."""

    session_id: str
    session_name: str
    seq: int
    role: str
    snippet: str
    created_at: str


class SearchResult(msgspec.Struct, kw_only=True):
    items: list[SearchHit]


class ExpireRequest(msgspec.Struct, kw_only=True):
    """``POST /v1/retention/expire``: remove up to ``limit`` sessions idle for longer than
    ``older_than_seconds`` (each exactly once across callers)."""

    older_than_seconds: float
    limit: int = 100


class ExpiredSession(msgspec.Struct, kw_only=True):
    session_id: str
    user_id: str


class ExpiredPage(msgspec.Struct, kw_only=True):
    items: list[ExpiredSession]


class ExpiredAck(msgspec.Struct, kw_only=True):
    """``POST /v1/retention/ack``: these removed sessions' files are gone."""

    session_ids: list[str]


class OutboxItem(msgspec.Struct, kw_only=True):
    outbox_id: int
    charge: Charge


class OutboxPage(msgspec.Struct, kw_only=True):
    items: list[OutboxItem]


class OutboxAck(msgspec.Struct, kw_only=True):
    """``POST /v1/outbox/ack``: delete these rows (idempotent; unknown ids are ignored)."""

    outbox_ids: list[int]


class OutboxAcked(msgspec.Struct, kw_only=True):
    acked: int


# -- files --------------------------------------------------------------------------------------


class FileRecord(msgspec.Struct, kw_only=True):
    file_name: str
    session_id: str | None = None
    status: str = ""


class StoredFile(FileRecord, kw_only=True):
    """A file as the files service holds it: ``POST /v1/uploads`` and ``.../attach`` answer this."""

    original_name: str
    content_type: str
    size: int
    sha256: str


class SignedUrl(msgspec.Struct, kw_only=True):
    url: str


class FileUse(msgspec.Struct, kw_only=True):
    user_id: str
    session_id: str
    turn_id: str


# -- per-user administration: export, import, erase (chat-admin export-user / import-user /
# erase-user; the gateway owns the cross-service work, each service its own rows) -------------

EXPORT_FORMAT = "chat-backend-user-export"
EXPORT_VERSION = 1


class Removed(msgspec.Struct, kw_only=True):
    """What one service's erase removed: rows per ``schema.table``, and objects (files)."""

    removed: dict[str, int] = {}
    objects: int = 0
    pseudonymized: dict[str, int] = {}


class ExportedEntry(msgspec.Struct, kw_only=True):
    seq: int
    role: str
    content: str
    turn_id: str
    created_at: datetime


class ExportedTurn(msgspec.Struct, kw_only=True):
    turn_id: str
    first_seq: int
    count: int
    created_at: datetime


class ExportedSession(msgspec.Struct, kw_only=True):
    session_id: str
    session_name: str
    model_name: str
    prompt: str
    summary: str
    summarized_upto: int
    summary_turn_id: str | None = None
    entry_count: int
    idempotency_key: str | None = None
    created_at: datetime
    updated_at: datetime
    entries: list[ExportedEntry] = []
    turns: list[ExportedTurn] = []


class SessionsExport(msgspec.Struct, kw_only=True):
    """``GET /v1/admin/users/{id}/export`` of the sessions service; ``POST .../import`` takes
    the same shape (the user id of the path owns every session)."""

    sessions: list[ExportedSession] = []


class SessionKeys(msgspec.Struct, kw_only=True):
    """``GET /v1/admin/users/{id}/keys``: the ids that name the user's data elsewhere (Redis),
    and the charges the user's stored turns and summaries still owe (the outbox), which an
    erase books before the user goes."""

    session_ids: list[str] = []
    turn_ids: list[str] = []
    owed: list[Charge] = []


class ImportedCount(msgspec.Struct, kw_only=True):
    imported: dict[str, int] = {}


class ErasureStep(msgspec.Struct, kw_only=True):
    """One step of an erase done: what it removed (kept in the progress record)."""

    step: str
    removed: Removed


class Erasure(msgspec.Struct, kw_only=True):
    """The durable progress record of an erase, keyed by ``subject`` (an HMAC of the user id
    with the gateway's secret: the record itself never names the user)."""

    subject: str
    started_at: datetime
    finished_at: datetime | None = None
    runs: int = 1
    steps: dict[str, Removed] = {}


class ExportedFile(msgspec.Struct, kw_only=True):
    file_name: str
    session_id: str | None = None
    original_name: str
    content_type: str
    size: int
    sha256: str
    status: str
    turn_id: str | None = None
    created_at: datetime
    attached_at: datetime | None = None
    used_at: datetime | None = None
    # the bytes, base64 (standard alphabet, padded)
    content_base64: str = ""


class FilesExport(msgspec.Struct, kw_only=True):
    files: list[ExportedFile] = []


class ExportedLedgerRow(msgspec.Struct, kw_only=True):
    kind: str
    amount_nanos: int
    balance_after_nanos: int
    model_id: int | None = None
    turn_id: str | None = None
    reservation_id: str | None = None
    idempotency_key: str | None = None
    reason: str | None = None
    charged_nanos: int | None = None
    shortfall_nanos: int = 0
    details: dict[str, Any] | None = None
    charge_key: str | None = None
    created_at: datetime


class ExportedReceipt(msgspec.Struct, kw_only=True):
    key: str
    kind: str
    turn_id: str
    session_id: str | None = None
    model_id: int | None = None
    model_name: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    first_seq: int | None = None
    last_seq: int | None = None
    summarized_upto: int | None = None
    prompt_sha256: str | None = None
    cost_nanos: int
    charged_nanos: int
    shortfall_nanos: int = 0
    reservation_id: str | None = None
    created_at: datetime


class ExportedLimits(msgspec.Struct, kw_only=True):
    daily_nanos: int | None = None
    monthly_nanos: int | None = None
    per_session_nanos: int | None = None
    updated_at: datetime


class ExportedSpend(msgspec.Struct, kw_only=True):
    """A running spend sum: per UTC day (``day``) or per session (``session_id``)."""

    spent_nanos: int
    day: date | None = None
    session_id: str | None = None


class ExportedUser(msgspec.Struct, kw_only=True):
    user_id: str
    username: str
    balance_nanos: int
    models: list[int] = []
    created_at: datetime


class BillingExport(msgspec.Struct, kw_only=True):
    """``GET /v1/admin/users/{id}/export`` of billing; ``POST /v1/admin/users/import`` takes it."""

    user: ExportedUser
    ledger: list[ExportedLedgerRow] = []
    receipts: list[ExportedReceipt] = []
    limits: ExportedLimits | None = None
    daily_spend: list[ExportedSpend] = []
    session_spend: list[ExportedSpend] = []
    # the user's own balance-aware setting (None: none, the model's counts)
    balance_aware: bool | None = None


class BillingErase(msgspec.Struct, kw_only=True):
    """``POST /v1/admin/users/{id}/erase`` of billing: the ledger rows move to ``pseudonym``."""

    pseudonym: str


class UserExport(msgspec.Struct, kw_only=True):
    """The whole file ``chat-admin export-user`` writes and ``import-user`` reads."""

    format: str = EXPORT_FORMAT
    version: int = EXPORT_VERSION
    exported_at: datetime
    user_id: str
    billing: BillingExport
    sessions: list[ExportedSession] = []
    files: list[ExportedFile] = []


class EraseReport(msgspec.Struct, kw_only=True):
    """What ``POST /v1/admin/users/{id}/erase`` of the gateway did in this run, per store."""

    user_id: str
    pseudonym: str
    # a run before this one stopped midway (``resumed``) or had finished (``finished_before``);
    # ``steps_before``: the steps it had recorded as done (every step runs again regardless)
    resumed: bool
    finished_before: bool
    steps_before: list[str] = []
    postgres: dict[str, int]
    pseudonymized: dict[str, int]
    redis_keys: int
    objects: int
    # owed charges of the user's outbox handed to billing before the user went (by status)
    owed_charges: dict[str, int] = {}


class ImportReport(msgspec.Struct, kw_only=True):
    user_id: str
    imported: dict[str, int]
