"""``python -m chat_gateway`` serves the WebSocket gateway (chat_common.entry); it owns no
tables, so it has no ``migrate`` command."""
from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from chat_common.entry import InvalidConfiguration, run_service
from chat_common.logging import configure_logging
from chat_common.serve import serve
from chat_gateway.app import create_app
from chat_gateway.settings import GatewaySettings

logger = logging.getLogger("chat_gateway")


def serve_gateway(settings: GatewaySettings) -> None:
    try:
        app = create_app(settings)
    except ValueError as exc:  # building checks the authentication setup (chat_gateway.auth)
        raise InvalidConfiguration(str(exc)) from exc
    # Litestar installs its own root handler while building the app: take logging back, so
    # the warnings below are JSON lines like every other.
    configure_logging("gateway", settings.service.log_level)
    if settings.auth_mode == "none":
        logger.warning("AUTH_MODE=none: the user_id inside each message is trusted; use only for local runs")
    for note in app.state.configuration_notes:
        logger.warning(note)
    serve(
        app,
        settings.service,
        before_shutdown=lambda: app.state.gateway.sockets.drain(settings.service.shutdown_grace_seconds),
        ws_max_size=settings.max_frame_bytes,
        ws_ping_interval=20.0,
        # The public edge parses with h11: it answers a client that sends more than it declared
        # (or more than the upload limit) before closing, where httptools' faster close lets
        # the kernel's reset overtake the answer. Chat turns are WebSocket frames and never
        # reach this parser; the internal services, which carry the per-turn HTTP, use httptools.
        http_parser="h11",
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run_service("gateway", argv, load=GatewaySettings.from_env, serve=serve_gateway)


if __name__ == "__main__":
    sys.exit(main())
