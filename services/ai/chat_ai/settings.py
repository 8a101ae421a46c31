"""The AI service's configuration, read once from the environment."""
from __future__ import annotations

import re
from dataclasses import dataclass

from chat_common.settings import env_float, env_int, env_str

PROVIDER_MODES = ("auto", "offline", "openai", "ollama")
DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"
DEFAULT_OLLAMA_HOST = "127.0.0.1"
DEFAULT_OLLAMA_PORT = 11434


def _ollama_base_url() -> str:
    """``OLLAMA_BASE_URL``, else built from ``OLLAMA_HOST``/``OLLAMA_PORT``; "" when none is set.

    ``OLLAMA_HOST`` is accepted in the forms Ollama itself understands: ``host``, ``host:port``
    or a full ``http://host:port`` URL.
    """
    base = env_str("OLLAMA_BASE_URL")
    if base:
        return base.rstrip("/")
    host = env_str("OLLAMA_HOST")
    port = env_str("OLLAMA_PORT")
    if not host and not port:
        return ""
    if "://" in host:
        return host.rstrip("/")
    if re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^:\[\]]+):\d+", host):
        return f"http://{host}"
    return f"http://{host or DEFAULT_OLLAMA_HOST}:{env_int('OLLAMA_PORT', DEFAULT_OLLAMA_PORT)}"


@dataclass(frozen=True)
class AISettings:
    bind: str = "127.0.0.1"
    port: int = 50051
    provider_mode: str = "auto"
    openai_api_key: str = ""
    # "" means "not configured": auto mode then sends no model to an OpenAI-compatible endpoint.
    openai_base_url: str = ""
    ollama_base_url: str = ""
    provider_timeout_seconds: float = 120.0
    file_fetch_timeout_seconds: float = 10.0
    file_fetch_max_bytes: int = 50 * 1024 * 1024
    # OpenAI refuses images above 20 MB; larger ones are named by URL instead of inlined.
    image_inline_max_bytes: int = 20 * 1024 * 1024
    log_level: str = "INFO"
    shutdown_grace_seconds: float = 10.0
    # the offline provider's pause before each streamed delta (ProcessStream), milliseconds
    offline_stream_delay_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.provider_mode not in PROVIDER_MODES:
            raise ValueError(
                f"AI_PROVIDER must be one of {', '.join(PROVIDER_MODES)}, got {self.provider_mode!r}"
            )
        if self.provider_timeout_seconds <= 0 or self.file_fetch_timeout_seconds <= 0:
            raise ValueError("timeouts must be positive")

    @property
    def openai_configured(self) -> bool:
        return bool(self.openai_api_key or self.openai_base_url)

    @property
    def openai_endpoint(self) -> str:
        return (self.openai_base_url or DEFAULT_OPENAI_BASE_URL).rstrip("/")

    @property
    def ollama_configured(self) -> bool:
        return bool(self.ollama_base_url)

    @property
    def ollama_endpoint(self) -> str:
        return (self.ollama_base_url or f"http://{DEFAULT_OLLAMA_HOST}:{DEFAULT_OLLAMA_PORT}").rstrip("/")

    @classmethod
    def from_env(cls) -> "AISettings":
        return cls(
            bind=env_str("AI_SERVER_BIND", "127.0.0.1"),
            port=env_int("AI_SERVER_PORT", 50051),
            provider_mode=env_str("AI_PROVIDER", "auto").strip().lower(),
            openai_api_key=env_str("OPENAI_API_KEY"),
            openai_base_url=env_str("OPENAI_BASE_URL").rstrip("/"),
            ollama_base_url=_ollama_base_url(),
            provider_timeout_seconds=env_float("AI_PROVIDER_TIMEOUT_SECONDS", 120.0),
            file_fetch_timeout_seconds=env_float("AI_FILE_FETCH_TIMEOUT_SECONDS", 10.0),
            file_fetch_max_bytes=env_int("AI_FILE_FETCH_MAX_BYTES", 50 * 1024 * 1024),
            image_inline_max_bytes=env_int("AI_IMAGE_INLINE_MAX_BYTES", 20 * 1024 * 1024),
            log_level=env_str("LOG_LEVEL", "INFO").upper(),
            shutdown_grace_seconds=env_float("SHUTDOWN_GRACE_SECONDS", 10.0),
            offline_stream_delay_ms=max(0.0, env_float("OFFLINE_STREAM_DELAY_MS", 0.0)),
        )

    def __repr__(self) -> str:
        # Settings are logged at startup; the API key must never reach a log line.
        key = "set" if self.openai_api_key else "unset"
        return (
            f"AISettings(bind={self.bind!r}, port={self.port}, provider_mode={self.provider_mode!r}, "
            f"openai_api_key={key}, openai_base_url={self.openai_base_url!r}, "
            f"ollama_base_url={self.ollama_base_url!r}, "
            f"provider_timeout_seconds={self.provider_timeout_seconds})"
        )
