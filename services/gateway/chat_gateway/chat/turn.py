"""The chat turn (protocol type 3): from a validated request to a stored, charged reply.

The order, and why:

1. a ``turn_id``; every internal call carries it and the idempotency of each write derives
   from it (reserve, create, append and settle are all safe to repeat);
2. the session's lock (all replicas), which also reads its cached context in the same Redis
   round trip; a foreign session is 5, or 3 when the user does not exist;
3. billing holds an estimate (3 / 7 / 15 when refused); the hold is a short lease that this
   process renews while the turn runs, so a turn whose gateway died gives its money back soon;
4. a ``"NEW"`` session is created only now, so a refused turn leaves nothing behind;
5. the file is checked, the AI is called;
6. the append: entries and what the turn owes commit together in the sessions service (its
   outbox), fenced by the entry count the turn saw, so no stale turn is ever stored and no
   stored turn is ever left uncharged, whatever dies afterwards;
7. the hold is settled (so a balance read right after the reply shows the charge) and the reply
   goes out; when the summary would next leave a gap, it is folded after the reply, still under
   the lock, so the next turn of the session starts from it.

Until the append every step that succeeded has its undo on a stack (hold, new session, file),
run in reverse should the turn fail; from the append on nothing is undone: the turn is stored.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import grpc
import msgspec
from redis.exceptions import RedisError

from chat_common import contracts as c
from chat_common.aiproto import ai_service_pb2 as pb
from chat_common.client import correlation_headers
from chat_common.errors import (
    AppError,
    BadRequestError,
    DailyLimitError,
    ForbiddenError,
    InsufficientBalanceError,
    MonthlyLimitError,
    NotFoundError,
    ServiceUnavailableError,
    SessionLimitError,
    StaleTurnError,
    UpstreamError,
)
from chat_common.logging import turn_id_var
from chat_common.money import dollars_to_nanos, nanos_to_dollars
from chat_common.proto_time import timestamp_now
from chat_gateway.chat.context_cache import (
    ContextStore,
    Entry,
    LockTimeout,
    SessionContext,
    context_from_remote,
)
from chat_gateway.chat.naming import session_name
from chat_gateway.chat.outbox import OwedCharges
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
# How long an append whose outcome is unknown is asked after (by turn id) before giving up.
CONFIRM_SECONDS = 10.0
APPEND_ATTEMPTS = 3
_entries_encoder = msgspec.json.Encoder()

# -- what a refused step tells the client (docs/protocol-errors.md); anything else is 14 ----------

REFUSALS: dict[str, tuple[tuple[type[AppError], ErrorCode], ...]] = {
    "load": ((AppError, ErrorCode.LOAD_SESSION),),
    "user": ((NotFoundError, ErrorCode.USER_NOT_FOUND), (BadRequestError, ErrorCode.USER_NOT_FOUND)),
    "reserve": (
        (ForbiddenError, ErrorCode.MODEL_ACCESS),  # model_not_entitled is a ForbiddenError
        (DailyLimitError, ErrorCode.DAILY_LIMIT),
        (MonthlyLimitError, ErrorCode.MONTHLY_LIMIT),
        (SessionLimitError, ErrorCode.SESSION_LIMIT),
        (InsufficientBalanceError, ErrorCode.INSUFFICIENT_BALANCE),
        (NotFoundError, ErrorCode.USER_NOT_FOUND),
    ),
    "create": ((AppError, ErrorCode.CREATE_SESSION),),
    "file": ((NotFoundError, ErrorCode.FILE_NOT_FOUND), (BadRequestError, ErrorCode.FILE_NOT_FOUND)),
}


def refusal(step: str, exc: AppError) -> ProtocolError:
    """The protocol error for a service's refusal of ``step``; failures that are not the
    client's doing (outages, 5xx) are logged."""
    if exc.status_code >= 500:
        logger.error("%s failed: %s", step, exc.message)
    for kind, code in REFUSALS.get(step, ()):
        if isinstance(exc, kind):
            return ProtocolError(code)
    if exc.status_code < 500:
        logger.error("%s refused: %s", step, exc.message)
    return ProtocolError(ErrorCode.INTERNAL)


# -- small pure helpers -------------------------------------------------------------------------


def last(items: list[Any], n: int) -> list[Any]:
    """The last ``n`` items (``items[-0:]`` would be all of them)."""
    return items[max(0, len(items) - n):] if n > 0 else []


def history_json(entries: list[Entry]) -> str:
    return _entries_encoder.encode(entries).decode()


def estimate_tokens(*texts: str) -> int:
    return max(1, sum(len(t) for t in texts) // 4)


def _tokens(reply: pb.Response) -> tuple[int, int]:
    """Tokens in and out as the AI service reported them (0 when it reports none)."""
    return int(reply.input_tokens), int(reply.output_tokens)


def _cost_nanos(reply: pb.Response) -> int:
    if reply.cost_nanos:
        return int(reply.cost_nanos)
    if reply.cost > 0:
        return dollars_to_nanos(reply.cost)
    return 0


# -- the turn -----------------------------------------------------------------------------------


@dataclass
class Turn:
    """One chat turn's values, filled in step by step."""

    request: ChatRequest
    user_id: str
    turn_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    session_id: str = ""
    lock_token: str | None = None
    context: SessionContext | None = None
    reservation: c.Reservation | None = None
    file_name: str | None = None  # the canonical name, as the files service issued it
    file_urls: list[str] = field(default_factory=list)
    reply_text: str = ""
    cost_nanos: int = 0
    stored: c.TurnResult | None = None
    # what the AI was given and reported, for billing's receipt (sent with the settle)
    receipt: c.ReceiptDetails | None = None
    summary_tokens: tuple[int, int] = (0, 0)  # the last fold's, as the AI reported them
    # a streamed turn (docs/protocol.md, "Extensions"): where its deltas go (chat/streams.py), and how it ended
    sink: Any = None
    finish_reason: str = "stop"

    def __post_init__(self) -> None:
        if self.sink is not None:
            self.turn_id = self.sink.turn_id

    @property
    def model(self) -> c.ModelInfo:
        assert self.reservation is not None
        return self.reservation.model

    def prompt(self) -> str:
        if self.request.session_prompt is not None:
            return self.request.session_prompt
        return self.context.prompt if self.context is not None else ""


class TurnRunner:
    """One per gateway process; per-turn state lives in :class:`Turn`."""

    def __init__(self, gateway: GatewayContext) -> None:
        self.gw = gateway
        self.settings = gateway.settings
        self.window = max(0, self.settings.max_chat_history_context)
        self.store = ContextStore(
            gateway.redis,
            window_size=self.window,
            ttl_seconds=self.settings.context_cache_seconds,
            lease_seconds=self.settings.turn_lock_lease_seconds,
            wait_seconds=self.settings.turn_lock_seconds,
        )
        self.owed = OwedCharges(gateway.sessions, gateway.billing, grace_seconds=self.settings.outbox_grace_seconds)
        self._summarize_missing_until = 0.0
        self.background: set[asyncio.Task[Any]] = set()
        # open holds of running turns (reservation id -> user id), renewed while they run
        self.holds: dict[str, str] = {}
        self._holds_seen: set[str] = set()

    # -- entry point ----------------------------------------------------------------------------

    async def run(self, request: ChatRequest, user_id: str, sink: Any = None) -> dict[str, Any]:
        """``sink`` (chat/streams.py) makes the generate step streamed; all else is the same."""
        turn = Turn(request=request, user_id=user_id, sink=sink)
        turn_id_var.set(turn.turn_id)
        if not is_uuid(user_id):
            raise ProtocolError(ErrorCode.USER_NOT_FOUND)
        try:
            async with AsyncExitStack() as undo:
                await self._prepare(turn, undo)
                if turn.sink is not None:
                    await turn.sink.started(turn)  # checks passed: the client hears the turn id
                await self._generate_and_append(turn, undo)
        except NothingProduced:
            # a streamed turn cancelled before any text: nothing stored, the hold released
            if turn.lock_token is not None:
                await asyncio.shield(self.store.unlock(turn.session_id, turn.lock_token, None))
            return self._reply(turn)
        except BaseException:
            if turn.lock_token is not None:
                # the context is not written back: the next turn rebuilds it from sessions
                await asyncio.shield(self.store.unlock(turn.session_id, turn.lock_token, None))
            raise
        finally:
            if turn.reservation is not None:
                self.holds.pop(turn.reservation.reservation_id, None)
        # Stored: from here on the client hears success, whatever fails.
        await self._settle(turn)
        context = self._next_context(turn)
        token = turn.lock_token
        assert token is not None and turn.context is not None
        if context is not None and context.has_gap():
            self.spawn(self._fold_then_unlock(turn, context, token))
        else:
            await self.store.unlock(turn.session_id, token, context)
        return self._reply(turn)

    @staticmethod
    def _reply(turn: Turn) -> dict[str, Any]:
        reply = {
            "user_id": turn.user_id,
            "session_id": turn.session_id,
            "session_name": turn.context.name if turn.context is not None else "",
            "message": turn.reply_text,
        }
        if turn.sink is not None:
            reply["turn_id"] = turn.turn_id
            reply["finish_reason"] = turn.finish_reason
        return reply

    # -- before the AI --------------------------------------------------------------------------

    async def _prepare(self, turn: Turn, undo: AsyncExitStack) -> None:
        request = turn.request
        if not request.is_new:
            turn.session_id = request.session_id
            await self._lock_existing(turn)
        estimate = estimate_tokens(
            turn.prompt(),
            turn.context.summary if turn.context else "",
            history_json(turn.context.window()) if turn.context else "",
            request.message,
        )
        await self._reserve(turn, estimate)
        assert turn.reservation is not None
        undo.push_async_callback(self._release_hold, turn)
        if request.is_new:
            await self._create_session(turn, undo)
        if turn.context is not None and turn.context.has_gap():
            # the fold after the previous turn did not happen (its gateway died, or the AI
            # failed it): fold now, so that the AI sees no gap
            await self._fold(turn, turn.context)
        if request.file_name:
            await self._attach_file(turn, request.file_name, undo)

    async def _lock_existing(self, turn: Turn) -> None:
        try:
            turn.lock_token, cached = await self.store.lock(turn.session_id, read_context=True)
        except LockTimeout:
            raise ProtocolError(ErrorCode.SESSION_BUSY) from None
        except RedisError as exc:
            logger.error("turn lock unavailable: %s", exc)
            raise ProtocolError(ErrorCode.INTERNAL) from None
        if cached is not None and cached.owner == turn.user_id:
            turn.context = cached
        else:
            turn.context = await self._fetch_context(turn)

    async def _fetch_context(self, turn: Turn) -> SessionContext:
        """From the sessions service (the truth), with every entry the summary lacks."""
        try:
            remote = await self.gw.sessions.context(turn.session_id, turn.user_id, self.window)
        except NotFoundError:
            await self._check_user(turn.user_id)  # an unknown user hears 3 whatever session it named
            raise ProtocolError(ErrorCode.LOAD_SESSION) from None
        except AppError as exc:
            raise refusal("load", exc) from None
        if remote.session.user_id != turn.user_id:  # the service already checks; belt and braces
            raise ProtocolError(ErrorCode.LOAD_SESSION)
        context = context_from_remote(remote, self.window)
        if context.unsummarized() is None:
            missing = context.entry_count - context.summarized_upto
            try:
                older = await self.gw.sessions.last_entries(turn.session_id, turn.user_id, missing)
            except AppError as exc:
                raise refusal("load", exc) from None
            context.entries = [Entry(e.role, e.content) for e in older.items]
        return context

    async def _check_user(self, user_id: str) -> None:
        try:
            await self.gw.billing.user(user_id)
        except AppError as exc:
            raise refusal("user", exc) from None

    async def _reserve(self, turn: Turn, estimate: int) -> None:
        request = turn.request
        if request.is_new:
            # the new session's id is chosen now, so its hold counts against its own limit
            turn.session_id = str(uuid.uuid4())
        body = c.ReserveRequest(
            user_id=turn.user_id,
            input_tokens=estimate,
            output_tokens=self.settings.reserve_output_tokens,
            turn_id=turn.turn_id,
            idempotency_key=f"reserve:{turn.turn_id}",
            model_name=request.model_name or None,
            model_id=None if request.model_name else request.model_id,
            ttl_seconds=int(self.settings.reservation_lease_seconds),
            session_id=turn.session_id,
            # a balance-aware user or model: a smaller hold, down to this many output tokens
            min_output_tokens=self.settings.balance_aware_min_output_tokens,
        )
        try:
            turn.reservation = await self.gw.billing.reserve(body)
        except AppError as exc:
            raise refusal("reserve", exc) from None
        self.holds[turn.reservation.reservation_id] = turn.user_id

    async def _release_hold(self, turn: Turn) -> None:
        assert turn.reservation is not None
        try:
            await self.gw.billing.release(
                turn.reservation.reservation_id,
                c.ReleaseRequest(idempotency_key=f"release:{turn.turn_id}", user_id=turn.user_id),
            )
        except AppError as exc:  # its lease runs out and billing's sweep releases it
            logger.warning("could not release reservation %s: %s", turn.reservation.reservation_id, exc.message)

    async def _create_session(self, turn: Turn, undo: AsyncExitStack) -> None:
        request = turn.request
        body = c.SessionCreate(
            user_id=turn.user_id,
            name=session_name(request.message),
            model_name=turn.model.name,
            prompt=request.session_prompt or "",
            session_id=turn.session_id,
            idempotency_key=f"session:{turn.turn_id}",
        )
        try:
            created = await self.gw.sessions.create(body)
        except AppError as exc:
            raise refusal("create", exc) from None
        turn.session_id = created.session_id
        undo.push_async_callback(self._remove_session, turn)
        # nobody else knows this id yet: the lock is free, and is taken only so that the next
        # turn waits for this one's fold
        try:
            turn.lock_token, _ = await self.store.lock(turn.session_id, read_context=False)
        except (LockTimeout, RedisError) as exc:
            logger.error("turn lock unavailable: %s", exc)
            raise ProtocolError(ErrorCode.INTERNAL) from None
        turn.context = SessionContext(
            session_id=created.session_id,
            owner=turn.user_id,
            name=created.session_name,
            prompt=created.prompt,
            model_name=created.model_name,
            window_size=self.window,
        )

    async def _remove_session(self, turn: Turn) -> None:
        try:
            await self.gw.sessions.remove(turn.session_id, turn.user_id)
        except AppError as exc:
            logger.warning("could not remove the failed turn's new session: %s", exc.message)

    async def _attach_file(self, turn: Turn, file_name: str, undo: AsyncExitStack) -> None:
        try:
            record = await self.gw.files.record(file_name, turn.user_id)
        except AppError as exc:
            raise refusal("file", exc) from None
        if record.session_id is None or record.session_id != turn.session_id:
            # a file of this user but of another session is not this turn's to use (or delete)
            raise ProtocolError(ErrorCode.FILE_NOT_FOUND)
        turn.file_name = record.file_name
        if record.status != "used":
            undo.push_async_callback(self._remove_file, turn)
        try:
            signed = await self.gw.files.signed_url(record.file_name, turn.user_id)
        except AppError as exc:
            raise refusal("file", exc) from None
        turn.file_urls.append(signed.url)

    async def _remove_file(self, turn: Turn) -> None:
        assert turn.file_name is not None
        try:
            await self.gw.files.remove(turn.file_name, turn.user_id)
        except AppError as exc:
            logger.warning("could not remove the failed turn's file: %s", exc.message)

    # -- the AI ---------------------------------------------------------------------------------

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return tuple(correlation_headers().items())

    async def _ai_call(self, rpc: str, method: Any, message: Any) -> pb.Response:
        started = time.perf_counter()
        try:
            return await method(message, timeout=self.settings.ai_timeout_seconds, metadata=self._metadata())
        finally:
            CHAT_AI_SECONDS.labels(rpc).observe(time.perf_counter() - started)

    async def _generate(self, turn: Turn) -> None:
        context = turn.context
        reservation = turn.reservation
        assert context is not None and reservation is not None
        model = reservation.model
        window = context.window()
        turn.receipt = receipt = c.ReceiptDetails(
            first_seq=context.entry_count - len(window) if window else None,
            last_seq=context.entry_count - 1 if window else None,
            summarized_upto=context.summarized_upto,
            prompt_sha256=hashlib.sha256(turn.prompt().encode()).hexdigest(),
        )
        ai_request = pb.Request(
            user_id=turn.user_id,
            session_id=turn.session_id,
            chat_message=turn.request.message,
            model_name=model.name,
            session_prompt=turn.prompt(),
            file_name=turn.file_urls,
            chat_summary=context.summary,
            chat_history=history_json(context.window()),
            # the balance before this turn's hold, as the original sent it
            balance=nanos_to_dollars(reservation.balance_nanos + reservation.amount_nanos),
            timestamp=timestamp_now(),
            model_provider=model.provider,
            input_price_nanos_per_1k=model.input_price_nanos_per_1k,
            output_price_nanos_per_1k=model.output_price_nanos_per_1k,
        )
        if reservation.max_output_tokens is not None:  # a smaller hold (balance-aware): a shorter reply
            ai_request.max_output_tokens = reservation.max_output_tokens
        if turn.sink is not None:
            # streamed: deltas go out as they come; sets reply_text, cost_nanos, finish_reason
            await turn.sink.generate(self, turn, ai_request)
            return
        try:
            reply = await self._ai_call("process", self.gw.ai.Process, ai_request)
        except (grpc.RpcError, asyncio.TimeoutError) as exc:
            logger.warning("AI service failed the turn: %s", _grpc_text(exc))
            raise ProtocolError(ErrorCode.AI_RESPONSE) from None
        turn.reply_text = reply.response_text
        turn.cost_nanos = _cost_nanos(reply)
        receipt.input_tokens, receipt.output_tokens = _tokens(reply)

    # -- the append -----------------------------------------------------------------------------

    async def _generate_and_append(self, turn: Turn, undo: AsyncExitStack) -> None:
        """Call the AI and store the turn. A stale turn (the session moved on since its context
        was read: a cached context left behind by a gateway that died after its append, or a
        lock Redis forgot) is asked again once, on the history the sessions service holds."""
        for attempt in range(2):
            await self._generate(turn)
            try:
                await self._append(turn, undo)
                return
            except _StaleTurn:
                await self.store.invalidate(turn.session_id)
                if attempt == 1 or turn.sink is not None:  # a streamed reply was sent already
                    raise ProtocolError(ErrorCode.INTERNAL) from None
                turn.context = await self._fetch_context(turn)
                if turn.context.has_gap():
                    await self._fold(turn, turn.context)

    def _entries(self, turn: Turn) -> list[c.EntryIn]:
        entries = [
            c.EntryIn(role="user", content=turn.request.message),
            c.EntryIn(role="assistant", content=turn.reply_text),
        ]
        if turn.file_name:
            entries.append(c.EntryIn(role="file", content=turn.file_name))
        return entries

    async def _append(self, turn: Turn, undo: AsyncExitStack) -> None:
        context, reservation = turn.context, turn.reservation
        assert context is not None and reservation is not None
        body = c.TurnAppend(
            user_id=turn.user_id,
            turn_id=turn.turn_id,
            entries=self._entries(turn),
            expected_entry_count=context.entry_count,
            prompt=turn.request.session_prompt,
            model_name=reservation.model.name,
            charge=c.OwedCharge(
                cost_nanos=turn.cost_nanos,
                reservation_id=reservation.reservation_id,
                model_name=reservation.model.name,
                receipt=turn.receipt,
            ),
        )
        for attempt in range(APPEND_ATTEMPTS):
            try:
                turn.stored = await self.gw.sessions.append(turn.session_id, body)
                break
            except StaleTurnError as exc:
                # Another turn was stored since this one read the session: this one is
                # refused, never stored out of order.
                logger.warning("turn refused as stale: %s", exc.message)
                raise _StaleTurn() from None
            except (ServiceUnavailableError, UpstreamError) as exc:
                logger.warning("append outcome unknown (%s); asking by turn id", exc.message)
                found = await self._confirm(turn)
                if found is None:
                    # Not known either way: it may be stored, so nothing may be undone (the
                    # outbox charges it if it is; the hold's lease gives the money back if not).
                    undo.pop_all()
                    raise ProtocolError(ErrorCode.INTERNAL) from None
                if found:
                    break
                if attempt + 1 == APPEND_ATTEMPTS:
                    raise ProtocolError(ErrorCode.INTERNAL) from None
            except AppError as exc:
                logger.error("sessions refused the turn: %s", exc.message)
                raise ProtocolError(ErrorCode.INTERNAL) from None
        undo.pop_all()  # stored: nothing of it is undone any more

    async def _confirm(self, turn: Turn) -> bool | None:
        """Was the turn stored? True, False, or None when the sessions service cannot say."""
        deadline = time.monotonic() + CONFIRM_SECONDS
        delay = 0.2
        while True:
            try:
                turn.stored = await self.gw.sessions.stored_turn(turn.session_id, turn.turn_id, turn.user_id)
                return True
            except NotFoundError:
                return False
            except AppError as exc:
                if time.monotonic() + delay > deadline:
                    logger.error("could not learn whether turn %s was stored: %s", turn.turn_id, exc.message)
                    return None
            await asyncio.sleep(delay)
            delay = min(2.0, delay * 2)

    # -- after the append -----------------------------------------------------------------------

    async def _settle(self, turn: Turn) -> None:
        """Charge now, so that a balance read right after the reply shows it. Should billing not
        answer, the charge is in the sessions outbox already and the worker settles it."""
        reservation = turn.reservation
        assert reservation is not None
        settle = self.gw.billing.settle(
            reservation.reservation_id,
            c.SettleRequest(
                cost_nanos=turn.cost_nanos,
                idempotency_key=f"settle:{turn.turn_id}",
                user_id=turn.user_id,
                turn_id=turn.turn_id,
                receipt=turn.receipt,
            ),
        )
        outcomes: Sequence[object]
        if turn.file_name:
            use = c.FileUse(user_id=turn.user_id, session_id=turn.session_id, turn_id=turn.turn_id)
            outcomes = await asyncio.gather(
                settle, self.gw.files.mark_used(turn.file_name, use), return_exceptions=True
            )
        else:
            outcomes = [await _outcome(settle)]
        for outcome in outcomes:
            if isinstance(outcome, AppError):
                # a file left 'attached' is kept by the sweeper; a charge left owed, by the outbox
                logger.warning("after the append: %s", outcome.message)
            elif isinstance(outcome, BaseException):
                raise outcome

    def _next_context(self, turn: Turn) -> SessionContext | None:
        """The context the next turn starts from, or None when this one cannot tell it."""
        context, stored = turn.context, turn.stored
        assert context is not None and stored is not None
        added = [Entry(e.role, e.content) for e in self._entries(turn)]
        if stored.first_seq != context.entry_count or stored.entry_count != context.entry_count + len(added):
            return None  # not where this turn expected it: rebuilt from sessions next time
        following = SessionContext(
            session_id=context.session_id,
            owner=context.owner,
            name=context.name,
            prompt=turn.prompt(),
            model_name=turn.model.name,
            summary=context.summary,
            summarized_upto=context.summarized_upto,
            entry_count=stored.entry_count,
            entries=[*context.entries, *added],
            window_size=context.window_size,
        )
        return following.trimmed()

    async def _fold_then_unlock(self, turn: Turn, context: SessionContext, token: str) -> None:
        try:
            await self._fold(turn, context)
        finally:
            await self.store.unlock(turn.session_id, token, context)

    async def _fold(self, turn: Turn, context: SessionContext) -> bool:
        """Fold every entry the summary lacks into it (ahead: the whole session so far, so the
        next folds come only every ``window`` entries). A failure keeps the old summary; the
        next turn of the session tries again before it calls the AI."""
        pending = context.unsummarized()
        upto = context.entry_count
        if pending is None:
            logger.warning("summary postponed: entries to fold are not cached")
            return False
        try:
            summary, cost = await self._summarize(context.summary, pending, turn)
        except (grpc.RpcError, asyncio.TimeoutError) as exc:
            logger.warning("summary postponed: AI failed: %s", _grpc_text(exc))
            return False
        receipt = c.ReceiptDetails(
            input_tokens=turn.summary_tokens[0], output_tokens=turn.summary_tokens[1],
            first_seq=context.summarized_upto, last_seq=upto - 1, summarized_upto=upto,
        )
        charge = c.OwedCharge(cost_nanos=cost, model_name=turn.model.name, receipt=receipt) if cost else None
        try:
            stored = await self.gw.sessions.store_summary(
                turn.session_id,
                c.SummaryUpdate(
                    user_id=turn.user_id, summary=summary, summarized_upto=upto, turn_id=turn.turn_id, charge=charge
                ),
            )
        except AppError as exc:
            logger.warning("summary postponed: could not store it: %s", exc.message)
            return False
        context.summary, context.summarized_upto = stored.summary, stored.summarized_upto
        if charge is not None and stored.summarized_upto == upto:
            await self._charge_summary(turn, upto, cost, receipt)
        return True

    async def _charge_summary(
        self, turn: Turn, upto: int, cost: int, receipt: c.ReceiptDetails | None = None
    ) -> None:
        item = c.Charge(
            key=f"summary:{turn.session_id}:{upto}",
            kind="summary",
            user_id=turn.user_id,
            session_id=turn.session_id,
            turn_id=turn.turn_id,
            cost_nanos=cost,
            model_name=turn.model.name,
            receipt=receipt,
        )
        try:
            await self.gw.billing.charge([item])
        except AppError as exc:  # owed in the outbox; the worker charges it
            logger.warning("summary charge postponed: %s", exc.message)

    async def _summarize(self, previous: str, entries: list[Entry], turn: Turn) -> tuple[str, int]:
        model = turn.model
        if time.monotonic() >= self._summarize_missing_until:
            request = pb.SummaryRequest(
                user_id=turn.user_id,
                session_id=turn.session_id,
                model_name=model.name,
                model_provider=model.provider,
                previous_summary=previous,
                chat_entries=history_json(entries),
                timestamp=timestamp_now(),
                input_price_nanos_per_1k=model.input_price_nanos_per_1k,
                output_price_nanos_per_1k=model.output_price_nanos_per_1k,
            )
            try:
                reply = await self._ai_call("summarize", self.gw.ai.Summarize, request)
                turn.summary_tokens = _tokens(reply)
                return reply.response_text, _cost_nanos(reply)
            except grpc.RpcError as exc:
                if _grpc_code(exc) != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                # an AI service built for the original: remember, and use the original's way
                self._summarize_missing_until = time.monotonic() + _SUMMARIZE_UNIMPLEMENTED_SECONDS
        lines = "\n".join(f"{e.role}: {e.content}" for e in entries)
        fallback = pb.Request(
            user_id=turn.user_id,
            session_id=turn.session_id,
            chat_message=f"Current summary:\n{previous}\n\nNew lines of conversation:\n{lines}\n\nNew summary:",
            model_name=model.name,
            session_prompt=SUMMARY_PROMPT,
            chat_summary="",
            chat_history="[]",
            timestamp=timestamp_now(),
            model_provider=model.provider,
            input_price_nanos_per_1k=model.input_price_nanos_per_1k,
            output_price_nanos_per_1k=model.output_price_nanos_per_1k,
        )
        reply = await self._ai_call("process_summary", self.gw.ai.Process, fallback)
        turn.summary_tokens = _tokens(reply)
        return reply.response_text, _cost_nanos(reply)

    # -- the process's background work ----------------------------------------------------------

    async def renew_holds(self) -> None:
        """Push forward the leases of holds whose turns have run for a while (a hold seen on
        two rounds in a row): a quick turn never costs a renewal."""
        due = [r for r in self.holds if r in self._holds_seen]
        self._holds_seen = set(self.holds)
        for reservation_id in due:
            user_id = self.holds.get(reservation_id)
            if user_id is None:
                continue
            try:
                await self.gw.billing.lease(
                    reservation_id,
                    c.LeaseRequest(user_id=user_id, ttl_seconds=int(self.settings.reservation_lease_seconds)),
                )
            except AppError as exc:
                logger.warning("could not renew the hold %s: %s", reservation_id, exc.message)

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """A task that outlives the socket that asked for it (kept referenced until done)."""
        task = asyncio.create_task(coro)
        self.background.add(task)
        task.add_done_callback(_forget)
        task.add_done_callback(self.background.discard)
        return task

    async def drain(self, timeout: float) -> None:
        if self.background:
            await asyncio.wait(list(self.background), timeout=timeout)


class NothingProduced(Exception):
    """A streamed turn was cancelled before the AI produced any text: nothing is stored."""


class _StaleTurn(Exception):
    """The sessions service refused the append: the session has entries this turn did not see."""


async def _outcome(awaitable: Any) -> Any:
    try:
        return await awaitable
    except AppError as exc:
        return exc


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
