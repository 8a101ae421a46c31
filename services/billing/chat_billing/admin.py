"""Per-user administration of billing: export a user with its ledger, receipts, limits and spend;
import it into a system that does not know the user; erase it (every row naming the user goes,
the ledger stays under a pseudonymous id: migration 0007). The gateway runs these for
``chat-admin export-user``, ``import-user`` and ``erase-user``."""
from __future__ import annotations

import uuid
from typing import Any

import msgspec
from litestar import Controller, Request, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath

from chat_billing.pg import Pg
from chat_billing.users.services import require_known_models
from chat_common import contracts as c
from chat_common.db import delete_naming, refresh_statistics, tables_with_columns
from chat_common.errors import (
    BadRequestError,
    ConflictError,
    NotFoundError,
    ValidationError,
    parse_uuid,
)

# A ledger of many years goes in one body.
MAX_IMPORT_BYTES = 512 * 1024 * 1024

USER = (
    "SELECT u.id::text, u.username, u.balance_nanos, u.created_at,"
    " coalesce((SELECT array_agg(e.model_id ORDER BY e.model_id) FROM entitlements e WHERE e.user_id = u.id),"
    " '{}'::integer[]) FROM users u WHERE u.id = $1"
)
LEDGER = (
    "SELECT kind, amount_nanos, balance_after_nanos, model_id, turn_id, reservation_id::text, idempotency_key, reason,"
    " charged_nanos, shortfall_nanos, details::text, charge_key, created_at FROM ledger WHERE user_id = $1 ORDER BY id"
)
RECEIPTS = (
    "SELECT key, kind, turn_id, session_id, model_id, model_name, input_tokens, output_tokens, first_seq, last_seq,"
    " summarized_upto, prompt_sha256, cost_nanos, charged_nanos, shortfall_nanos, reservation_id::text, created_at"
    " FROM receipts WHERE user_id = $1 ORDER BY created_at, key"
)
LIMITS = "SELECT daily_nanos, monthly_nanos, per_session_nanos, updated_at FROM limits WHERE user_id = $1"
DAILY = "SELECT day, spent_nanos FROM daily_spend WHERE user_id = $1 ORDER BY day"
SESSION_SPEND = "SELECT session_id, spent_nanos FROM session_spend WHERE user_id = $1 ORDER BY session_id"
BALANCE_AWARE = "SELECT enabled FROM balance_aware_users WHERE user_id = $1"
INSERT_BALANCE_AWARE = "INSERT INTO balance_aware_users (user_id, enabled) VALUES ($1, $2)"

INSERT_USER = "INSERT INTO users (id, username, balance_nanos, created_at) VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING RETURNING id"
INSERT_ENTITLEMENTS = "INSERT INTO entitlements (user_id, model_id) SELECT $1, unnest($2::integer[])"
INSERT_LEDGER = (
    "INSERT INTO ledger (user_id, kind, amount_nanos, balance_after_nanos, model_id, turn_id, reservation_id,"
    " idempotency_key, reason, charged_nanos, shortfall_nanos, details, charge_key, created_at)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12::jsonb, $13, $14)"
)
INSERT_RECEIPT = (
    "INSERT INTO receipts (key, kind, turn_id, user_id, session_id, model_id, model_name, input_tokens, output_tokens,"
    " first_seq, last_seq, summarized_upto, prompt_sha256, cost_nanos, charged_nanos, shortfall_nanos, reservation_id,"
    " created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)"
)
INSERT_LIMITS = (
    "INSERT INTO limits (user_id, daily_nanos, monthly_nanos, per_session_nanos, updated_at) VALUES ($1, $2, $3, $4, $5)"
)
INSERT_DAILY = "INSERT INTO daily_spend (user_id, day, spent_nanos) VALUES ($1, $2, $3)"
INSERT_SESSION_SPEND = "INSERT INTO session_spend (session_id, user_id, spent_nanos) VALUES ($1, $2, $3)"

# Tables whose rows name the user and go in this order (then any other table with a user_id
# column a later migration adds), then the user; the ledger is moved, never deleted.
ERASE_FIRST = ("entitlements", "limits", "daily_spend", "session_spend", "receipts", "reservations")
PSEUDONYMIZE = "UPDATE ledger SET user_id = $2 WHERE user_id = $1"
ERASE_IDEMPOTENCY = "DELETE FROM idempotency WHERE strpos(coalesce(response, ''), $1) > 0 OR strpos(key, $1) > 0"

_details = msgspec.json.Decoder(dict[str, Any])
class BillingImport(c.BillingExport, kw_only=True, forbid_unknown_fields=True):
    """The import body: an export, refusing fields an export does not have (like every request
    body of billing); the rows inside are the export format's."""


class BillingEraseIn(c.BillingErase, kw_only=True, forbid_unknown_fields=True):
    pass


_import = msgspec.json.Decoder(BillingImport)
_erase = msgspec.json.Decoder(BillingEraseIn)


def _body_error(what: str, exc: msgspec.DecodeError) -> BadRequestError:
    """Malformed JSON is ``bad_request``; JSON of the wrong shape (an unknown field, a missing
    one) ``validation_error``, as Litestar answers for the bodies it decodes itself."""
    if isinstance(exc, msgspec.ValidationError):
        return ValidationError(f"{what}: {exc}", details=[{"message": str(exc), "key": "data", "source": "body"}])
    return BadRequestError(f"{what}: {exc}")


def _count(status: str) -> int:
    return int(status.rsplit(" ", 1)[1])


class BillingAdmin:
    def __init__(self, pg: Pg) -> None:
        self.pg = pg

    async def export(self, user_id: uuid.UUID) -> c.BillingExport:
        async with self.pg.pool.acquire() as connection, connection.transaction(isolation="repeatable_read", readonly=True):
            user = await connection.fetchrow(USER, user_id)
            if user is None:
                raise NotFoundError("user not found")
            ledger = await connection.fetch(LEDGER, user_id)
            receipts = await connection.fetch(RECEIPTS, user_id)
            limits = await connection.fetchrow(LIMITS, user_id)
            daily = await connection.fetch(DAILY, user_id)
            per_session = await connection.fetch(SESSION_SPEND, user_id)
            balance_aware = await connection.fetchval(BALANCE_AWARE, user_id)
        return c.BillingExport(
            user=c.ExportedUser(user_id=user[0], username=user[1], balance_nanos=user[2], created_at=user[3], models=list(user[4])),
            ledger=[
                c.ExportedLedgerRow(
                    kind=r[0], amount_nanos=r[1], balance_after_nanos=r[2], model_id=r[3], turn_id=r[4], reservation_id=r[5],
                    idempotency_key=r[6], reason=r[7], charged_nanos=r[8], shortfall_nanos=r[9],
                    details=None if r[10] is None else _details.decode(r[10]), charge_key=r[11], created_at=r[12],
                )
                for r in ledger
            ],
            receipts=[
                c.ExportedReceipt(
                    key=r[0], kind=r[1], turn_id=r[2], session_id=r[3], model_id=r[4], model_name=r[5], input_tokens=r[6],
                    output_tokens=r[7], first_seq=r[8], last_seq=r[9], summarized_upto=r[10], prompt_sha256=r[11],
                    cost_nanos=r[12], charged_nanos=r[13], shortfall_nanos=r[14], reservation_id=r[15], created_at=r[16],
                )
                for r in receipts
            ],
            limits=None if limits is None else c.ExportedLimits(
                daily_nanos=limits[0], monthly_nanos=limits[1], per_session_nanos=limits[2], updated_at=limits[3]
            ),
            daily_spend=[c.ExportedSpend(day=r[0], spent_nanos=r[1]) for r in daily],
            session_spend=[c.ExportedSpend(session_id=r[0], spent_nanos=r[1]) for r in per_session],
            balance_aware=balance_aware,
        )

    async def import_(self, data: c.BillingExport) -> c.ImportedCount:
        """All or nothing, in one transaction; a user id this billing already has is refused (409)."""
        user = data.user
        user_id = parse_uuid(user.user_id, "user.user_id")
        if data.ledger and sum(r.amount_nanos for r in data.ledger) != user.balance_nanos:
            raise BadRequestError("the ledger does not add up to the balance")
        async with self.pg.pool.acquire() as connection, connection.transaction():
            await require_known_models(connection, user.models)
            if await connection.fetchval(INSERT_USER, user_id, user.username, user.balance_nanos, user.created_at) is None:
                raise ConflictError("user already exists", details={"user_id": str(user_id)})
            if user.models:
                await connection.execute(INSERT_ENTITLEMENTS, user_id, sorted(set(user.models)))
            await connection.executemany(
                INSERT_LEDGER,
                [
                    (user_id, r.kind, r.amount_nanos, r.balance_after_nanos, r.model_id, r.turn_id, r.reservation_id,
                     r.idempotency_key, r.reason, r.charged_nanos, r.shortfall_nanos,
                     None if r.details is None else msgspec.json.encode(r.details).decode(), r.charge_key, r.created_at)
                    for r in data.ledger
                ],
            )
            await connection.executemany(
                INSERT_RECEIPT,
                [
                    (r.key, r.kind, r.turn_id, user_id, r.session_id, r.model_id, r.model_name, r.input_tokens,
                     r.output_tokens, r.first_seq, r.last_seq, r.summarized_upto, r.prompt_sha256, r.cost_nanos,
                     r.charged_nanos, r.shortfall_nanos, r.reservation_id, r.created_at)
                    for r in data.receipts
                ],
            )
            if data.limits is not None:
                lim = data.limits
                await connection.execute(
                    INSERT_LIMITS, user_id, lim.daily_nanos, lim.monthly_nanos, lim.per_session_nanos, lim.updated_at
                )
            await connection.executemany(INSERT_DAILY, [(user_id, s.day, s.spent_nanos) for s in data.daily_spend if s.day])
            await connection.executemany(
                INSERT_SESSION_SPEND, [(s.session_id, user_id, s.spent_nanos) for s in data.session_spend if s.session_id]
            )
            if data.balance_aware is not None:
                await connection.execute(INSERT_BALANCE_AWARE, user_id, data.balance_aware)
        return c.ImportedCount(imported={
            "users": 1, "ledger": len(data.ledger), "receipts": len(data.receipts),
            "limits": int(data.limits is not None), "daily_spend": len(data.daily_spend),
            "session_spend": len(data.session_spend),
        })

    async def erase(self, user_id: uuid.UUID, pseudonym: uuid.UUID) -> c.Removed:
        """One transaction: every row naming the user goes (entitlements, limits, spend, receipts,
        reservations, idempotency replies that mention the user, any later table with a user_id
        column), then the user; the ledger rows move to ``pseudonym``. Repeating it changes
        nothing more."""
        if pseudonym == user_id:
            raise BadRequestError("the pseudonym must differ from the user id")
        schema = self.pg.schema
        removed: dict[str, int] = {}
        async with self.pg.pool.acquire() as connection, connection.transaction():
            if await connection.fetchval("SELECT 1 FROM users WHERE id = $1", pseudonym):
                raise ConflictError("the pseudonym is a user's id")
            await connection.execute("SELECT set_config('billing.pseudonym', $1, true)", str(pseudonym))
            # the user's row first: every reserve, settle and charge of the user waits for it
            await connection.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user_id)
            tables = await tables_with_columns(connection, schema)
            order = [t for t in ERASE_FIRST if t in tables] + sorted(
                t for t, cols in tables.items()
                if "user_id" in cols and t not in ERASE_FIRST and t not in ("users", "ledger")
            )
            for table in order:
                removed[f"{schema}.{table}"] = await delete_naming(connection, table, user_id=str(user_id))
            removed[f"{schema}.idempotency"] = _count(await connection.execute(ERASE_IDEMPOTENCY, str(user_id)))
            removed[f"{schema}.users"] = _count(await connection.execute("DELETE FROM users WHERE id = $1", user_id))
            moved = _count(await connection.execute(PSEUDONYMIZE, user_id, pseudonym))
            changed = [key.split(".", 1)[1] for key, n in removed.items() if n] + (["ledger"] if moved else [])
            if changed:
                await refresh_statistics(connection, changed)
        return c.Removed(removed=removed, pseudonymized={f"{schema}.ledger": moved})


Admin = NamedDependency[BillingAdmin]


class BillingAdminController(Controller):
    """``/v1/admin/users``: one user as a whole (service token required)."""

    path = "/v1/admin/users"
    tags = ["admin"]

    @get("/{user_id:str}/export")
    async def export_user(self, billing_admin: Admin, user_id: FromPath[str]) -> c.BillingExport:
        return await billing_admin.export(parse_uuid(user_id, "user_id"))

    @post("/import", status_code=201, request_max_body_size=MAX_IMPORT_BYTES)
    async def import_user(self, billing_admin: Admin, request: Request[Any, Any, Any]) -> c.ImportedCount:
        try:
            data = _import.decode(await request.body())
        except msgspec.DecodeError as exc:
            raise _body_error("not a billing export", exc) from None
        return await billing_admin.import_(data)

    @post("/{user_id:str}/erase", status_code=200)
    async def erase_user(self, billing_admin: Admin, user_id: FromPath[str], request: Request[Any, Any, Any]) -> c.Removed:
        try:
            data = _erase.decode(await request.body())
        except msgspec.DecodeError as exc:
            raise _body_error("bad erase request", exc) from None
        return await billing_admin.erase(
            parse_uuid(user_id, "user_id"), parse_uuid(data.pseudonym, "pseudonym", "body")
        )
