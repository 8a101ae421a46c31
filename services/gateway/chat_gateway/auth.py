"""Who is on the other end of a socket or an HTTP request. Every handler resolves its user
through :func:`effective_user_id` (sockets) or :func:`authenticate_http` (upload, download), so
authentication lives here and nowhere else. ``docs/security.md`` is the operator's view.

``AUTH_MODE=none`` (the original's behaviour, local runs only): nobody is authenticated and the
``user_id`` inside each message is trusted.

``AUTH_MODE=jwt``: a signed token names the user (its ``sub``). HS* tokens are checked with
``JWT_SECRET`` only; RS*/ES*/PS*/EdDSA tokens with ``JWT_PUBLIC_KEY`` or the ``JWT_JWKS_URL`` key
their ``kid`` names. Keeping the two families apart is what stops the classic confusion attack
(an RS256 public key, which is public, used as an HS256 secret to forge tokens).
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from litestar import Request, WebSocket

from chat_common.errors import ServiceUnavailableError, UnauthorizedError, uuid_or_none
from chat_gateway.settings import GatewaySettings
from chat_gateway.ws.protocol import ErrorCode, ProtocolError

logger = logging.getLogger(__name__)

BEARER_SUBPROTOCOL = "bearer"
TOKEN_QUERY_PARAMETER = "token"  # noqa: S105 - the parameter's name, not a secret
# A JWT is a few hundred bytes; the cap keeps a hostile header from costing a base64 decode of
# megabytes before it is refused.
MAX_TOKEN_CHARS = 8192
MAX_SUBJECT_CHARS = 128  # the longest user_id the protocol accepts (ws/protocol.py)
# RFC 7518 section 3.2: an HMAC key at least as long as the hash output.
HMAC_MIN_KEY_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}

_HMAC = {"HS256", "HS384", "HS512"}
_ASYMMETRIC: dict[str, tuple[type, ...]] = {
    **{alg: (rsa.RSAPublicKey,) for alg in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")},
    **{alg: (ec.EllipticCurvePublicKey,) for alg in ("ES256", "ES256K", "ES384", "ES512")},
    "EdDSA": (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey),
}
SUPPORTED_ALGORITHMS = _HMAC | set(_ASYMMETRIC)


class AuthenticationError(Exception):
    """The credentials are missing or not accepted. ``reason`` is safe to show the client: it
    never contains the token. ``retryable``: the gateway could not check (JWKS unreachable),
    the token itself may be fine."""

    def __init__(self, reason: str, *, retryable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


@dataclass(frozen=True)
class Identity:
    user_id: str
    # Unix time after which (plus leeway) the token no longer vouches for the user.
    expires_at: float | None = None


# ---------------------------------------------------------------------------------------------
# verification


class TokenVerifier:
    """Built once per settings; refuses a configuration that could not verify anything."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        algorithms = tuple(settings.jwt_algorithms)
        unknown = [a for a in algorithms if a not in SUPPORTED_ALGORITHMS]
        if unknown:
            # "none" ends up here too: an unsigned token must never be an option.
            raise ValueError(f"JWT_ALGORITHMS: unsupported algorithm(s) {', '.join(unknown)}")
        if not algorithms:
            raise ValueError("JWT_ALGORITHMS must name at least one algorithm")
        self.algorithms = frozenset(algorithms)
        self.secret = settings.jwt_secret.encode() if settings.jwt_secret else None
        self.public_key: Any = None
        if settings.jwt_public_key:
            try:
                self.public_key = load_pem_public_key(settings.jwt_public_key.encode())
            except Exception as exc:  # cryptography raises ValueError or UnsupportedAlgorithm
                raise ValueError("JWT_PUBLIC_KEY is not a PEM public key") from exc
        self.jwks: jwt.PyJWKClient | None = None
        if settings.jwt_jwks_url:
            self.jwks = jwt.PyJWKClient(
                settings.jwt_jwks_url,
                cache_jwk_set=True,
                lifespan=max(1.0, settings.jwt_jwks_cache_seconds),
                timeout=5,
                # A stream of tokens with made-up kids must not become a stream of fetches.
                cooldown_duration=30,
            )
        hmac_algs = self.algorithms & _HMAC
        signature_algs = self.algorithms - _HMAC
        if hmac_algs and self.secret is None:
            raise ValueError(f"JWT_ALGORITHMS has {', '.join(sorted(hmac_algs))} but JWT_SECRET is not set")
        if signature_algs and self.public_key is None and self.jwks is None:
            raise ValueError(
                f"JWT_ALGORITHMS has {', '.join(sorted(signature_algs))} but neither JWT_PUBLIC_KEY nor JWT_JWKS_URL is set"
            )
        if self.public_key is not None:
            fitting = [a for a in signature_algs if isinstance(self.public_key, _ASYMMETRIC[a])]
            if not fitting and self.jwks is None:
                raise ValueError(
                    f"JWT_PUBLIC_KEY is a {type(self.public_key).__name__}, which none of JWT_ALGORITHMS "
                    f"({', '.join(sorted(self.algorithms))}) uses"
                )

    def warnings(self) -> list[str]:
        """What an operator should hear about at start."""
        notes = []
        for alg in sorted(self.algorithms & _HMAC):
            if self.secret is not None and len(self.secret) < HMAC_MIN_KEY_BYTES[alg]:
                notes.append(
                    f"JWT_SECRET is shorter than {HMAC_MIN_KEY_BYTES[alg]} bytes: every {alg} token will be "
                    "refused (RFC 7518 minimum; a short secret can be brute-forced from one token)"
                )
        if not self.settings.jwt_issuer:
            notes.append("JWT_ISSUER is not set: tokens of any issuer signed with the configured key are accepted")
        if not self.settings.jwt_audience:
            notes.append("JWT_AUDIENCE is not set: tokens for any audience signed with the configured key are accepted")
        return notes

    async def verify(self, token: str) -> Identity:
        if not token:
            raise AuthenticationError("missing token")
        if len(token) > MAX_TOKEN_CHARS:
            raise AuthenticationError("invalid token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthenticationError("invalid token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise AuthenticationError("token algorithm not accepted")
        key = await self._key_for(alg, header)
        options: dict[str, Any] = {
            "require": ["exp", "sub"],
            "verify_aud": bool(self.settings.jwt_audience),
            "enforce_minimum_key_length": True,
        }
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                options=options,  # type: ignore[arg-type]
                audience=self.settings.jwt_audience or None,
                issuer=self.settings.jwt_issuer or None,
                leeway=self.settings.jwt_leeway_seconds,
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationError("token expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthenticationError("token not yet valid") from None
        except jwt.InvalidAudienceError:
            raise AuthenticationError("token audience not accepted") from None
        except jwt.InvalidIssuerError:
            raise AuthenticationError("token issuer not accepted") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthenticationError(f"token has no {exc.claim} claim") from None
        except jwt.InvalidSignatureError:
            raise AuthenticationError("token signature not valid") from None
        except jwt.InvalidKeyError:
            # e.g. a JWT_SECRET below the RFC minimum: refused, and said so at start
            raise AuthenticationError("token cannot be verified with the configured key") from None
        except jwt.PyJWTError:
            raise AuthenticationError("invalid token") from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject.strip() or len(subject) > MAX_SUBJECT_CHARS:
            raise AuthenticationError("token subject is not a user id")
        if any(ord(c) < 32 or ord(c) == 127 for c in subject):
            raise AuthenticationError("token subject is not a user id")
        for claim in _TIME_CLAIMS:
            # PyJWT compares int(value): "exp": "99999999999" would pass its checks, and a
            # string exp used to leave the socket without an expiry. RFC 7519: NumericDate.
            if claim in claims and not _numeric_date(claims[claim]):
                raise AuthenticationError(f"token {claim} claim is not a number")
        return Identity(user_id=canonical_user_id(subject), expires_at=float(claims["exp"]))

    async def _key_for(self, alg: str, header: dict[str, Any]) -> Any:
        if alg in _HMAC:
            assert self.secret is not None  # checked at construction for every allowed HS*
            return self.secret
        kid = header.get("kid")
        if self.jwks is not None and (kid is not None or self.public_key is None):
            if not isinstance(kid, str) or not kid:
                raise AuthenticationError("token has no key id (kid)")
            try:
                # PyJWKClient fetches with urllib: keep the event loop free while it does.
                jwk = await asyncio.to_thread(self.jwks.get_signing_key, kid)
            except jwt.PyJWKClientConnectionError as exc:
                logger.warning("JWKS unreachable: %s", type(exc).__name__)
                raise AuthenticationError("cannot verify tokens right now", retryable=True) from None
            except jwt.PyJWTError:
                raise AuthenticationError("token key id not known") from None
            declared = getattr(jwk, "_jwk_data", {}).get("alg")
            if declared is not None and declared != alg:
                # the key's owner said what it signs with; anything else is not theirs
                raise AuthenticationError("token algorithm not accepted")
            key = jwk.key
        else:
            key = self.public_key
        if not isinstance(key, _ASYMMETRIC[alg]):
            raise AuthenticationError("token algorithm not accepted")
        return key


_TIME_CLAIMS = ("exp", "nbf", "iat")


def _numeric_date(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value)


_verifiers: dict[int, tuple[GatewaySettings, TokenVerifier]] = {}


def verifier_for(settings: GatewaySettings) -> TokenVerifier:
    """One verifier per settings object (its JWKS cache must outlive a request)."""
    held = _verifiers.get(id(settings))
    if held is None or held[0] is not settings:
        held = (settings, TokenVerifier(settings))
        _verifiers[id(settings)] = held
    return held[1]


def check_configuration(settings: GatewaySettings) -> list[str]:
    """Raises ValueError for a configuration that cannot work; returns warnings to log."""
    if settings.auth_mode == "none":
        return []
    return verifier_for(settings).warnings()


# ---------------------------------------------------------------------------------------------
# where the token travels


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


def offered_subprotocols(socket: WebSocket) -> list[str]:
    raw = socket.headers.get("sec-websocket-protocol") or ""
    return [item.strip() for item in raw.split(",") if item.strip()]


@dataclass(frozen=True)
class SocketCredentials:
    token: str | None
    # what the handshake must answer: a browser drops a socket whose server ignored the
    # subprotocol it offered
    subprotocol: str | None


def socket_credentials(socket: WebSocket) -> SocketCredentials:
    """``Authorization: Bearer``, else ``Sec-WebSocket-Protocol: bearer, <token>`` (browsers
    cannot set headers on a WebSocket), else the ``token`` query parameter."""
    offered = offered_subprotocols(socket)
    selected = BEARER_SUBPROTOCOL if any(p.lower() == BEARER_SUBPROTOCOL for p in offered) else None
    token = _bearer(socket.headers.get("authorization"))
    if token is None and selected is not None:
        # the entry right after "bearer" (a client may offer protocols of its own as well)
        at = next(i for i, p in enumerate(offered) if p.lower() == BEARER_SUBPROTOCOL)
        following = offered[at + 1] if at + 1 < len(offered) else None
        token = following if following and following.lower() != BEARER_SUBPROTOCOL else None
    if token is None:
        token = socket.query_params.get(TOKEN_QUERY_PARAMETER) or None
    return SocketCredentials(token=token, subprotocol=selected)


def http_token(request: Request) -> str | None:
    """``Authorization: Bearer``, else the ``token`` query parameter (links in a page)."""
    return _bearer(request.headers.get("authorization")) or request.query_params.get(TOKEN_QUERY_PARAMETER) or None


# ---------------------------------------------------------------------------------------------
# the seams


async def authenticate_socket(socket: WebSocket, settings: GatewaySettings) -> Identity | None:
    """The socket's identity, or None when authentication is off."""
    if settings.auth_mode == "none":
        return None
    if settings.auth_mode != "jwt":
        # Fail closed: a mode that is configured but not implemented must not fall back to trust.
        raise AuthenticationError("authentication is misconfigured")
    token = socket_credentials(socket).token
    if token is None:
        raise AuthenticationError("missing token")
    return await verifier_for(settings).verify(token)


async def authenticate_http(request: Request, settings: GatewaySettings) -> str | None:
    """The user of an upload or download; None when authentication is off.

    Raises ``UnauthorizedError`` (401) for a missing or refused token and
    ``ServiceUnavailableError`` (503) when the gateway cannot check tokens right now.
    """
    if settings.auth_mode == "none":
        return None
    if settings.auth_mode != "jwt":
        raise UnauthorizedError("authentication is misconfigured")
    token = http_token(request)
    if token is None:
        raise UnauthorizedError("missing token: send Authorization: Bearer <token>")
    try:
        identity = await verifier_for(settings).verify(token)
    except AuthenticationError as exc:
        if exc.retryable:
            raise ServiceUnavailableError(exc.reason) from None
        raise UnauthorizedError(exc.reason) from None
    return identity.user_id


def canonical_user_id(user_id: str) -> str:
    """User ids are UUIDs: one spelling of each (lower case, hyphenated), so that owner checks
    that compare strings (the context cache's, for one) see one owner. Anything else is kept as
    sent; no user can have it and it is refused downstream as an unknown user."""
    parsed = uuid_or_none(user_id)
    return user_id if parsed is None else str(parsed)


def same_user(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return uuid.UUID(a) == uuid.UUID(b)
    except (ValueError, AttributeError, TypeError):
        return False


def effective_user_id(authenticated: str | None, claimed: str | None) -> str:
    """The user a request acts for.

    Unauthenticated: the claimed ``user_id`` (required). Authenticated: the token's user; a
    claimed id, when sent, must be the same one.
    """
    if authenticated is None:
        if not claimed:
            raise ProtocolError(ErrorCode.MISSING_FIELD, "Missing required field `data.user_id`")
        return canonical_user_id(claimed)
    if claimed and not same_user(claimed, authenticated):
        raise ProtocolError(ErrorCode.USER_MISMATCH)
    return authenticated


def origin_allowed(origin: str | None, settings: GatewaySettings) -> bool:
    """A browser names the page's origin; a client that sends none is not a browser, and a
    browser page is what a cross-site socket hijack needs."""
    if origin is None:
        return True
    allowed = settings.allowed_origins
    if "*" in allowed:
        return True
    wanted = origin.strip().rstrip("/").lower()
    return any(wanted == a.strip().rstrip("/").lower() for a in allowed)


def token_expired(identity: Identity | None, settings: GatewaySettings, now: float | None = None) -> bool:
    if identity is None or identity.expires_at is None:
        return False
    return (now if now is not None else time.time()) > identity.expires_at + settings.jwt_leeway_seconds
