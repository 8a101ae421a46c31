"""Retention: sessions whose last activity is older than ``SESSION_RETENTION_DAYS`` are removed
with their files, exactly as type 4 removes one (sessions row, entries and turns; the files
service's ``DELETE /v1/sessions/{id}/files``; the cached context).

Every gateway replica runs this loop; the sessions service makes the removal exactly once: one
statement deletes a batch of expired sessions (``FOR UPDATE SKIP LOCKED``, so two replicas
never take the same row) and records each in its ``expired_sessions`` table. The sweeper then
removes the files (idempotent) and acknowledges the batch; a sweeper that dies in between
leaves the records, which any replica's next round finds (``expired``, older than a grace
period) and finishes. Outbox rows are not touched: money owed stays owed.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from chat_common.contracts import ExpiredSession
from chat_common.errors import AppError

if TYPE_CHECKING:
    from chat_gateway.chat.context_cache import ContextStore
    from chat_gateway.clients import FilesClient, SessionsClient

logger = logging.getLogger(__name__)

BATCH = 100
# A removal not acknowledged after this long was left by a sweeper that stopped midway.
LEFT_OVER_SECONDS = 60.0


class RetentionSweeper:
    def __init__(
        self, sessions: "SessionsClient", files: "FilesClient", cache: "ContextStore", *, retention_days: float
    ) -> None:
        self.sessions = sessions
        self.files = files
        self.cache = cache
        self.retention_seconds = retention_days * 86400.0

    async def sweep_once(self, *, max_batches: int = 50, left_over_seconds: float = LEFT_OVER_SECONDS) -> int:
        """One round; returns how many sessions were finished (removed with their files)."""
        done = 0
        left = await self.sessions.expired(left_over_seconds, BATCH)
        done += await self._finish(left.items)
        for _ in range(max_batches):
            batch = await self.sessions.expire(self.retention_seconds, BATCH)
            done += await self._finish(batch.items)
            if len(batch.items) < BATCH:
                break
        if done:
            logger.info("retention removed sessions", extra={"removed": done})
        return done

    async def _finish(self, items: list[ExpiredSession]) -> int:
        finished: list[str] = []
        for item in items:
            try:
                await self.files.remove_session_files(item.session_id, item.user_id)
            except AppError as exc:  # kept: the next round tries again
                logger.warning("retention could not remove a session's files: %s", exc.message)
                continue
            await self.cache.invalidate(item.session_id)
            finished.append(item.session_id)
        if finished:
            await self.sessions.expired_done(finished)
        return len(finished)
