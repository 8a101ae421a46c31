from __future__ import annotations

import logging
import sys

from chat_common.logging import configure_logging
from chat_common.serve import serve
from chat_common.settings import env_str
from chat_gateway.app import create_app
from chat_gateway.auth import check_configuration
from chat_gateway.settings import GatewaySettings

logger = logging.getLogger("chat_gateway")


def main() -> int:
    # Before anything can fail or warn, so those lines are JSON on stdout like all others.
    try:
        configure_logging("gateway", env_str("LOG_LEVEL", "INFO").upper())
    except ValueError as exc:
        print(f"invalid configuration: {exc}", file=sys.stderr)
        return 2
    try:
        settings = GatewaySettings.from_env()
        notes = check_configuration(settings)
    except ValueError as exc:
        logger.error("invalid configuration: %s", exc)
        return 2
    app = create_app(settings)
    # Litestar installs its own root handler while building the app: take logging back, so
    # the warnings below are JSON lines like every other.
    configure_logging("gateway", settings.service.log_level)
    if settings.auth_mode == "none":
        logger.warning("AUTH_MODE=none: the user_id inside each message is trusted; use only for local runs")
    for note in notes:
        logger.warning(note)
    serve(
        app,
        settings.service,
        before_shutdown=lambda: app.state.sockets.drain(settings.service.shutdown_grace_seconds),
        ws_max_size=settings.max_frame_bytes,
        ws_ping_interval=20.0,
        # The public edge parses with h11: it answers a client that sends more than it declared
        # (or more than the upload limit) before closing, where httptools' faster close lets
        # the kernel's reset overtake the answer. Chat turns are WebSocket frames and never
        # reach this parser; the internal services, which carry the per-turn HTTP, use httptools.
        http_parser="h11",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
