"""Periodic work, one loop shape for every service (the gateway's owed charges, lock and hold
renewal and retention; billing's reservation sweep; the files sweep): every replica runs each,
a failed round is logged and the next one tries again."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from chat_common.errors import AppError, classify_unexpected

logger = logging.getLogger(__name__)


async def every(
    seconds: float,
    work: Callable[[], Awaitable[object]],
    what: str,
    *,
    expected: tuple[type[BaseException], ...] = (),
) -> None:
    """Run ``work`` every ``seconds`` until cancelled. A round that fails for a dependency
    being away (an ``AppError``, an error ``chat_common.errors`` knows as an outage, or one of
    ``expected``) is a warning; anything else is logged with its traceback, as a bug."""
    while True:
        await asyncio.sleep(seconds)
        try:
            await work()
        except AppError as exc:
            logger.warning("%s not done this round: %s", what, exc.message)
        except expected as exc:
            logger.warning("%s not done this round: %s", what, exc)
        except Exception as exc:
            known = classify_unexpected(exc)
            if known is None:
                logger.exception("%s failed", what)
            else:
                logger.warning("%s not done this round: %s (%s)", what, known.message, type(exc).__name__)
