from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg

from chat_billing.accounts.services import UserNotFound, shift_balance, user_exists
from chat_billing.catalog.schemas import ModelReply, ModelsReply
from chat_billing.catalog.services import MODEL_COLUMNS
from chat_billing.idempotency import fingerprint, run_once
from chat_billing.inputs import money_in_nanos
from chat_billing.pg import Pg
from chat_billing.users.schemas import CreateUserRequest, ModelIdsRequest, UserReply
from chat_common.errors import BadRequestError
from chat_common.money import nanos_to_dollars

# One round trip: the user and its entitlements.
GET_USER = (
    "SELECT u.id, u.username, u.balance_nanos, u.created_at,"
    " coalesce((SELECT array_agg(e.model_id ORDER BY e.model_id) FROM entitlements e WHERE e.user_id = u.id),"
    " '{}'::integer[]) AS models"
    " FROM users u WHERE u.id = $1"
)
KNOWN_MODELS = "SELECT id FROM models WHERE id = ANY($1::integer[])"
INSERT_USER = (
    "INSERT INTO users (id, username, balance_nanos) VALUES ($1, $2, 0) ON CONFLICT (id) DO NOTHING RETURNING id"
)
GRANT = (
    "INSERT INTO entitlements (user_id, model_id) SELECT $1, unnest($2::integer[]) ON CONFLICT DO NOTHING"
)
REVOKE = "DELETE FROM entitlements WHERE user_id = $1 AND model_id = ANY($2::integer[])"
# The models a user may use right now, by name: what the type-5 listing shows.
ENTITLED_ACTIVE = (
    f"SELECT {MODEL_COLUMNS} FROM models m JOIN entitlements e ON e.model_id = m.id"
    " WHERE e.user_id = $1 AND m.active ORDER BY m.name"
)


async def require_known_models(connection: asyncpg.Connection, model_ids: Sequence[int]) -> None:
    if not model_ids:
        return
    known = {row["id"] for row in await connection.fetch(KNOWN_MODELS, list(model_ids))}
    unknown = sorted(set(model_ids) - known)
    if unknown:
        raise BadRequestError(f"unknown model ids: {unknown}", details={"unknown_model_ids": unknown})


def user_reply(row: Any) -> UserReply:
    return UserReply(
        user_id=str(row["id"]),
        username=row["username"],
        balance_nanos=row["balance_nanos"],
        models=list(row["models"]),
        balance=nanos_to_dollars(row["balance_nanos"]),
        created_at=row["created_at"],
    )


async def read_user(connection: asyncpg.Connection, user_id: uuid.UUID) -> UserReply:
    row = await connection.fetchrow(GET_USER, user_id)
    if row is None:
        raise UserNotFound()
    return user_reply(row)


class UserService:
    def __init__(self, pg: Pg) -> None:
        self.pg = pg

    async def create(self, request: CreateUserRequest) -> UserReply:
        balance = money_in_nanos(
            request.balance, request.balance_nanos, "balance", "balance_nanos", required=False, positive=False
        ) or 0
        user_id = request.user_id or uuid.uuid4()
        model_ids = sorted(set(request.models))

        async def work(connection: asyncpg.Connection) -> UserReply:
            await require_known_models(connection, model_ids)
            if await connection.fetchval(INSERT_USER, user_id, request.username) is None:
                # A stable id was given and already exists: creating it again changes nothing,
                # so a demo user may be "created" on every start without topping it up each time.
                return await read_user(connection, user_id)
            if model_ids:
                await connection.execute(GRANT, user_id, model_ids)
            if balance > 0:
                # Through the ledger like any credit, so the ledger alone explains every balance.
                await shift_balance(
                    connection, user_id, balance, "credit", idempotency_key=request.idempotency_key,
                    reason="initial balance",
                )
            return await read_user(connection, user_id)

        return await run_once(
            self.pg.pool, key=request.idempotency_key, request_fingerprint=fingerprint("create_user", request),
            reply_type=UserReply, status_code=201, work=work,
        )

    async def get(self, user_id: uuid.UUID) -> UserReply:
        row = await self.pg.pool.fetchrow(GET_USER, user_id)
        if row is None:
            raise UserNotFound()
        return user_reply(row)

    async def models(self, user_id: uuid.UUID) -> ModelsReply:
        async with self.pg.pool.acquire() as connection:
            rows = await connection.fetch(ENTITLED_ACTIVE, user_id)
            if not rows and not await user_exists(connection, user_id):
                raise UserNotFound()
        return ModelsReply(models=[ModelReply.of_row(row) for row in rows])

    async def grant(self, user_id: uuid.UUID, request: ModelIdsRequest) -> UserReply:
        return await self._change(user_id, request, "grant", GRANT)

    async def revoke(self, user_id: uuid.UUID, request: ModelIdsRequest) -> UserReply:
        return await self._change(user_id, request, "revoke", REVOKE)

    async def _change(self, user_id: uuid.UUID, request: ModelIdsRequest, operation: str, statement: str) -> UserReply:
        model_ids = sorted(set(request.model_ids))

        async def work(connection: asyncpg.Connection) -> UserReply:
            if not await user_exists(connection, user_id):
                raise UserNotFound()
            await require_known_models(connection, model_ids)
            await connection.execute(statement, user_id, model_ids)
            return await read_user(connection, user_id)

        return await run_once(
            self.pg.pool, key=request.idempotency_key,
            request_fingerprint=fingerprint(operation, request, user_id), reply_type=UserReply,
            status_code=200, work=work,
        )
