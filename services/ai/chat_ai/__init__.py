"""The reference AI service: speaks the original ``ai_service.AIService`` gRPC contract
(``Process``) plus the ``Summarize`` extension and ``grpc.health.v1``.

Which provider answers is chosen per call (see :class:`chat_ai.providers.ProviderRegistry`):
the offline provider (deterministic, no model; its reply lists the turn's message, prompt,
history, summary, the size and sha256 of each attached file it fetched, and the model) unless
the environment points at an OpenAI-compatible endpoint or an Ollama server.

Environment (defaults in brackets): ``AI_SERVER_BIND`` [127.0.0.1; 0.0.0.0 in containers],
``AI_SERVER_PORT`` [50051], ``AI_PROVIDER`` [auto; or offline, openai, ollama to force one],
``OPENAI_API_KEY``, ``OPENAI_BASE_URL`` [https://api.openai.com/v1 when only the key is set],
``OLLAMA_BASE_URL`` or ``OLLAMA_HOST``/``OLLAMA_PORT`` [127.0.0.1 / 11434 when one is set],
``AI_PROVIDER_TIMEOUT_SECONDS`` [120], ``AI_FILE_FETCH_TIMEOUT_SECONDS`` [10],
``AI_FILE_FETCH_MAX_BYTES`` [52428800], ``AI_IMAGE_INLINE_MAX_BYTES`` [20971520],
``LOG_LEVEL`` [INFO], ``SHUTDOWN_GRACE_SECONDS`` [10].

Cost: tokens as the provider reports them, priced with the request's prices (fields 100/101),
else the original catalogue's; a model priced in neither is answered at cost 0, and a provider
that reports no usage makes a call of 0 tokens.

Failures: bad input INVALID_ARGUMENT; provider 401 UNAUTHENTICATED, 403 PERMISSION_DENIED,
404 NOT_FOUND, 429 RESOURCE_EXHAUSTED, 400/413/422 INVALID_ARGUMENT, other 4xx
FAILED_PRECONDITION, 5xx, unreachable or not speaking its API UNAVAILABLE, too slow (the
configured timeout or the caller's deadline, whichever is sooner) DEADLINE_EXCEEDED.
"""
