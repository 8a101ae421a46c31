"""The ``ai_service.AIService`` servicer: validates a call, lets the chosen provider answer it,
prices it, and answers failures with the gRPC status their cause calls for."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, NoReturn

import grpc
import httpx

from chat_ai.pricing import call_cost
from chat_ai.providers import ProviderRegistry
from chat_ai.providers.base import (
    MAX_FILES_PER_CALL,
    AIError,
    ChatCall,
    Completion,
    SummaryCall,
    invalid_argument,
    parse_entries,
)
from chat_ai.settings import AISettings
from chat_common.aiproto import ai_service_pb2, ai_service_pb2_grpc
from chat_common.logging import request_id_var, turn_id_var
from chat_common.proto_time import timestamp_now
from chat_common.tracing import start_span

logger = logging.getLogger("chat_ai.service")

# Leave the caller a moment to receive our DEADLINE_EXCEEDED before its own deadline fires.
DEADLINE_MARGIN_SECONDS = 0.05


def chat_call(request: ai_service_pb2.Request) -> ChatCall:
    if not request.chat_message.strip():
        raise invalid_argument("chat_message is empty")
    if not request.model_name.strip():
        raise invalid_argument("model_name is empty")
    # A gateway built for the original sends [""] when the turn has no file.
    files = tuple(url.strip() for url in request.file_name if url.strip())
    if len(files) > MAX_FILES_PER_CALL:
        raise invalid_argument(f"at most {MAX_FILES_PER_CALL} files per call, got {len(files)}")
    max_output: int | None = None
    if request.HasField("max_output_tokens"):
        max_output = request.max_output_tokens
        if max_output < 1:
            raise invalid_argument(f"max_output_tokens must be at least 1, got {max_output}")
    return ChatCall(
        model=request.model_name.strip(),
        message=request.chat_message,
        prompt=request.session_prompt,
        summary=request.chat_summary,
        history=parse_entries(request.chat_history, "chat_history"),
        files=files,
        max_output_tokens=max_output,
    )


def summary_call(request: ai_service_pb2.SummaryRequest) -> SummaryCall:
    if not request.model_name.strip():
        raise invalid_argument("model_name is empty")
    return SummaryCall(
        model=request.model_name.strip(),
        previous_summary=request.previous_summary,
        entries=parse_entries(request.chat_entries, "chat_entries"),
    )


@contextlib.contextmanager
def call_ids(context: grpc.aio.ServicerContext) -> Iterator[None]:
    """Puts the caller's ``x-request-id``/``x-turn-id`` into every log line of this call."""
    metadata = {key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)}
    request_token = request_id_var.set(metadata.get("x-request-id", "")[:128])
    turn_token = turn_id_var.set(metadata.get("x-turn-id", "")[:128])
    try:
        with start_span("ai.call", metadata):
            yield
    finally:
        request_id_var.reset(request_token)
        turn_id_var.reset(turn_token)


class AIService(ai_service_pb2_grpc.AIServiceServicer):
    def __init__(self, settings: AISettings, client: httpx.AsyncClient | None = None) -> None:
        self.settings = settings
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(
            timeout=settings.provider_timeout_seconds,
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
        )
        self.providers = ProviderRegistry(settings, self._client)

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def Process(
        self, request: ai_service_pb2.Request, context: grpc.aio.ServicerContext
    ) -> ai_service_pb2.Response:
        return await self._serve("Process", request, context, chat_call, lambda p, call, t: p.chat(call, t))

    async def Summarize(
        self, request: ai_service_pb2.SummaryRequest, context: grpc.aio.ServicerContext
    ) -> ai_service_pb2.Response:
        return await self._serve("Summarize", request, context, summary_call, lambda p, call, t: p.summarize(call, t))

    async def ProcessStream(
        self, request: ai_service_pb2.Request, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ai_service_pb2.StreamChunk]:
        """The reply delta by delta; every chunk carries the usage and cost so far when the
        provider reports them, the last one (``done``) the whole call's. A cancelled call (the
        client went away or cancelled) stops the provider's upstream request."""
        with call_ids(context):
            started = time.perf_counter()
            model = request.model_name.strip()
            provider_name = ""
            input_tokens = output_tokens = 0
            prices = (request.input_price_nanos_per_1k, request.output_price_nanos_per_1k)
            try:
                call = chat_call(request)
                provider = self.providers.for_model(request.model_provider, call.model)
                provider_name = provider.name
                timeout = self._timeout(context)
                pieces = provider.stream(call, timeout)
                try:
                    async with asyncio.timeout(timeout):
                        async for piece in pieces:
                            input_tokens = max(input_tokens, piece.input_tokens)
                            output_tokens = max(output_tokens, piece.output_tokens)
                            yield self._chunk(piece.delta, False, model, input_tokens, output_tokens, prices)
                finally:
                    await pieces.aclose()
            except asyncio.CancelledError:
                raise
            except TimeoutError:
                await self._abort(
                    context, "ProcessStream",
                    AIError(grpc.StatusCode.DEADLINE_EXCEEDED, "the provider did not finish within the deadline"),
                    request.model_name, provider_name,
                )
            except Exception as exc:  # noqa: BLE001 - every failure becomes a status
                await self._abort(context, "ProcessStream", exc, request.model_name, provider_name)
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug(
                    "ProcessStream answered", extra=self._fields("ProcessStream", model, provider_name, started)
                    | {"input_tokens": input_tokens, "output_tokens": output_tokens},
                )
            yield self._chunk("", True, model, input_tokens, output_tokens, prices)

    @staticmethod
    def _chunk(
        delta: str, done: bool, model: str, input_tokens: int, output_tokens: int, prices: tuple[int, int]
    ) -> ai_service_pb2.StreamChunk:
        cost_nanos, cost = (0, 0.0)
        if input_tokens or output_tokens:
            cost_nanos, cost = call_cost(model, input_tokens, output_tokens, *prices)
        return ai_service_pb2.StreamChunk(
            delta=delta, done=done, cost=cost, timestamp=timestamp_now(),
            input_tokens=input_tokens, output_tokens=output_tokens, cost_nanos=cost_nanos,
        )

    async def _serve(
        self,
        rpc: str,
        request: ai_service_pb2.Request | ai_service_pb2.SummaryRequest,
        context: grpc.aio.ServicerContext,
        parse: Callable[[Any], Any],
        run: Callable[[Any, Any, float], Awaitable[Any]],
    ) -> ai_service_pb2.Response:
        """Both RPCs: parse, pick the provider for the model, run, price; any failure becomes a
        gRPC status in ``_abort``."""
        with call_ids(context):
            started = time.perf_counter()
            provider_name = ""
            try:
                call = parse(request)
                provider = self.providers.for_model(request.model_provider, call.model)
                provider_name = provider.name
                completion = await run(provider, call, self._timeout(context))
            except Exception as exc:  # noqa: BLE001 - every failure becomes a status below
                await self._abort(context, rpc, exc, request.model_name, provider_name)
            return self._answer(
                rpc, completion, request.model_name.strip(), provider_name, started,
                request.input_price_nanos_per_1k, request.output_price_nanos_per_1k,
            )

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        timeout = self.settings.provider_timeout_seconds
        remaining = context.time_remaining()
        if remaining is not None:
            if remaining <= DEADLINE_MARGIN_SECONDS:
                raise AIError(grpc.StatusCode.DEADLINE_EXCEEDED, "the call's deadline has already passed")
            timeout = min(timeout, remaining - DEADLINE_MARGIN_SECONDS)
        return timeout

    def _answer(
        self, rpc: str, completion: Completion, model: str, provider: str, started: float,
        input_price: int, output_price: int,
    ) -> ai_service_pb2.Response:
        cost_nanos, cost = call_cost(
            model, completion.input_tokens, completion.output_tokens, input_price, output_price
        )
        # Per call at DEBUG only: the hot path logs nothing at INFO (failures still warn/error).
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "%s answered", rpc,
                extra=self._fields(rpc, model, provider, started) | {
                    "input_tokens": completion.input_tokens,
                    "output_tokens": completion.output_tokens,
                    "cost_nanos": cost_nanos,
                },
            )
        return ai_service_pb2.Response(
            response_text=completion.text,
            cost=cost,
            timestamp=timestamp_now(),
            input_tokens=completion.input_tokens,
            output_tokens=completion.output_tokens,
            cost_nanos=cost_nanos,
        )

    async def _abort(
        self, context: grpc.aio.ServicerContext, rpc: str, exc: Exception, model: str, provider: str
    ) -> NoReturn:
        fields = self._fields(rpc, model, provider, None)
        if isinstance(exc, AIError) and exc.expected:
            fields["status"] = exc.code.name
            logger.warning("%s failed: %s", rpc, exc.message, extra=fields)
            await context.abort(exc.code, exc.message)
        logger.exception("%s failed unexpectedly", rpc, extra=fields, exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error in the AI service")
        raise AssertionError("context.abort returned")  # it raises; this keeps NoReturn honest

    @staticmethod
    def _fields(rpc: str, model: str, provider: str, started: float | None) -> dict[str, Any]:
        fields: dict[str, Any] = {"rpc": rpc, "model": model, "provider": provider}
        if started is not None:
            fields["duration_ms"] = round((time.perf_counter() - started) * 1000, 1)
        return fields
