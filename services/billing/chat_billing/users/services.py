from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC
from typing import Any

from advanced_alchemy.repository import SQLAlchemyAsyncRepository
from litestar import Response
from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from chat_billing.accounts.services import LedgerNote, UserNotFound, shift_balance, user_exists
from chat_billing.catalog.models import CatalogModel
from chat_billing.catalog.schemas import ModelReply, ModelsReply
from chat_billing.catalog.services import CatalogRepository
from chat_billing.db import Database
from chat_billing.pg import Pg
from chat_billing.idempotency import fingerprint, run_once
from chat_billing.inputs import money_in_nanos
from chat_billing.users.models import Entitlement, User
from chat_billing.users.schemas import CreateUserRequest, ModelIdsRequest, UserReply
from chat_common.errors import BadRequestError
from chat_common.money import nanos_to_dollars


class UserRepository(SQLAlchemyAsyncRepository[User]):
    model_type = User


async def require_known_models(session: AsyncSession, model_ids: Sequence[int]) -> None:
    if not model_ids:
        return
    known = set((await session.execute(select(CatalogModel.id).where(CatalogModel.id.in_(model_ids)))).scalars())
    unknown = sorted(set(model_ids) - known)
    if unknown:
        raise BadRequestError(f"unknown model ids: {unknown}", details={"unknown_model_ids": unknown})


async def read_user(session: AsyncSession, user_id: uuid.UUID) -> UserReply:
    user = await UserRepository(session=session).get_one_or_none(id=user_id)
    if user is None:
        raise UserNotFound()
    model_ids = (
        await session.execute(
            select(Entitlement.model_id).where(Entitlement.user_id == user_id).order_by(Entitlement.model_id)
        )
    ).scalars()
    return UserReply(
        user_id=str(user.id),
        username=user.username,
        models=list(model_ids),
        balance=nanos_to_dollars(user.balance_nanos),
        balance_nanos=user.balance_nanos,
        created_at=user.created_at.astimezone(UTC),
    )


async def entitled_active_models(session: AsyncSession, user_id: uuid.UUID) -> list[CatalogModel]:
    """The models a user may use right now, by name: what the type-5 listing shows."""
    repository = CatalogRepository(session=session)
    statement = repository.statement.join(Entitlement, Entitlement.model_id == CatalogModel.id).where(
        Entitlement.user_id == user_id, CatalogModel.active.is_(True)
    )
    return list(await repository.get_many(statement=statement, order_by=(CatalogModel.name, False)))


# One round trip: the user and its entitlements.
GET_USER = (
    "SELECT u.id, u.username, u.balance_nanos, u.created_at,"
    " coalesce((SELECT array_agg(e.model_id ORDER BY e.model_id) FROM entitlements e WHERE e.user_id = u.id),"
    " '{}'::integer[]) AS models"
    " FROM users u WHERE u.id = $1"
)


class UserService:
    def __init__(self, db: Database, pg: Pg) -> None:
        self.db = db
        self.pg = pg

    async def create(self, request: CreateUserRequest) -> Response[bytes]:
        balance = money_in_nanos(
            request.balance, request.balance_nanos, "balance", "balance_nanos", required=False, positive=False
        ) or 0
        user_id = request.user_id or uuid.uuid4()
        model_ids = sorted(set(request.models))

        async def work(session: AsyncSession) -> UserReply:
            await require_known_models(session, model_ids)
            created = await session.execute(
                insert(User)
                .values(id=user_id, username=request.username, balance_nanos=0)
                .on_conflict_do_nothing(index_elements=[User.id])
                .returning(User.id)
            )
            if created.first() is None:
                # A stable id was given and already exists: creating it again changes nothing,
                # so a demo user may be "created" on every start without topping it up each time.
                return await read_user(session, user_id)
            await _grant(session, user_id, model_ids)
            if balance > 0:
                # Through the ledger like any credit, so the ledger alone explains every balance.
                note = LedgerNote("credit", idempotency_key=request.idempotency_key, reason="initial balance")
                await shift_balance(session, user_id, balance, note)
            return await read_user(session, user_id)

        return await run_once(
            self.db, key=request.idempotency_key, request_fingerprint=fingerprint("create_user", request),
            status_code=201, work=work,
        )

    async def get(self, user_id: uuid.UUID) -> UserReply:
        row = await self.pg.pool.fetchrow(GET_USER, user_id)
        if row is None:
            raise UserNotFound()
        return UserReply(
            user_id=str(row["id"]),
            username=row["username"],
            balance_nanos=row["balance_nanos"],
            models=list(row["models"]),
            balance=nanos_to_dollars(row["balance_nanos"]),
            created_at=row["created_at"],
        )

    async def models(self, user_id: uuid.UUID) -> ModelsReply:
        async with self.db.sessions() as session:
            if not await user_exists(session, user_id):
                raise UserNotFound()
            models = await entitled_active_models(session, user_id)
        return ModelsReply(models=[ModelReply.of(model) for model in models])

    async def grant(self, user_id: uuid.UUID, request: ModelIdsRequest) -> Any:
        model_ids = sorted(set(request.model_ids))

        async def work(session: AsyncSession) -> UserReply:
            if not await user_exists(session, user_id):
                raise UserNotFound()
            await require_known_models(session, model_ids)
            await _grant(session, user_id, model_ids)
            return await read_user(session, user_id)

        return await run_once(
            self.db, key=request.idempotency_key, request_fingerprint=fingerprint("grant", request, user_id),
            status_code=200, work=work,
        )

    async def revoke(self, user_id: uuid.UUID, request: ModelIdsRequest) -> Any:
        model_ids = sorted(set(request.model_ids))

        async def work(session: AsyncSession) -> UserReply:
            if not await user_exists(session, user_id):
                raise UserNotFound()
            await require_known_models(session, model_ids)
            await session.execute(
                delete(Entitlement).where(Entitlement.user_id == user_id, Entitlement.model_id.in_(model_ids))
            )
            return await read_user(session, user_id)

        return await run_once(
            self.db, key=request.idempotency_key, request_fingerprint=fingerprint("revoke", request, user_id),
            status_code=200, work=work,
        )


async def _grant(session: AsyncSession, user_id: uuid.UUID, model_ids: Sequence[int]) -> None:
    if model_ids:
        await session.execute(
            insert(Entitlement)
            .values([{"user_id": user_id, "model_id": model_id} for model_id in model_ids])
            .on_conflict_do_nothing()
        )
