from __future__ import annotations

from dataclasses import dataclass, replace

from chat_common.settings import (
    ServiceSettings,
    env_float,
    env_int,
    env_list,
    env_str,
    service_url,
)


def redis_url() -> str:
    url = env_str("REDIS_URL")
    if url:
        return url
    password = env_str("REDIS_PASSWORD")
    auth = f":{password}@" if password else ""
    return f"redis://{auth}{env_str('REDIS_HOST', '127.0.0.1')}:{env_int('REDIS_PORT', 6379)}/{env_int('REDIS_DB', 0)}"


@dataclass(frozen=True)
class GatewaySettings:
    service: ServiceSettings
    public_url: str
    redis_url: str
    sessions_url: str
    files_url: str
    billing_url: str
    ai_target: str
    ai_timeout_seconds: float
    max_chat_history_context: int
    max_file_size_bytes: int
    reserve_output_tokens: int
    # balance-aware turns (billing's per-user/per-model switch): the fewest output tokens a
    # turn may be cut down to when the balance or a limit leaves less than the usual reservation
    balance_aware_min_output_tokens: int
    # how long a turn waits for its session's lock
    turn_lock_seconds: float
    # the lock's lease: renewed while its turn runs, so a dead gateway's lock is gone this soon
    turn_lock_lease_seconds: float
    # a turn's hold in billing is a lease of this length, renewed while the turn runs
    reservation_lease_seconds: float
    context_cache_seconds: int
    # the owed-charges worker: how often it runs, and how old an outbox row must be for it
    outbox_sweep_seconds: float
    outbox_grace_seconds: float
    # security
    auth_mode: str
    jwt_secret: str
    jwt_public_key: str
    jwt_jwks_url: str
    jwt_algorithms: tuple[str, ...]
    jwt_issuer: str
    jwt_audience: str
    allowed_origins: tuple[str, ...]
    max_frame_bytes: int
    max_message_chars: int
    max_prompt_chars: int
    max_file_name_chars: int
    rate_limit_requests: int
    rate_limit_window_seconds: int
    max_sockets_per_user: int
    jwt_leeway_seconds: float = 30.0
    jwt_jwks_cache_seconds: float = 300.0
    socket_slot_seconds: float = 60.0
    # who may read the gateway's /metrics and /schema (docs/security.md): these networks when
    # the request did not come through a proxy, or anyone with the metrics token
    metrics_allow_from: tuple[str, ...] = ("127.0.0.1/32", "::1/128")
    metrics_token: str = ""
    # retention: sessions idle for longer are removed with their files (None: kept forever)
    session_retention_days: float | None = None
    retention_sweep_seconds: float = 300.0
    # streamed turns (docs/protocol.md, "Extensions"): how long a finished turn's deltas stay resumable
    stream_retention_seconds: int = 600

    @classmethod
    def from_env(cls) -> "GatewaySettings":
        # The original system's SERVER_HOST/SERVER_PORT keep working for the gateway.
        service = replace(
            ServiceSettings.from_env("gateway", 8000),
            host=env_str("GATEWAY_HOST", "127.0.0.1", "SERVER_HOST"),
            port=env_int("GATEWAY_PORT", 8000, "SERVER_PORT"),
        )
        auth_mode = env_str("AUTH_MODE", "none").lower()
        if auth_mode not in {"none", "jwt"}:
            raise ValueError("AUTH_MODE must be 'none' or 'jwt'")
        default_origins = ["*"] if auth_mode == "none" else []
        jwt_secret = env_str("JWT_SECRET")
        jwt_public_key = env_str("JWT_PUBLIC_KEY").replace("\\n", "\n")
        jwt_jwks_url = env_str("JWT_JWKS_URL")
        # A secret means HMAC, a public key or JWKS means signatures: the default list never
        # offers an algorithm family the configured key cannot verify.
        default_algorithms = (["HS256"] if jwt_secret else []) + (
            ["RS256", "ES256"] if (jwt_public_key or jwt_jwks_url) else []
        )
        return cls(
            service=service,
            public_url=env_str("GATEWAY_PUBLIC_URL", f"http://localhost:{service.port}").rstrip("/"),
            redis_url=redis_url(),
            sessions_url=service_url("sessions", 8001),
            files_url=service_url("files", 8002),
            billing_url=service_url("billing", 8003),
            ai_target=f"{env_str('AI_SERVER_HOST', '127.0.0.1')}:{env_int('AI_SERVER_PORT', 50051)}",
            ai_timeout_seconds=env_float("AI_TIMEOUT_SECONDS", 120.0),
            max_chat_history_context=env_int("MAX_CHAT_HISTORY_CONTEXT", 10),
            max_file_size_bytes=env_int("MAX_FILE_SIZE", 10) * 1024 * 1024,
            reserve_output_tokens=env_int("RESERVE_OUTPUT_TOKENS", 1024),
            balance_aware_min_output_tokens=max(1, env_int("BALANCE_AWARE_MIN_OUTPUT_TOKENS", 64)),
            turn_lock_seconds=env_float("TURN_LOCK_SECONDS", 180.0),
            turn_lock_lease_seconds=env_float("TURN_LOCK_LEASE_SECONDS", 10.0),
            reservation_lease_seconds=env_float("RESERVATION_LEASE_SECONDS", 30.0),
            context_cache_seconds=env_int("CONTEXT_CACHE_SECONDS", 86400),
            outbox_sweep_seconds=env_float("OUTBOX_SWEEP_SECONDS", 5.0),
            outbox_grace_seconds=env_float("OUTBOX_GRACE_SECONDS", 10.0),
            auth_mode=auth_mode,
            jwt_secret=jwt_secret,
            jwt_public_key=jwt_public_key,
            jwt_jwks_url=jwt_jwks_url,
            jwt_algorithms=tuple(env_list("JWT_ALGORITHMS", default_algorithms or ["HS256"])),
            jwt_issuer=env_str("JWT_ISSUER"),
            jwt_audience=env_str("JWT_AUDIENCE"),
            allowed_origins=tuple(env_list("ALLOWED_ORIGINS", default_origins)),
            max_frame_bytes=env_int("MAX_FRAME_BYTES", 256 * 1024),
            max_message_chars=env_int("MAX_MESSAGE_CHARS", 32_000),
            max_prompt_chars=env_int("MAX_PROMPT_CHARS", 16_000),
            max_file_name_chars=env_int("MAX_FILE_NAME_CHARS", 255),
            rate_limit_requests=env_int("RATE_LIMIT_REQUESTS", 600),
            rate_limit_window_seconds=env_int("RATE_LIMIT_WINDOW_SECONDS", 60),
            max_sockets_per_user=env_int("MAX_SOCKETS_PER_USER", 50),
            jwt_leeway_seconds=env_float("JWT_LEEWAY_SECONDS", 30.0),
            jwt_jwks_cache_seconds=env_float("JWT_JWKS_CACHE_SECONDS", 300.0),
            socket_slot_seconds=max(3.0, env_float("SOCKET_SLOT_SECONDS", 60.0)),
            # "none": nobody by address (the token only)
            metrics_allow_from=tuple(
                n for n in env_list("METRICS_ALLOW_FROM", ["127.0.0.1/32", "::1/128"]) if n.lower() != "none"
            ),
            metrics_token=env_str("METRICS_TOKEN"),
            session_retention_days=retention_days(env_str("SESSION_RETENTION_DAYS")),
            retention_sweep_seconds=max(0.1, env_float("RETENTION_SWEEP_SECONDS", 300.0)),
            stream_retention_seconds=max(1, env_int("STREAM_RETENTION_SECONDS", 600)),
        )


def retention_days(raw: str) -> float | None:
    """``SESSION_RETENTION_DAYS``: unset or empty keeps sessions forever; else a positive number
    of days (fractions allowed)."""
    if not raw.strip():
        return None
    try:
        days = float(raw)
    except ValueError:
        raise ValueError(f"environment variable SESSION_RETENTION_DAYS must be a number of days, got {raw!r}") from None
    if not days > 0 or days == float("inf"):
        raise ValueError("environment variable SESSION_RETENTION_DAYS must be more than 0 (unset keeps sessions forever)")
    return days
