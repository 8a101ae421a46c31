from __future__ import annotations

import asyncio
import logging

from chat_billing.reservations.services import EXPIRE_BATCH, ReservationService

logger = logging.getLogger(__name__)


async def sweep_expired_reservations(reservations: ReservationService, interval_seconds: float) -> None:
    """Runs for the life of the app. Every replica sweeps; they skip each other's rows."""
    while True:
        await asyncio.sleep(interval_seconds)
        try:
            while await reservations.expire_due() == EXPIRE_BATCH:
                pass
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a database outage must not end the sweeping for good
            logger.warning(
                "reservation sweep failed; retrying next round",
                extra={"error": f"{type(exc).__name__}: {exc}"[:300]},
            )
