"""Reserve, settle, release and expire.

Lock order, everywhere: the idempotency key, then the reservation row, then the user row. A
reserve takes only the user row (its reservation is new), so no two of these can deadlock. The
user row is only ever locked FOR NO KEY UPDATE (what an UPDATE of the balance takes), which does
not conflict with the KEY SHARE locks that inserting a reservation or ledger row takes on it.
"""
from __future__ import annotations

import logging
import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy import Row, and_, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from chat_billing.accounts.services import (
    LedgerNote,
    UserNotFound,
    current_balance,
    settle_balance,
    shift_balance,
    user_exists,
)
from chat_billing.catalog.models import CatalogModel
from chat_billing.db import Database
from chat_billing.idempotency import fingerprint, run_once
from chat_billing.metrics import RESERVATION_FAILURES
from chat_billing.inputs import reject_nul_characters
from chat_billing.reservations.models import Reservation
from chat_billing.reservations.schemas import ReleaseRequest, ReservationReply, ReserveRequest, SettleRequest
from chat_billing.users.models import Entitlement, User
from chat_common.errors import (
    AppError,
    BadRequestError,
    InsufficientBalanceError,
    ModelNotEntitledError,
    NotFoundError,
)
from chat_common.money import token_cost_nanos

logger = logging.getLogger(__name__)

EXPIRE_BATCH = 1000

_RESERVATIONS = Reservation.__table__


class ReservationNotFound(NotFoundError):
    default_message = "reservation not found"


class ReservationService:
    def __init__(self, db: Database, default_ttl_seconds: int) -> None:
        self.db = db
        self.default_ttl_seconds = default_ttl_seconds

    async def reserve(self, request: ReserveRequest) -> Any:
        try:
            return await self._reserve(request)
        except AppError as exc:
            RESERVATION_FAILURES.labels(exc.code).inc()
            raise

    async def _reserve(self, request: ReserveRequest) -> Any:
        if request.model_id is None and request.model_name is None:
            raise BadRequestError("model_id or model_name is required")
        ttl = timedelta(seconds=request.ttl_seconds or self.default_ttl_seconds)

        async def work(session: AsyncSession) -> ReservationReply:
            model = await _entitled_model(session, request)
            amount = token_cost_nanos(
                request.input_tokens, request.output_tokens,
                model.input_price_nanos_per_1k, model.output_price_nanos_per_1k,
            )
            # Inserted before the balance is touched, so the user row is locked for as short a
            # time as possible; a refusal below rolls it back.
            reservation = (
                await session.execute(
                    insert(_RESERVATIONS)
                    .values(
                        id=uuid.uuid4(),
                        user_id=request.user_id,
                        model_id=model.id,
                        amount_nanos=amount,
                        input_tokens=request.input_tokens,
                        output_tokens=request.output_tokens,
                        status="open",
                        turn_id=request.turn_id,
                        expires_at=func.now() + ttl,
                    )
                    .returning(*_RESERVATIONS.c)
                )
            ).one()
            note = LedgerNote(
                "reserve", model_id=model.id, turn_id=request.turn_id, reservation_id=reservation.id,
                idempotency_key=request.idempotency_key,
            )
            entry = await shift_balance(
                session, request.user_id, -amount, note,
                User.balance_nanos >= amount, User.balance_nanos > 0,
            )
            if entry is None:
                available = await current_balance(session, request.user_id)
                raise InsufficientBalanceError(details={"balance_nanos": available, "required_nanos": amount})
            return ReservationReply.of(reservation, model, entry.balance_after_nanos)

        return await run_once(
            self.db, key=request.idempotency_key, request_fingerprint=fingerprint("reserve", request),
            status_code=201, work=work,
        )

    async def settle(self, reservation_id: uuid.UUID, request: SettleRequest) -> Any:
        """Give the hold back and take the actual cost, never below zero: what the balance cannot
        cover is recorded as shortfall, not owed. A reservation released meanwhile (expired,
        say) is still charged, since the turn it paid for did happen."""
        reject_nul_characters(request.details, "details")

        async def work(session: AsyncSession) -> ReservationReply:
            reservation, model = await _lock_reservation(session, reservation_id, request.user_id)
            if reservation.status == "settled":
                # Settled before under another key: the turn is charged once, whatever the key.
                return await _reply(session, reservation, model)
            returned = reservation.amount_nanos if reservation.status == "open" else 0
            turn_id = request.turn_id or reservation.turn_id
            note = LedgerNote(
                "settle", model_id=reservation.model_id, turn_id=turn_id, reservation_id=reservation.id,
                idempotency_key=request.idempotency_key, details=request.details,
                reason=None if returned else f"settled after the reservation was {reservation.release_reason}",
            )
            entry = await settle_balance(session, reservation.user_id, returned, request.cost_nanos, note)
            settled = await _update_reservation(
                session, reservation.id,
                status="settled", settled_at=func.now(), cost_nanos=request.cost_nanos,
                charged_nanos=entry.charged_nanos, shortfall_nanos=entry.shortfall_nanos, turn_id=turn_id,
            )
            return await _reply(session, settled, model, entry.balance_after_nanos)

        return await run_once(
            self.db, key=request.idempotency_key,
            request_fingerprint=fingerprint("settle", request, reservation_id), status_code=200, work=work,
        )

    async def release(self, reservation_id: uuid.UUID, request: ReleaseRequest) -> Any:
        """Give the whole hold back (the turn failed). A closed reservation is left as it is."""

        async def work(session: AsyncSession) -> ReservationReply:
            reservation, model = await _lock_reservation(session, reservation_id, request.user_id)
            if reservation.status != "open":
                return await _reply(session, reservation, model)
            released, balance = await _release_open(session, reservation, "released", request.idempotency_key)
            return await _reply(session, released, model, balance)

        return await run_once(
            self.db, key=request.idempotency_key,
            request_fingerprint=fingerprint("release", request, reservation_id), status_code=200, work=work,
        )

    async def get(self, reservation_id: uuid.UUID, user_id: uuid.UUID) -> ReservationReply:
        async with self.db.sessions() as session:
            found = (
                await session.execute(
                    select(Reservation, CatalogModel)
                    .join(CatalogModel, CatalogModel.id == Reservation.model_id)
                    .where(Reservation.id == reservation_id, Reservation.user_id == user_id)
                )
            ).first()
            if found is None:
                raise ReservationNotFound()
            return await _reply(session, found[0], found[1])

    async def expire_due(self, limit: int = EXPIRE_BATCH) -> int:
        """Release open reservations past their expiry, one short transaction each; replicas
        sweeping at once skip each other's rows instead of waiting on them."""
        released = 0
        while released < limit:
            async with self.db.sessions.begin() as session:
                reservation = (
                    await session.execute(
                        select(Reservation)
                        .where(Reservation.status == "open", Reservation.expires_at <= func.now())
                        .order_by(Reservation.expires_at)
                        .limit(1)
                        .with_for_update(skip_locked=True)
                    )
                ).scalar_one_or_none()
                if reservation is None:
                    break
                await _release_open(session, reservation, "expired", None)
            released += 1
        if released:
            logger.info("released expired reservations", extra={"released": released})
        return released


async def _entitled_model(session: AsyncSession, request: ReserveRequest) -> CatalogModel:
    """The model to reserve for; the user is looked up only to explain a refusal."""
    statement = select(CatalogModel).join(
        Entitlement, and_(Entitlement.model_id == CatalogModel.id, Entitlement.user_id == request.user_id)
    ).where(CatalogModel.active.is_(True))
    if request.model_id is not None:
        statement = statement.where(CatalogModel.id == request.model_id)
    if request.model_name is not None:
        statement = statement.where(CatalogModel.name == request.model_name)
    model = (await session.execute(statement)).scalar_one_or_none()
    if model is not None:
        return model
    if not await user_exists(session, request.user_id):
        raise UserNotFound()
    if request.model_id is not None and request.model_name is not None:
        named = await session.get(CatalogModel, request.model_id)
        if named is not None and named.name != request.model_name:
            raise BadRequestError(
                f"model_id {request.model_id} is {named.name!r}, not {request.model_name!r}",
                details={"model_id": request.model_id, "model_name": request.model_name},
            )
    raise ModelNotEntitledError(details={"model_id": request.model_id, "model_name": request.model_name})


async def _lock_reservation(
    session: AsyncSession, reservation_id: uuid.UUID, user_id: uuid.UUID | None
) -> tuple[Reservation, CatalogModel]:
    statement = (
        select(Reservation, CatalogModel)
        .join(CatalogModel, CatalogModel.id == Reservation.model_id)
        .where(Reservation.id == reservation_id)
        .with_for_update(of=Reservation)
    )
    if user_id is not None:
        # Another user's reservation is reported exactly like a missing one.
        statement = statement.where(Reservation.user_id == user_id)
    found = (await session.execute(statement)).first()
    if found is None:
        raise ReservationNotFound()
    return found[0], found[1]


async def _update_reservation(session: AsyncSession, reservation_id: uuid.UUID, **values: Any) -> Row[Any]:
    statement = (
        update(_RESERVATIONS).where(_RESERVATIONS.c.id == reservation_id).values(**values).returning(*_RESERVATIONS.c)
    )
    return (await session.execute(statement)).one()


async def _release_open(
    session: AsyncSession, reservation: Reservation, reason: str, idempotency_key: str | None
) -> tuple[Row[Any], int]:
    """Only for an open reservation whose row this transaction has locked."""
    note = LedgerNote(
        "release", model_id=reservation.model_id, turn_id=reservation.turn_id, reservation_id=reservation.id,
        idempotency_key=idempotency_key, reason=reason,
    )
    entry = await shift_balance(session, reservation.user_id, reservation.amount_nanos, note)
    assert entry is not None  # users are never deleted
    released = await _update_reservation(
        session, reservation.id, status="released", released_at=func.now(), release_reason=reason
    )
    return released, entry.balance_after_nanos


async def _reply(
    session: AsyncSession, reservation: Reservation | Row[Any], model: CatalogModel, balance_nanos: int | None = None
) -> ReservationReply:
    if balance_nanos is None:
        balance_nanos = await current_balance(session, reservation.user_id)
        assert balance_nanos is not None
    return ReservationReply.of(reservation, model, balance_nanos)
