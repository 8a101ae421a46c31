"""The chat turn (protocol type 3): from a validated request to a durable, debited reply.

Order matters and is the contract's:

1. a ``turn_id``; every internal call carries it and derives its idempotency key from it
2. an existing session's context is loaded (ownership checked), else 5 -- or 3 when the user
   does not exist (looked up only then: on the way to a reply, billing's reserve is the check)
3. billing reserves an estimate, else 3 (unknown user) / 7 / 15
5. a "NEW" session is created only now, so a refused turn leaves nothing behind
6. under the session lock (all replicas): context reloaded, file checked, AI called, turn
   appended, file marked used, summary folded, reservation settled, cache rewritten

A failure before the append undoes what the turn did (reservation released, its uploaded file
and its new session removed); after the append the turn is durable and the client is told so
even when the summary or the debit must be retried later.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import grpc
import msgspec
from google.protobuf.timestamp_pb2 import Timestamp
from redis.exceptions import RedisError

from chat_common.aiproto import ai_service_pb2 as pb
from chat_common.errors import (
    AppError,
    BadRequestError,
    ForbiddenError,
    InsufficientBalanceError,
    ModelNotEntitledError,
    NotFoundError,
    ServiceUnavailableError,
    UpstreamError,
)
from chat_common.logging import request_id_var, turn_id_var
from chat_common.money import dollars_to_nanos, nanos_to_dollars
from chat_common.tracing import inject_context
from chat_gateway.chat.context_cache import ContextCache, Entry, LockTimeout, SessionContext, SessionLock
from chat_gateway.chat.naming import session_name
from chat_gateway.chat.settlements import PendingSettlements
from chat_gateway.context import GatewayContext
from chat_gateway.ws.metrics import CHAT_AI_SECONDS
from chat_gateway.ws.protocol import ChatRequest, ErrorCode, ProtocolError, is_uuid

logger = logging.getLogger(__name__)

SUMMARY_PROMPT = (
    "Progressively summarize the lines of conversation provided, adding onto the previous "
    "summary and returning a new summary. Keep every fact, name, number and decision the "
    "conversation may need later."
)
_SUMMARIZE_UNIMPLEMENTED_SECONDS = 300.0
_entries_encoder = msgspec.json.Encoder()


def last(items: list[Any], n: int) -> list[Any]:
    """The last ``n`` items (``items[-0:]`` would be all of them)."""
    return items[max(0, len(items) - n):] if n > 0 else []


def history_json(entries: list[Entry]) -> str:
    return _entries_encoder.encode(entries).decode()


def estimate_tokens(*texts: str) -> int:
    return max(1, sum(len(t) for t in texts) // 4)


def _now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


def _cost_nanos(reply: pb.Response) -> int:
    if reply.cost_nanos:
        return int(reply.cost_nanos)
    if reply.cost > 0:
        return dollars_to_nanos(reply.cost)
    return 0


class _Model(msgspec.Struct):
    model_id: int
    name: str
    provider: str = ""
    input_price_nanos_per_1k: int = 0
    output_price_nanos_per_1k: int = 0


class _Reservation(msgspec.Struct):
    reservation_id: str
    model: _Model
    amount_nanos: int = 0
    balance_nanos: int = 0


class _File(msgspec.Struct):
    file_name: str
    session_id: str | None = None
    status: str = ""


@dataclass
class _TurnState:
    """What a failing turn must undo."""

    turn_id: str
    user_id: str
    reservation_id: str | None = None
    created_session: str | None = None
    file: _File | None = None
    appended: bool = False


class TurnRunner:
    """One per gateway process; holds no per-turn state."""

    def __init__(self, gateway: GatewayContext) -> None:
        self.gw = gateway
        self.settings = gateway.settings
        self.window = max(0, self.settings.max_chat_history_context)
        self.cache = ContextCache(
            gateway.redis, gateway.sessions, window_size=self.window, ttl_seconds=self.settings.context_cache_seconds
        )
        self._summarize_missing_until = 0.0
        self.background: set[asyncio.Task[Any]] = set()
        self.pending = PendingSettlements(
            gateway.redis, gateway.billing, reconcile_after_seconds=self.settings.settle_reconcile_after_seconds
        )

    # -- entry point --------------------------------------------------------------------------

    async def run(self, request: ChatRequest, user_id: str) -> dict[str, Any]:
        turn_id = str(uuid.uuid4())
        turn_id_var.set(turn_id)
        if not is_uuid(user_id):
            raise ProtocolError(ErrorCode.USER_NOT_FOUND)
        context = None
        if not request.is_new:
            try:
                context = await self._load(request.session_id, user_id)
            except ProtocolError:
                await self._user(user_id)  # an unknown user hears 3 whatever session it named
                raise
        state = _TurnState(turn_id=turn_id, user_id=user_id)
        try:
            return await self._run(request, context, state)
        except BaseException:
            if not state.appended:
                await asyncio.shield(self._undo(state))
            raise

    async def _run(
        self, request: ChatRequest, context: SessionContext | None, state: _TurnState
    ) -> dict[str, Any]:
        user_id = state.user_id
        prompt_now = request.session_prompt if request.session_prompt is not None else (context.prompt if context else "")
        estimate = estimate_tokens(
            prompt_now,
            context.summary if context else "",
            history_json(context.window) if context else "",
            request.message,
        )
        reservation = await self._reserve(request, user_id, estimate, state)
        model = reservation.model

        if request.is_new:
            session_id = await self._create_session(request, user_id, model.name, state)
        else:
            session_id = request.session_id

        lock = SessionLock(
            self.gw.redis,
            session_id,
            ttl_seconds=self.settings.turn_lock_seconds,
            wait_seconds=self.settings.turn_lock_seconds,
        )
        try:
            await lock.acquire()
        except LockTimeout:
            raise ProtocolError(ErrorCode.SESSION_BUSY) from None
        except RedisError as exc:
            logger.error("turn lock unavailable: %s", exc)
            raise ProtocolError(ErrorCode.INTERNAL) from None
        try:
            return await self._locked(request, state, session_id, reservation)
        finally:
            await asyncio.shield(lock.release())

    async def _locked(
        self,
        request: ChatRequest,
        state: _TurnState,
        session_id: str,
        reservation: _Reservation,
    ) -> dict[str, Any]:
        user_id = state.user_id
        model = reservation.model
        # under the lock: the previous turn of this session is complete and visible
        context = await self._load(session_id, user_id, write_back=True)
        prompt = request.session_prompt if request.session_prompt is not None else context.prompt

        file_urls: list[str] = []
        if request.file_name:
            file_urls.append(await self._file_url(request.file_name, user_id, session_id, state))

        history = history_json(last(context.window, self.window))
        ai_request = pb.Request(
            user_id=user_id,
            session_id=session_id,
            chat_message=request.message,
            model_name=model.name,
            session_prompt=prompt,
            file_name=file_urls,
            chat_summary=context.summary,
            chat_history=history,
            # the balance before this turn's hold, as the original sent it
            balance=nanos_to_dollars(reservation.balance_nanos + reservation.amount_nanos),
            timestamp=_now(),
            model_provider=model.provider,
            input_price_nanos_per_1k=model.input_price_nanos_per_1k,
            output_price_nanos_per_1k=model.output_price_nanos_per_1k,
        )
        try:
            reply = await self._ai_call("process", self.gw.ai.Process, ai_request)
        except (grpc.RpcError, asyncio.TimeoutError) as exc:
            logger.warning("AI service failed the turn: %s", _grpc_text(exc))
            raise ProtocolError(ErrorCode.AI_RESPONSE) from None
        cost = _cost_nanos(reply)

        new_entries = [Entry("user", request.message), Entry("assistant", reply.response_text)]
        if request.file_name:
            new_entries.append(Entry("file", request.file_name))

        # A crash between the append and the cache write must not leave an old context behind.
        await self.cache.invalidate(session_id)
        appended = await self._append(session_id, user_id, state.turn_id, new_entries, request, model.name)
        state.appended = True

        marking = (
            asyncio.ensure_future(self._mark_used(request.file_name, user_id, session_id, state.turn_id))
            if request.file_name
            else None
        )

        # From here on the turn is stored: whatever fails, the client hears success and the
        # turn is debited.
        summary_cost = 0
        fresh: SessionContext | None = None
        try:
            fresh, summary_cost = await self._after_append(
                context, new_entries, appended, session_id, user_id, prompt, state.turn_id, model
            )
        except AppError as exc:
            logger.warning("turn stored; its context will be rebuilt: %s", exc.message)
        except Exception:
            logger.exception("turn stored, but updating its summary and context failed")
        if marking is not None:
            await marking
        await self._settle(reservation.reservation_id, cost + summary_cost, state.turn_id, state.user_id)
        state.reservation_id = None
        if fresh is not None:
            await self.cache.store(fresh)
        return {
            "user_id": user_id,
            "session_id": session_id,
            "session_name": context.name,
            "message": reply.response_text,
        }

    async def _after_append(
        self,
        context: SessionContext,
        new_entries: list[Entry],
        appended: dict[str, Any],
        session_id: str,
        user_id: str,
        prompt: str,
        turn_id: str,
        model: _Model,
    ) -> tuple[SessionContext, int]:
        """Fold the summary; returns the context the next turn starts from and the summary's cost."""
        entry_count = int(appended.get("entry_count", context.entry_count + len(new_entries)))
        combined = [*context.window, *new_entries]
        if entry_count != context.entry_count + len(new_entries):
            # someone wrote to the session outside the lock (or the cache lied): trust the service
            logger.warning("session %s grew unexpectedly; reloading its context", session_id)
            context = await self.cache.fetch(session_id, user_id)
            combined = list(context.window)
            entry_count = context.entry_count
        window_start = entry_count - len(combined) + 1
        summary, summarized_upto, summary_cost = await self._fold_summary(
            context, combined, window_start, entry_count, session_id, user_id, turn_id, model
        )
        fresh = SessionContext(
            session_id=session_id,
            owner=user_id,
            name=context.name,
            prompt=prompt,
            model_name=model.name,
            summary=summary,
            summarized_upto=summarized_upto,
            entry_count=entry_count,
            window=last(combined, self.window),
            window_size=self.window,
        )
        return fresh, summary_cost

    # -- steps --------------------------------------------------------------------------------

    async def _user(self, user_id: str) -> dict[str, Any]:
        if not is_uuid(user_id):
            raise ProtocolError(ErrorCode.USER_NOT_FOUND)
        try:
            return await self.gw.billing.get(f"/v1/users/{user_id}")
        except (NotFoundError, BadRequestError):
            raise ProtocolError(ErrorCode.USER_NOT_FOUND) from None
        except AppError as exc:
            logger.error("billing failed to look up the user: %s", exc.message)
            raise ProtocolError(ErrorCode.INTERNAL) from None

    async def _load(self, session_id: str, user_id: str, *, write_back: bool = False) -> SessionContext:
        try:
            return await self.cache.load(session_id, user_id, write_back=write_back)
        except NotFoundError:
            raise ProtocolError(ErrorCode.LOAD_SESSION) from None
        except AppError as exc:
            logger.error("could not load session context: %s", exc.message)
            raise ProtocolError(ErrorCode.LOAD_SESSION) from None

    async def _reserve(self, request: ChatRequest, user_id: str, estimate: int, state: _TurnState) -> _Reservation:
        body: dict[str, Any] = {
            "user_id": user_id,
            "input_tokens": estimate,
            "output_tokens": self.settings.reserve_output_tokens,
            "idempotency_key": f"reserve:{state.turn_id}",
            "turn_id": state.turn_id,
        }
        if request.model_name:
            body["model_name"] = request.model_name
        else:
            body["model_id"] = request.model_id
        try:
            payload = await self.gw.billing.post("/v1/reservations", json=body)
        except (ModelNotEntitledError, ForbiddenError):
            raise ProtocolError(ErrorCode.MODEL_ACCESS) from None
        except InsufficientBalanceError:
            raise ProtocolError(ErrorCode.INSUFFICIENT_BALANCE) from None
        except NotFoundError:
            raise ProtocolError(ErrorCode.USER_NOT_FOUND) from None
        except AppError as exc:
            logger.error("billing refused the reservation: %s", exc.message)
            raise ProtocolError(ErrorCode.INTERNAL) from None
        reservation = msgspec.convert(payload, _Reservation, strict=False)
        state.reservation_id = reservation.reservation_id
        return reservation

    async def _create_session(self, request: ChatRequest, user_id: str, model_name: str, state: _TurnState) -> str:
        session_id = str(uuid.uuid4())
        body = {
            "user_id": user_id,
            "name": session_name(request.message),
            "model_name": model_name,
            "prompt": request.session_prompt or "",
            "session_id": session_id,
            "idempotency_key": f"session:{state.turn_id}",
        }
        try:
            created = await self.gw.sessions.post("/v1/sessions", json=body)
        except AppError as exc:
            logger.error("could not create the session: %s", exc.message)
            raise ProtocolError(ErrorCode.CREATE_SESSION) from None
        session_id = str(created.get("session_id") or session_id)
        state.created_session = session_id
        return session_id

    async def _file_url(self, file_name: str, user_id: str, session_id: str, state: _TurnState) -> str:
        path = f"/v1/files/{quote(file_name, safe='')}"
        try:
            record = msgspec.convert(
                await self.gw.files.get(path, params={"user_id": user_id}), _File, strict=False
            )
        except (NotFoundError, BadRequestError):
            raise ProtocolError(ErrorCode.FILE_NOT_FOUND) from None
        except AppError as exc:
            logger.error("files service failed the lookup: %s", exc.message)
            raise ProtocolError(ErrorCode.INTERNAL) from None
        if record.session_id is None or str(record.session_id) != session_id:
            # a file of this user but of another session is not this turn's to use (or delete)
            raise ProtocolError(ErrorCode.FILE_NOT_FOUND)
        state.file = record
        try:
            signed = await self.gw.files.get(f"{path}/url", params={"user_id": user_id})
        except NotFoundError:
            raise ProtocolError(ErrorCode.FILE_NOT_FOUND) from None
        except AppError as exc:
            logger.error("files service failed to sign a URL: %s", exc.message)
            raise ProtocolError(ErrorCode.INTERNAL) from None
        return str(signed["url"])

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        carrier = {"x-request-id": request_id_var.get() or "", "x-turn-id": turn_id_var.get() or ""}
        inject_context(carrier)
        return tuple(carrier.items())

    async def _ai_call(self, rpc: str, method: Any, message: Any) -> pb.Response:
        started = time.perf_counter()
        try:
            return await method(message, timeout=self.settings.ai_timeout_seconds, metadata=self._metadata())
        finally:
            CHAT_AI_SECONDS.labels(rpc).observe(time.perf_counter() - started)

    async def _append(
        self,
        session_id: str,
        user_id: str,
        turn_id: str,
        entries: list[Entry],
        request: ChatRequest,
        model_name: str,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "user_id": user_id,
            "turn_id": turn_id,
            "entries": [{"role": e.role, "content": e.content} for e in entries],
            "model_name": model_name,
        }
        if request.session_prompt is not None:
            body["prompt"] = request.session_prompt
        # the turn_id makes a repeat safe, so ride out a short outage before giving the turn up
        for attempt in range(3):
            try:
                return await self.gw.sessions.post(f"/v1/sessions/{session_id}/turns", json=body)
            except (ServiceUnavailableError, UpstreamError) as exc:
                if attempt == 2:
                    logger.error("could not append the turn: %s", exc.message)
                    raise ProtocolError(ErrorCode.INTERNAL) from None
                await asyncio.sleep(0.2 * 2**attempt)
            except AppError as exc:
                logger.error("sessions refused the turn: %s", exc.message)
                raise ProtocolError(ErrorCode.INTERNAL) from None
        raise ProtocolError(ErrorCode.INTERNAL)  # pragma: no cover

    async def _mark_used(self, file_name: str, user_id: str, session_id: str, turn_id: str) -> None:
        try:
            await self.gw.files.post(
                f"/v1/files/{quote(file_name, safe='')}/used",
                json={"user_id": user_id, "session_id": session_id, "turn_id": turn_id},
            )
        except AppError as exc:
            # the entry is stored; the file stays 'attached' and the sweeper leaves attached files be
            logger.warning("could not mark file used: %s", exc.message)

    async def _fold_summary(
        self,
        context: SessionContext,
        combined: list[Entry],
        window_start: int,
        entry_count: int,
        session_id: str,
        user_id: str,
        turn_id: str,
        model: _Model,
    ) -> tuple[str, int, int]:
        """Fold every entry older than the last N into the summary. Returns the summary now in
        force, how far it reaches and what the AI charged for it. A failure keeps the old summary:
        the next turn folds the same entries again (plus the new ones)."""
        fold_upto = entry_count - self.window
        done = context.summarized_upto
        if fold_upto <= done:
            return context.summary, done, 0
        try:
            if done + 1 >= window_start:
                pending = combined[done + 1 - window_start: fold_upto + 1 - window_start]
            else:
                # earlier summaries failed: the entries to fold have left the cached window
                payload = await self.gw.sessions.get(
                    f"/v1/sessions/{session_id}/entries",
                    params={"user_id": user_id, "last": entry_count - done},
                )
                items = payload.get("items", []) if isinstance(payload, dict) else []
                older = [Entry(str(i["role"]), str(i["content"])) for i in items]
                pending = older[: fold_upto - done]
                if len(pending) != fold_upto - done:
                    raise ValueError(f"expected {fold_upto - done} entries to summarize, got {len(pending)}")
        except (AppError, KeyError, TypeError, ValueError) as exc:
            logger.warning("summary postponed: could not read entries: %s", exc)
            return context.summary, done, 0

        try:
            summary, cost = await self._summarize(context.summary, pending, session_id, user_id, model)
        except (grpc.RpcError, asyncio.TimeoutError) as exc:
            logger.warning("summary postponed: AI failed: %s", _grpc_text(exc))
            return context.summary, done, 0
        try:
            await self.gw.sessions.put(
                f"/v1/sessions/{session_id}/summary",
                json={"user_id": user_id, "summary": summary, "summarized_upto": fold_upto, "turn_id": turn_id},
            )
        except AppError as exc:
            logger.warning("summary postponed: could not store it: %s", exc.message)
            return context.summary, done, cost
        return summary, fold_upto, cost

    async def _summarize(
        self, previous: str, entries: list[Entry], session_id: str, user_id: str, model: _Model
    ) -> tuple[str, int]:
        if time.monotonic() >= self._summarize_missing_until:
            request = pb.SummaryRequest(
                user_id=user_id,
                session_id=session_id,
                model_name=model.name,
                model_provider=model.provider,
                previous_summary=previous,
                chat_entries=history_json(entries),
                timestamp=_now(),
                input_price_nanos_per_1k=model.input_price_nanos_per_1k,
                output_price_nanos_per_1k=model.output_price_nanos_per_1k,
            )
            try:
                reply = await self._ai_call("summarize", self.gw.ai.Summarize, request)
                return reply.response_text, _cost_nanos(reply)
            except grpc.RpcError as exc:
                if _grpc_code(exc) != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                # an AI service built for the original: remember, and use the original's way
                self._summarize_missing_until = time.monotonic() + _SUMMARIZE_UNIMPLEMENTED_SECONDS
        lines = "\n".join(f"{e.role}: {e.content}" for e in entries)
        fallback = pb.Request(
            user_id=user_id,
            session_id=session_id,
            chat_message=f"Current summary:\n{previous}\n\nNew lines of conversation:\n{lines}\n\nNew summary:",
            model_name=model.name,
            session_prompt=SUMMARY_PROMPT,
            chat_summary="",
            chat_history="[]",
            timestamp=_now(),
            model_provider=model.provider,
            input_price_nanos_per_1k=model.input_price_nanos_per_1k,
            output_price_nanos_per_1k=model.output_price_nanos_per_1k,
        )
        reply = await self._ai_call("process_summary", self.gw.ai.Process, fallback)
        return reply.response_text, _cost_nanos(reply)

    async def _settle(self, reservation_id: str, cost_nanos: int, turn_id: str, user_id: str) -> None:
        body = {
            "cost_nanos": cost_nanos,
            "idempotency_key": f"settle:{turn_id}",
            "turn_id": turn_id,
            "user_id": user_id,
        }
        path = f"/v1/reservations/{reservation_id}/settle"
        # Recorded first: should this process die before billing answers, another replica
        # replays the same (idempotent) call.
        await self.pending.remember(turn_id, path, body)
        for attempt in range(3):
            if await self.pending.settle(turn_id, path, body):
                return
            if attempt < 2:
                await asyncio.sleep(0.1 * 2**attempt)
        # The turn is stored, so the client hears success; the debit keeps being retried here,
        # and by any replica's reconciliation should this process go away.
        logger.error("settle of reservation %s postponed; retrying in the background", reservation_id)
        self.spawn(self._settle_later(turn_id, path, body))

    async def _settle_later(self, turn_id: str, path: str, body: dict[str, Any]) -> None:
        delay = 1.0
        for _ in range(20):
            await asyncio.sleep(delay)
            if await self.pending.settle(turn_id, path, body):
                logger.info("postponed settle done: %s", path)
                return
            delay = min(60.0, delay * 2)
        logger.error("gave up settling %s here; it stays pending for reconciliation", path)

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """A task that outlives the socket that asked for it (kept referenced until done)."""
        task = asyncio.create_task(coro)
        self.background.add(task)
        task.add_done_callback(_forget)
        task.add_done_callback(self.background.discard)
        return task

    async def _undo(self, state: _TurnState) -> None:
        """Best effort: each step on its own, none may hide the original error."""
        if state.reservation_id:
            try:
                await self.gw.billing.post(
                    f"/v1/reservations/{state.reservation_id}/release",
                    json={"idempotency_key": f"release:{state.turn_id}", "user_id": state.user_id},
                )
            except AppError as exc:
                # billing's sweeper releases it when it expires
                logger.warning("could not release reservation %s: %s", state.reservation_id, exc.message)
        if state.file is not None and state.file.status != "used":
            try:
                await self.gw.files.delete(
                    f"/v1/files/{quote(state.file.file_name, safe='')}", params={"user_id": state.user_id}
                )
            except AppError as exc:
                logger.warning("could not remove the failed turn's file: %s", exc.message)
        if state.created_session:
            try:
                await self.gw.sessions.delete(
                    f"/v1/sessions/{state.created_session}", params={"user_id": state.user_id}
                )
                await self.cache.invalidate(state.created_session)
            except AppError as exc:
                logger.warning("could not remove the failed turn's new session: %s", exc.message)

    async def drain(self, timeout: float) -> None:
        if self.background:
            await asyncio.wait(list(self.background), timeout=timeout)


def _forget(task: asyncio.Task[Any]) -> None:
    # When the socket is gone nobody awaits the outcome; fetching it here keeps asyncio from
    # logging "exception was never retrieved" for an ordinary error reply that had no reader.
    if not task.cancelled():
        task.exception()


def _grpc_code(exc: BaseException) -> grpc.StatusCode | None:
    code = getattr(exc, "code", None)
    try:
        return code() if callable(code) else None
    except Exception:
        return None


def _grpc_text(exc: BaseException) -> str:
    code = _grpc_code(exc)
    if code is None:
        return type(exc).__name__
    details = getattr(exc, "details", None)
    text = details() if callable(details) else ""
    return f"{code.name}: {text}"[:300]
