"""OpenTelemetry tracing, off unless ``OTEL_ENABLED=true``. When on, spans go to the OTLP/HTTP
endpoint of the standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` key, and trace context travels on every
internal HTTP call and gRPC call, so one chat turn is one trace across the services."""
from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from chat_common.settings import env_bool

_provider: Any = None


def tracing_enabled() -> bool:
    return env_bool("OTEL_ENABLED", False)


def configure_tracing(service: str) -> Any:
    """Install the process-wide tracer provider once; returns it (None when tracing is off)."""
    global _provider
    if not tracing_enabled():
        return None
    if _provider is None:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter,
        )
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(resource=Resource.create({"service.name": f"chat-{service}"}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
        _provider = provider
    return _provider


def shutdown_tracing() -> None:
    if _provider is not None:
        _provider.shutdown()


def inject_context(carrier: MutableMapping[str, str]) -> None:
    """Add ``traceparent`` (and friends) for the current span to outgoing headers or metadata."""
    if _provider is None:
        return
    from opentelemetry import propagate

    propagate.inject(carrier)


def extract_context(carrier: dict[str, str]) -> Any:
    if _provider is None:
        return None
    from opentelemetry import propagate

    return propagate.extract(carrier)


def start_span(name: str, carrier: dict[str, str] | None = None, **attributes: Any) -> Any:
    """A span as a context manager (a no-op one when tracing is off)."""
    from contextlib import nullcontext

    if _provider is None:
        return nullcontext()
    from opentelemetry import trace

    tracer = trace.get_tracer("chat-backend")
    context = extract_context(carrier) if carrier is not None else None
    return tracer.start_as_current_span(name, context=context, attributes=attributes or None)
