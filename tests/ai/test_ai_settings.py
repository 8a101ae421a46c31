"""Configuration from the environment and the choice of provider per model."""
from __future__ import annotations

import httpx
import pytest

from chat_ai.providers import ProviderRegistry
from chat_ai.settings import AISettings

AI_KEYS = (
    "AI_SERVER_BIND", "AI_SERVER_PORT", "AI_PROVIDER", "OPENAI_API_KEY", "OPENAI_BASE_URL",
    "OLLAMA_BASE_URL", "OLLAMA_HOST", "OLLAMA_PORT", "AI_PROVIDER_TIMEOUT_SECONDS",
    "AI_FILE_FETCH_TIMEOUT_SECONDS", "AI_FILE_FETCH_MAX_BYTES", "AI_IMAGE_INLINE_MAX_BYTES",
    "LOG_LEVEL", "SHUTDOWN_GRACE_SECONDS",
)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in AI_KEYS:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_defaults(env: pytest.MonkeyPatch) -> None:
    settings = AISettings.from_env()
    assert (settings.bind, settings.port, settings.provider_mode) == ("127.0.0.1", 50051, "auto")
    assert settings.provider_timeout_seconds == 120.0
    assert settings.file_fetch_timeout_seconds == 10.0
    assert settings.file_fetch_max_bytes == 50 * 1024 * 1024
    assert not settings.openai_configured and not settings.ollama_configured
    assert settings.openai_endpoint == "https://api.openai.com/v1"


def test_values_from_env(env: pytest.MonkeyPatch) -> None:
    env.setenv("AI_SERVER_BIND", "0.0.0.0")
    env.setenv("AI_SERVER_PORT", "6000")
    env.setenv("AI_PROVIDER", "Offline")
    env.setenv("AI_PROVIDER_TIMEOUT_SECONDS", "7.5")
    env.setenv("OPENAI_BASE_URL", "http://vllm:8000/v1/")
    settings = AISettings.from_env()
    assert (settings.bind, settings.port, settings.provider_mode) == ("0.0.0.0", 6000, "offline")
    assert settings.provider_timeout_seconds == 7.5
    assert settings.openai_endpoint == "http://vllm:8000/v1"


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({"OLLAMA_BASE_URL": "http://ollama:11434/"}, "http://ollama:11434"),
        ({"OLLAMA_PORT": "11500"}, "http://127.0.0.1:11500"),  # the original's only Ollama key
        ({"OLLAMA_HOST": "gpu-box"}, "http://gpu-box:11434"),
        ({"OLLAMA_HOST": "gpu-box", "OLLAMA_PORT": "9999"}, "http://gpu-box:9999"),
        ({"OLLAMA_HOST": "gpu-box:1234"}, "http://gpu-box:1234"),
        ({"OLLAMA_HOST": "[::1]:1234"}, "http://[::1]:1234"),
        ({"OLLAMA_HOST": "https://ollama.example"}, "https://ollama.example"),
    ],
)
def test_ollama_address(env: pytest.MonkeyPatch, variables: dict[str, str], expected: str) -> None:
    for key, value in variables.items():
        env.setenv(key, value)
    settings = AISettings.from_env()
    assert settings.ollama_configured
    assert settings.ollama_endpoint == expected


def test_bad_values_are_refused(env: pytest.MonkeyPatch) -> None:
    env.setenv("AI_PROVIDER", "magic")
    with pytest.raises(ValueError, match="AI_PROVIDER"):
        AISettings.from_env()
    env.setenv("AI_PROVIDER", "auto")
    env.setenv("AI_SERVER_PORT", "fifty")
    with pytest.raises(ValueError, match="AI_SERVER_PORT"):
        AISettings.from_env()


def test_repr_hides_the_api_key() -> None:
    assert "sk-secret" not in repr(AISettings(openai_api_key="sk-secret"))


def chosen(settings: AISettings, provider: str, model: str) -> str:
    client = httpx.AsyncClient()  # never used: choosing a provider sends nothing
    return ProviderRegistry(settings, client).for_model(provider, model).name


@pytest.mark.parametrize(
    ("settings", "provider", "model", "expected"),
    [
        # Nothing configured: every model is answered offline.
        (AISettings(), "openai", "gpt-4", "offline"),
        (AISettings(), "ollama", "llama3.1:8b", "offline"),
        (AISettings(), "vllm", "mistral", "offline"),
        # auto: OpenAI models go to the OpenAI-compatible provider once a key or URL is set...
        (AISettings(openai_api_key="k"), "openai", "gpt-4", "openai_compat"),
        (AISettings(openai_base_url="http://x/v1"), "openai", "gpt-4", "openai_compat"),
        # ...but never Ollama models, which need Ollama's address.
        (AISettings(openai_api_key="k"), "ollama", "llama3.1:8b", "offline"),
        (AISettings(openai_base_url="http://x/v1"), "ollama", "llama3.1:8b", "offline"),
        (AISettings(ollama_base_url="http://o:1"), "ollama", "llama3.1:8b", "ollama"),
        (AISettings(ollama_base_url="http://o:1"), "openai", "gpt-4", "offline"),
        # Other providers: the OpenAI-compatible endpoint, only when its URL is set (a key alone
        # means api.openai.com, which does not serve them).
        (AISettings(openai_base_url="http://x/v1"), "vllm", "mistral", "openai_compat"),
        (AISettings(openai_api_key="k"), "vllm", "mistral", "offline"),
        # No provider in the request (an original gateway): the original catalogue decides.
        (AISettings(openai_api_key="k"), "", "gpt-4", "openai_compat"),
        (AISettings(ollama_base_url="http://o:1"), "", "llama3.1:8b", "ollama"),
        (AISettings(openai_api_key="k"), "", "unknown-model", "offline"),
        (AISettings(openai_api_key="k"), "OpenAI", "gpt-4", "openai_compat"),
        # Forced modes win over everything.
        (AISettings(provider_mode="offline", openai_api_key="k", ollama_base_url="http://o:1"), "openai", "gpt-4", "offline"),
        (AISettings(provider_mode="offline", openai_api_key="k", ollama_base_url="http://o:1"), "ollama", "llama3.1:8b", "offline"),
        (AISettings(provider_mode="openai"), "ollama", "llama3.1:8b", "openai_compat"),
        (AISettings(provider_mode="ollama"), "openai", "gpt-4", "ollama"),
    ],
)
def test_provider_choice(settings: AISettings, provider: str, model: str, expected: str) -> None:
    assert chosen(settings, provider, model) == expected
