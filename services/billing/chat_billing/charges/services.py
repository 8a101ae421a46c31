"""Owed charges by key, exactly once, in batches (the sessions outbox replayed by every gateway
replica, and the gateway's inline summary charge).

A batch costs one statement to find what is already done (settled reservations, summary keys
on the ledger), then one function call per item still to apply, each its own transaction, so
an item that cannot be applied never fails the others. Exactly-once comes from the database,
not from this check: a turn settles its reservation once (the reservation row lock and its
status), a summary's key is a unique index on the ledger (and its user's row lock orders
concurrent twins), so two replicas replaying the same keys at once charge each key once.
"""
from __future__ import annotations

import uuid
from typing import Any

import asyncpg

from chat_billing.charges.schemas import ChargeBatchIn, ChargeIn
from chat_billing.metrics import LEDGER_OPERATIONS, count_charge
from chat_billing.pg import Pg
from chat_billing.reservations.services import SETTLE, receipt_json
from chat_common.contracts import ChargeBatchResult, ChargeResult
from chat_common.db import TRANSIENT_SQLSTATES
from chat_common.errors import uuid_or_none

# Both kinds in one round trip: 't' rows are reservations, 's' rows summary keys.
DONE = (
    "SELECT 't' AS kind, id::text AS ref, user_id, status = 'settled' AS done, charged_nanos, shortfall_nanos"
    " FROM reservations WHERE id = ANY($1::uuid[])"
    " UNION ALL"
    " SELECT 's', charge_key, user_id, true, coalesce(charged_nanos, 0), shortfall_nanos"
    " FROM ledger WHERE charge_key = ANY($2::text[])"
)
CHARGE_SUMMARY = "SELECT * FROM billing_charge_summary($1, $2, $3, $4, $5, $6, $7::jsonb)"

_NOT_FOUND = "reservation not found"


def _refused(item: ChargeIn, message: str) -> ChargeResult:
    return ChargeResult(key=item.key, status="refused", message=message)


class ChargeService:
    def __init__(self, pg: Pg) -> None:
        self.pg = pg

    async def apply(self, batch: ChargeBatchIn) -> ChargeBatchResult:
        items = batch.items
        results: list[ChargeResult | None] = [None] * len(items)
        users: list[uuid.UUID | None] = [uuid_or_none(item.user_id) for item in items]
        reservations: list[uuid.UUID | None] = [uuid_or_none(item.reservation_id) for item in items]
        for index, item in enumerate(items):
            if users[index] is None:
                results[index] = _refused(item, "user_id must be a UUID")
            elif item.kind == "turn" and reservations[index] is None:
                results[index] = _refused(item, "a turn charge needs its reservation_id (a UUID)")
        if not items:
            return ChargeBatchResult(results=[])
        async with self.pg.pool.acquire() as connection:
            if len(items) > 1:
                await self._mark_done(connection, items, users, reservations, results)
            for index, item in enumerate(items):
                if results[index] is None:
                    results[index] = await self._apply_one(connection, item, users[index], reservations[index])
        return ChargeBatchResult(results=[result for result in results if result is not None])

    async def _mark_done(
        self,
        connection: asyncpg.Connection,
        items: list[ChargeIn],
        users: list[uuid.UUID | None],
        reservations: list[uuid.UUID | None],
        results: list[ChargeResult | None],
    ) -> None:
        """What an earlier call already applied (the usual case for a replay), in one statement."""
        turn_ids = list({r for r, res in zip(reservations, results, strict=True) if r is not None and res is None})
        summary_keys = list({i.key for i, res in zip(items, results, strict=True) if i.kind == "summary" and res is None})
        rows = await connection.fetch(DONE, turn_ids, summary_keys)
        found: dict[tuple[str, str], Any] = {(row["kind"], row["ref"]): row for row in rows}
        for index, item in enumerate(items):
            if results[index] is not None:
                continue
            if item.kind == "turn":
                row = found.get(("t", str(reservations[index])))
                if row is None or row["user_id"] != users[index]:
                    results[index] = _refused(item, _NOT_FOUND)
                elif row["done"]:
                    results[index] = ChargeResult(
                        key=item.key, status="already",
                        charged_nanos=row["charged_nanos"], shortfall_nanos=row["shortfall_nanos"],
                    )
            else:
                row = found.get(("s", item.key))
                if row is None:
                    continue
                if row["user_id"] != users[index]:
                    results[index] = _refused(item, "the key was used for another user's charge")
                else:
                    results[index] = ChargeResult(
                        key=item.key, status="already",
                        charged_nanos=row["charged_nanos"], shortfall_nanos=row["shortfall_nanos"],
                    )

    async def _apply_one(
        self, connection: asyncpg.Connection, item: ChargeIn, user_id: uuid.UUID | None,
        reservation_id: uuid.UUID | None,
    ) -> ChargeResult:
        try:
            if item.kind == "turn":
                row = await _retrying(
                    connection, SETTLE, reservation_id, user_id, item.cost_nanos, item.turn_id, item.key, None,
                    receipt_json(item.receipt),
                )
                outcome = row["outcome"]
                if outcome == "not_found":
                    return _refused(item, _NOT_FOUND)
                if outcome == "settled":
                    LEDGER_OPERATIONS.labels("settle").inc()
                    count_charge("turn", row["charged_nanos"], row["shortfall_nanos"])
                return ChargeResult(
                    key=item.key, status="charged" if outcome == "settled" else "already",
                    charged_nanos=row["charged_nanos"], shortfall_nanos=row["shortfall_nanos"],
                )
            row = await _retrying(
                connection, CHARGE_SUMMARY, user_id, item.key, item.turn_id, item.cost_nanos, item.session_id,
                item.model_name, receipt_json(item.receipt),
            )
        except asyncpg.PostgresError as exc:
            if getattr(exc, "sqlstate", None) in TRANSIENT_SQLSTATES:
                raise  # nothing applied; the whole batch is answered 503 and sent again
            return _refused(item, f"cannot be applied: {type(exc).__name__}")
        outcome = row["o_outcome"]
        if outcome == "user_not_found":
            return _refused(item, "user not found")
        if outcome == "key_conflict":
            return _refused(item, "the key was used for another user's charge")
        if outcome == "charged":
            LEDGER_OPERATIONS.labels("debit").inc()
            count_charge("summary", row["o_charged"], row["o_shortfall"])
        return ChargeResult(
            key=item.key, status="charged" if outcome == "charged" else "already",
            charged_nanos=row["o_charged"], shortfall_nanos=row["o_shortfall"],
        )


async def _retrying(connection: asyncpg.Connection, sql: str, *args: Any) -> Any:
    for attempt in range(3):
        try:
            return await connection.fetchrow(sql, *args)
        except asyncpg.SerializationError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")
