"""The gateway's periodic work (owed charges, lock and hold renewal, retention), one loop shape
for all of it: every replica runs each, a failed round is logged and the next one tries again."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

from chat_common.errors import AppError

logger = logging.getLogger(__name__)


async def every(seconds: float, work: Callable[[], Awaitable[object]], what: str) -> None:
    """Run ``work`` every ``seconds`` until cancelled."""
    while True:
        await asyncio.sleep(seconds)
        try:
            await work()
        except AppError as exc:  # a service away: nothing to do but wait for the next round
            logger.warning("%s not done this round: %s", what, exc.message)
        except RedisError as exc:
            logger.warning("%s not done this round: %s", what, exc)
        except Exception:
            logger.exception("%s failed", what)
