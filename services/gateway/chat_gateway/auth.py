"""Who is on the other end of a socket. Every handler resolves its user through
:func:`effective_user_id`, so authentication (JWT, later) plugs in here and nowhere else.

``AUTH_MODE=none`` (the original's behaviour, local runs only): nobody is authenticated and the
``user_id`` inside each message is trusted.
"""
from __future__ import annotations

from litestar import WebSocket

from chat_gateway.settings import GatewaySettings
from chat_gateway.ws.protocol import ErrorCode, ProtocolError


class AuthenticationError(Exception):
    """The socket must be refused (closed with a policy-violation code before any message)."""


async def authenticate_websocket(socket: WebSocket, settings: GatewaySettings) -> str | None:
    """The authenticated user id of the socket, or None when authentication is off."""
    if settings.auth_mode == "none":
        return None
    # Fail closed: a mode that is configured but not implemented must not fall back to trust.
    raise AuthenticationError(f"AUTH_MODE={settings.auth_mode} is not supported by this gateway")


def effective_user_id(authenticated: str | None, claimed: str | None) -> str:
    """The user a request acts for.

    Unauthenticated: the claimed ``user_id`` (required). Authenticated: the token's user; a
    claimed id, when sent, must be the same one.
    """
    if authenticated is None:
        if not claimed:
            raise ProtocolError(ErrorCode.MISSING_FIELD, "Missing required field `data.user_id`")
        return claimed
    if claimed and claimed != authenticated:
        raise ProtocolError(ErrorCode.USER_MISMATCH)
    return authenticated
