from __future__ import annotations

import logging

from chat_common.serve import serve
from chat_gateway.app import create_app
from chat_gateway.settings import GatewaySettings


def main() -> None:
    settings = GatewaySettings.from_env()
    app = create_app(settings)
    if settings.auth_mode == "none":
        logging.getLogger("chat_gateway").warning(
            "AUTH_MODE=none: the user_id inside each message is trusted; use only for local runs"
        )
    serve(app, settings.service, ws_max_size=settings.max_frame_bytes, ws_ping_interval=20.0)


if __name__ == "__main__":
    main()
