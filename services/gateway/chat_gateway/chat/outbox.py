"""Charges owed by stored turns and summaries, settled whatever died in between.

The sessions service writes what a turn owes in the same transaction as its entries (its
outbox). A turn normally settles its own charge right after the append; this worker, run by
every gateway replica, pages through outbox rows older than a grace period and hands them to
billing, which applies each key exactly once (a turn's reservation is settled once; a summary's
debit is one ledger line per key) and answers "already" for those the turn settled itself. Each
charge carries the receipt's details the outbox kept with it (tokens, window, summary extent,
prompt hash), so a charge settled from here has the same receipt as one the turn settled. Rows
billing has answered for are then acknowledged (deleted). Replicas racing over the same rows are
harmless for the same reason.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chat_gateway.clients import BillingClient, SessionsClient

logger = logging.getLogger(__name__)

PAGE = 500


class OwedCharges:
    def __init__(self, sessions: "SessionsClient", billing: "BillingClient", *, grace_seconds: float) -> None:
        self.sessions = sessions
        self.billing = billing
        self.grace_seconds = grace_seconds

    async def settle_once(self, *, grace_seconds: float | None = None, max_pages: int = 20) -> int:
        """Settle what is owed past the grace period; returns how many rows were answered."""
        grace = self.grace_seconds if grace_seconds is None else grace_seconds
        answered = 0
        for _ in range(max_pages):
            page = await self.sessions.owed(grace, PAGE)
            if not page.items:
                break
            result = await self.billing.charge([item.charge for item in page.items])
            done: list[int] = []
            for item, outcome in zip(page.items, result.results, strict=False):
                if outcome.key != item.charge.key:
                    logger.error("billing answered charges out of order; stopping this round")
                    break
                if outcome.status == "refused":
                    # nothing a retry could change (unknown reservation, say): said once, loudly
                    logger.error("billing refused owed charge %s: %s", outcome.key, outcome.message)
                done.append(item.outbox_id)
            if done:
                await self.sessions.acknowledge(done)
            answered += len(done)
            if len(page.items) < PAGE or len(done) < len(page.items):
                break
        if answered:
            logger.debug("owed charges answered", extra={"answered": answered})
        return answered
