"""The command line every service has: ``python -m chat_<service>`` serves,
``python -m chat_<service> migrate`` (the services owning tables) applies the migrations and
exits. Same arguments, same messages, same exit codes everywhere: 0 done, 2 a wrong argument or
an invalid configuration (one line on stderr and a JSON log line), 1 a start that failed."""
from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from chat_common.logging import configure_logging
from chat_common.settings import env_str

S = TypeVar("S")

logger = logging.getLogger(__name__)


class InvalidConfiguration(Exception):
    """A configuration found unusable after the settings were read (while building the app)."""


def run_service(
    name: str,
    argv: Sequence[str] | None,
    *,
    load: Callable[[], S],
    serve: Callable[[S], None],
    migrate: Callable[[S], list[str]] | None = None,
) -> int:
    """Parse the arguments, read and validate the settings once (``load`` raises ValueError for
    an invalid configuration), then migrate or serve."""
    args = list(sys.argv[1:] if argv is None else argv)
    allowed: list[list[str]] = [[], ["migrate"]] if migrate is not None else [[]]
    if args not in allowed:
        usage = f"usage: python -m chat_{name}" + (" [migrate]" if migrate is not None else "")
        print(f"{usage}  (got {' '.join(args)!r})", file=sys.stderr)
        return 2
    # Logging first, so whatever fails next is a JSON line on stdout like every other line.
    try:
        configure_logging(name, env_str("LOG_LEVEL", "INFO"))
    except ValueError as exc:
        print(f"invalid configuration: {exc}", file=sys.stderr)
        return 2
    try:
        settings = load()
    except ValueError as exc:
        return _invalid(exc)
    try:
        if args == ["migrate"] and migrate is not None:
            applied = migrate(settings)
            logger.info("migrations up to date", extra={"applied_now": applied})
            return 0
        serve(settings)
    except InvalidConfiguration as exc:
        return _invalid(exc)
    except OSError as exc:  # the port is taken, the address cannot be bound
        logger.error("cannot start: %s", exc)
        return 1
    return 0


def _invalid(exc: Exception) -> int:
    logger.error("invalid configuration: %s", exc)
    print(f"invalid configuration: {exc}", file=sys.stderr)
    return 2
