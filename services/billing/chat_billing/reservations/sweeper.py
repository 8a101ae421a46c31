"""Releasing reservations past their expiry (holds of turns that died), run by the app's
lifespan through chat_common.periodic.every: every replica sweeps; they skip each other's rows."""
from __future__ import annotations

from chat_billing.reservations.services import EXPIRE_BATCH, ReservationService


async def sweep_expired_reservations(reservations: ReservationService) -> None:
    """One round: batches until one comes back short (nothing more is due)."""
    while await reservations.expire_due() == EXPIRE_BATCH:
        pass
