from __future__ import annotations

from litestar import Controller, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, JSONBody

from chat_billing.reservations.schemas import (
    ExpireReply,
    LeaseRequest,
    ReleaseRequest,
    ReservationReply,
    ReserveRequest,
    SettleRequest,
)
from chat_billing.reservations.services import ReservationService
from chat_common.errors import parse_uuid

Reservations = NamedDependency[ReservationService]


class ReservationController(Controller):
    path = "/v1/reservations"
    tags = ["reservations"]

    @post("/")
    async def reserve(self, data: JSONBody[ReserveRequest], reservations: Reservations) -> ReservationReply:
        """Hold the estimated cost: 404 unknown user, 403 model not entitled, 402 balance too low.
        Idempotent on ``turn_id``: the same turn reserved again gets its first hold back."""
        return await reservations.reserve(data)

    @post("/expire", status_code=200)
    async def expire(self, reservations: Reservations) -> ExpireReply:
        """Release every open reservation past its expiry now (the sweep does this periodically)."""
        return ExpireReply(released=await reservations.expire_due())

    @get("/{reservation_id:str}")
    async def get_reservation(
        self, reservation_id: FromPath[str], user_id: FromQuery[str], reservations: Reservations
    ) -> ReservationReply:
        return await reservations.get(
            parse_uuid(reservation_id, "reservation_id"), parse_uuid(user_id, "user_id", "query")
        )

    @post("/{reservation_id:str}/settle", status_code=200)
    async def settle(
        self, reservation_id: FromPath[str], data: JSONBody[SettleRequest], reservations: Reservations
    ) -> ReservationReply:
        """Charge the actual cost, once per reservation (settled already: the stored outcome)."""
        return await reservations.settle(parse_uuid(reservation_id, "reservation_id"), data)

    @post("/{reservation_id:str}/release", status_code=200)
    async def release(
        self, reservation_id: FromPath[str], data: JSONBody[ReleaseRequest], reservations: Reservations
    ) -> ReservationReply:
        return await reservations.release(parse_uuid(reservation_id, "reservation_id"), data)

    @post("/{reservation_id:str}/lease", status_code=200)
    async def lease(
        self, reservation_id: FromPath[str], data: JSONBody[LeaseRequest], reservations: Reservations
    ) -> ReservationReply:
        """Push an open hold's expiry to now + ``ttl_seconds``; 404 for an unknown or another
        user's reservation; a settled or released one is answered as it is."""
        return await reservations.lease(parse_uuid(reservation_id, "reservation_id"), data)
