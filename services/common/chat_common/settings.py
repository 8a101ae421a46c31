"""Reading configuration from the environment, once, into frozen dataclasses."""
from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import quote


def env_str(name: str, default: str = "", *aliases: str) -> str:
    """First set variable of ``name`` and its aliases (older keys of the original system)."""
    for key in (name, *aliases):
        value = os.environ.get(key)
        if value is not None and value != "":
            return value
    return default


def env_int(name: str, default: int, *aliases: str) -> int:
    raw = env_str(name, "", *aliases)
    if raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from exc


def env_float(name: str, default: float, *aliases: str) -> float:
    raw = env_str(name, "", *aliases)
    if raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name} must be a number, got {raw!r}") from exc


def env_bool(name: str, default: bool) -> bool:
    raw = env_str(name, "").strip().lower()
    if raw == "":
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"environment variable {name} must be a boolean, got {raw!r}")


def env_list(name: str, default: list[str]) -> list[str]:
    raw = env_str(name, "")
    if raw == "":
        return list(default)
    return [item.strip() for item in raw.split(",") if item.strip()]


def database_url() -> str:
    """``DATABASE_URL`` when given, else built from the original ``DB_*`` keys."""
    url = env_str("DATABASE_URL")
    if not url:
        user = quote(env_str("DB_USER", "postgres"), safe="")
        password = env_str("DB_PASSWORD")
        auth = f"{user}:{quote(password, safe='')}" if password else user
        url = (
            f"postgresql://{auth}@{env_str('DB_HOST', '127.0.0.1')}:"
            f"{env_int('DB_PORT', 5432)}/{env_str('DB_NAME', 'chat')}"
        )
    for prefix in ("postgres://", "postgresql://", "postgresql+psycopg://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix):]
    return url


def service_url(name: str, default_port: int) -> str:
    """Base URL of an internal service, e.g. ``SESSIONS_URL``."""
    return env_str(f"{name.upper()}_URL", f"http://127.0.0.1:{default_port}").rstrip("/")


@dataclass(frozen=True)
class ServiceSettings:
    """What every HTTP service reads. Each service adds its own dataclass beside it."""

    name: str
    host: str
    port: int
    service_token: str
    log_level: str = "INFO"
    log_content: bool = False
    shutdown_grace_seconds: float = 10.0

    @classmethod
    def from_env(cls, name: str, default_port: int) -> "ServiceSettings":
        prefix = name.upper()
        return cls(
            name=name,
            host=env_str(f"{prefix}_HOST", "127.0.0.1"),
            port=env_int(f"{prefix}_PORT", default_port),
            service_token=env_str("SERVICE_TOKEN"),
            log_level=env_str("LOG_LEVEL", "INFO").upper(),
            log_content=env_bool("LOG_MESSAGE_CONTENT", False),
            shutdown_grace_seconds=env_float("SHUTDOWN_GRACE_SECONDS", 10.0),
        )
