"""Providers, and which one answers a given model."""
from __future__ import annotations

import httpx

from chat_ai.pricing import builtin_provider
from chat_ai.providers.base import Provider
from chat_ai.providers.offline import OfflineProvider
from chat_ai.providers.ollama import OllamaProvider
from chat_ai.providers.openai_compat import OpenAICompatProvider
from chat_ai.settings import AISettings

__all__ = ["OfflineProvider", "OllamaProvider", "OpenAICompatProvider", "Provider", "ProviderRegistry"]


class ProviderRegistry:
    """Chooses the provider per call from the request's ``model_provider`` and the environment.

    ``AI_PROVIDER=offline`` (or ``openai`` / ``ollama``) sends every model to that provider.
    ``auto`` sends "openai" models to the OpenAI-compatible provider when ``OPENAI_API_KEY`` or
    ``OPENAI_BASE_URL`` is set, "ollama" models to Ollama when its address is set, models of any
    other provider to the OpenAI-compatible endpoint when ``OPENAI_BASE_URL`` is set, and
    everything else to the offline provider, so an unconfigured service still answers. A request
    without ``model_provider`` (a gateway built for the original) is routed by the provider the
    original catalogue names for the model.
    """

    def __init__(self, settings: AISettings, client: httpx.AsyncClient) -> None:
        self.settings = settings
        self.offline = OfflineProvider(
            client, fetch_timeout=settings.file_fetch_timeout_seconds, fetch_max_bytes=settings.file_fetch_max_bytes,
            stream_delay_ms=settings.offline_stream_delay_ms,
        )
        self.openai = OpenAICompatProvider(
            client, base_url=settings.openai_endpoint, api_key=settings.openai_api_key,
            fetch_timeout=settings.file_fetch_timeout_seconds, image_max_bytes=settings.image_inline_max_bytes,
        )
        self.ollama = OllamaProvider(
            client, base_url=settings.ollama_endpoint,
            fetch_timeout=settings.file_fetch_timeout_seconds, image_max_bytes=settings.image_inline_max_bytes,
        )

    def for_model(self, provider_name: str, model: str) -> Provider:
        mode = self.settings.provider_mode
        if mode == "offline":
            return self.offline
        if mode == "openai":
            return self.openai
        if mode == "ollama":
            return self.ollama
        name = (provider_name.strip() or builtin_provider(model)).lower()
        if name == "openai":
            return self.openai if self.settings.openai_configured else self.offline
        if name == "ollama":
            return self.ollama if self.settings.ollama_configured else self.offline
        if self.settings.openai_base_url:
            return self.openai
        return self.offline
