"""``GET /ws``: the Chat-UI protocol (docs/protocol.md, "The WebSocket", and docs/protocol-errors.md).

The receive loop only reads and decodes frames; every request becomes a job on the dispatcher
queue of its type, so a chat turn in progress never delays a session list, and replies of one
type leave in request order. Chat turns and deletions run as tasks of their own, shielded from
the socket: a client that hangs up mid-turn does not cancel the durable part.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import msgspec
from litestar import WebSocket, websocket
from litestar.exceptions import WebSocketDisconnect
from litestar.types import WebSocketSendEvent

from chat_common.errors import AppError, BadRequestError, NotFoundError
from chat_common.logging import request_id_var
from chat_gateway.auth import (
    AuthenticationError,
    Identity,
    authenticate_socket,
    effective_user_id,
    origin_allowed,
    socket_credentials,
    token_expired,
)
from chat_gateway.chat.context_cache import ContextStore
from chat_gateway.chat.streams import FellBehind, turn_streams
from chat_gateway.chat.turn import TurnRunner
from chat_gateway.context import GatewayContext
from chat_gateway.gateway import GatewayDependency
from chat_gateway.ws.dispatcher import Dispatcher
from chat_gateway.ws.draining import WS_GOING_AWAY
from chat_gateway.ws.limits import RateLimiter, Verdict, subject_of
from chat_gateway.ws.metrics import (
    CHAT_ERRORS,
    CHAT_OPEN_SOCKETS,
    CHAT_RATE_LIMITED,
    CHAT_SOCKETS_REFUSED,
    CHAT_TURN_SECONDS,
    CHAT_TURNS,
)
from chat_gateway.ws.protocol import (
    REQUEST_TYPES,
    CancelRequest,
    ChatRequest,
    ErrorCode,
    Frame,
    MessageType,
    ProtocolError,
    ResumeRequest,
    SearchRequest,
    SessionRequest,
    UserRequest,
    decode_frame,
    encode_error,
    encode_reply,
    is_uuid,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")

SESSION_PAGE = 500
MAX_SESSION_PAGES = 40  # 20,000 sessions: past that a client gets the newest ones
# Close codes (RFC 6455 section 7.4.1); docs/security.md says when each is sent.
WS_POLICY_VIOLATION = 1008
WS_MESSAGE_TOO_BIG = 1009
WS_TRY_AGAIN_LATER = 1013


def frame_size(raw: str | bytes) -> int:
    """Bytes on the wire; only encodes when the character count cannot already tell."""
    if isinstance(raw, bytes):
        return len(raw)
    return len(raw.encode("utf-8", errors="surrogatepass"))


def error_frame(error: ProtocolError, message_type: int | None) -> bytes:
    CHAT_ERRORS.labels(str(int(error.code))).inc()
    return encode_error(error, message_type)


class SocketSession:
    """One connected socket."""

    def __init__(
        self,
        socket: WebSocket,
        gateway: GatewayContext,
        runner: TurnRunner,
        identity: Identity | None,
        *,
        limiter: RateLimiter | None = None,
        subject: str = "",
    ) -> None:
        self.socket = socket
        self.gw = gateway
        self.runner = runner
        self.identity = identity
        self.authenticated = identity.user_id if identity is not None else None
        self.limiter = limiter
        self.subject = subject
        self.dispatcher = Dispatcher(self._send)
        self.handlers: dict[int, Callable[[Any, str], Awaitable[dict[str, Any] | bytes]]] = {
            MessageType.USER_DETAILS: self.user_details,
            MessageType.LIST_SESSIONS: self.list_sessions,
            MessageType.SESSION_CHATS: self.session_chats,
            MessageType.CHAT_MESSAGE: self.chat_message,
            MessageType.DELETE_SESSION: self.delete_session,
            MessageType.LIST_MODELS: self.list_models,
            MessageType.BALANCE: self.balance,
            MessageType.SEARCH: self.search,
            MessageType.RESUME_TURN: self.resume_turn,
            MessageType.CANCEL_TURN: self.cancel_turn,
        }
        self.streams = turn_streams(runner)

    async def _send(self, frame: bytes) -> None:
        # ASGI: a missing "bytes" stands for None (litestar's TypedDict lists both keys)
        await self.socket.send(cast("WebSocketSendEvent", {"type": "websocket.send", "text": frame.decode()}))

    async def serve(self) -> None:
        settings = self.gw.settings
        try:
            while True:
                message = await self.socket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                if message["type"] != "websocket.receive":
                    continue
                text = message.get("text")
                raw: str | bytes = text if text is not None else (message.get("bytes") or b"")
                # uvicorn already closes with 1009 past ws_max_size; this holds under any server
                if len(raw) > settings.max_frame_bytes or (
                    4 * len(raw) > settings.max_frame_bytes and frame_size(raw) > settings.max_frame_bytes
                ):
                    await self._close(WS_MESSAGE_TOO_BIG, f"frame larger than {settings.max_frame_bytes} bytes", "frame_too_big")
                    return
                if token_expired(self.identity, settings):
                    # a socket must not outlive the credential it was opened with
                    await self._close(WS_POLICY_VIOLATION, "token expired", "token_expired")
                    return
                verdict = await self.limiter.hit(self.subject) if self.limiter is not None else Verdict.OK
                if verdict is Verdict.ABUSIVE:
                    await self._close(WS_POLICY_VIOLATION, "rate limit exceeded", "rate_limit")
                    return
                frame = decode_frame(raw, settings)
                if verdict is Verdict.LIMITED:
                    CHAT_RATE_LIMITED.inc()
                    frame = Frame(type=frame.type, error=self._rate_limited())
                if frame.type is None or frame.type not in REQUEST_TYPES:
                    # unreadable or unknown: no queue to keep order with, answer at once
                    assert frame.error is not None
                    await self.dispatcher.reply_now(error_frame(frame.error, frame.type))
                    continue
                await self.dispatcher.submit(frame.type, self._job(frame.type, frame.request, frame.error))
        except WebSocketDisconnect:
            return
        finally:
            await self.dispatcher.close()

    def _rate_limited(self) -> ProtocolError:
        settings = self.gw.settings
        return ProtocolError(
            ErrorCode.RATE_LIMITED,
            f"Rate limit exceeded: at most {settings.rate_limit_requests} requests per "
            f"{settings.rate_limit_window_seconds} seconds; slow down",
        )

    async def go_away(self, grace_seconds: float) -> None:
        """Answer what is in flight (within the grace period), then close with 1001."""
        try:
            await asyncio.wait_for(self.dispatcher.idle(), grace_seconds)
        except asyncio.TimeoutError:
            logger.warning("socket still busy after the grace period; closing it")
        await self.dispatcher.shut(lambda: self.socket.close(code=WS_GOING_AWAY, reason="server shutting down"))

    async def _close(self, code: int, reason: str, metric: str) -> None:
        CHAT_SOCKETS_REFUSED.labels(metric).inc()
        logger.info("socket closed: %s", reason, extra={"close_code": code})
        await self.dispatcher.shut(lambda: self.socket.close(code=code, reason=reason))

    def _job(self, message_type: int, request: Any, error: ProtocolError | None) -> Callable[[], Awaitable[bytes]]:
        async def job() -> bytes:
            if error is not None:
                return error_frame(error, message_type)
            request_id_var.set(uuid.uuid4().hex)
            try:
                user_id = effective_user_id(self.authenticated, request.user_id)
                data = await self.handlers[message_type](request, user_id)
            except ProtocolError as exc:
                return error_frame(exc, message_type)
            except Exception:
                logger.exception("request of type %s failed", message_type)
                return error_frame(ProtocolError(ErrorCode.INTERNAL), message_type)
            if isinstance(data, bytes):  # a frame as a streamed turn stored it
                return data
            try:
                return encode_reply(message_type, data)
            except (TypeError, msgspec.EncodeError):
                logger.exception("reply of type %s could not be encoded", message_type)
                return error_frame(ProtocolError(ErrorCode.JSON_MARSHAL), message_type)

        return job

    async def _durable(self, coro: Awaitable[Any]) -> Any:
        """Run ``coro`` to its end even if this socket's worker is cancelled (client gone)."""
        task = self.runner.spawn(coro)
        return await asyncio.shield(task)

    # -- the message types --------------------------------------------------------------------

    async def user_details(self, request: UserRequest, user_id: str) -> dict[str, Any]:
        user = await self._billing(self.gw.billing.user, user_id, ErrorCode.INTERNAL)
        return {"user_id": user_id, "username": user.username}

    async def list_sessions(self, request: UserRequest, user_id: str) -> dict[str, Any]:
        if not is_uuid(user_id):
            raise ProtocolError(ErrorCode.USER_NOT_FOUND)
        info: list[dict[str, str]] = []
        offset = 0
        try:
            for _ in range(MAX_SESSION_PAGES):
                page = await self.gw.sessions.page(user_id, SESSION_PAGE, offset)
                info.extend({"session_id": s.session_id, "session_name": s.session_name} for s in page.items)
                offset += len(page.items)
                if not page.items or offset >= page.total:
                    break
        except AppError as exc:
            logger.error("could not list sessions: %s", exc.message)
            raise ProtocolError(ErrorCode.INTERNAL) from None
        return {"user_id": user_id, "session_info": info}

    async def session_chats(self, request: SessionRequest, user_id: str) -> dict[str, Any]:
        if not is_uuid(user_id):
            raise ProtocolError(ErrorCode.LOAD_CHATS)
        try:
            listed = await self.gw.sessions.entries(request.session_id, user_id)
        except AppError as exc:
            if not isinstance(exc, (NotFoundError, BadRequestError)):
                logger.error("could not load chats: %s", exc.message)
            raise ProtocolError(ErrorCode.LOAD_CHATS) from None
        chat = [{"role": e.role, "content": e.content} for e in listed.items]
        return {"user_id": user_id, "session_id": request.session_id, "chat": msgspec.json.encode(chat).decode()}

    async def chat_message(self, request: ChatRequest, user_id: str) -> dict[str, Any] | bytes:
        if request.stream:
            return await self.streamed_turn(request, user_id)
        reply = await self._durable(measured_turn(self.runner, request, user_id))
        if self.gw.settings.service.log_content:
            # opt-in (LOG_MESSAGE_CONTENT=true) for debugging a deployment; off, no chat text is logged
            logger.info("chat turn", extra={"chat_message": request.message, "chat_reply": reply.get("message", "")})
        return reply

    async def streamed_turn(self, request: ChatRequest, user_id: str) -> bytes:
        """A streamed turn (docs/protocol.md, "Extensions"): the turn runs on its own (durable); this socket follows its
        stream from seq 0 like any resuming socket. Refused before its checks passed, it is the
        ordinary error reply and no type 7."""
        sink = self.streams.sink(user_id)
        task = self.runner.spawn(self.streams.run(measured_turn(self.runner, request, user_id, sink), sink))
        announced = asyncio.ensure_future(sink.announced.wait())
        try:
            await asyncio.wait({task, announced}, return_when=asyncio.FIRST_COMPLETED)
            if not sink.announced.is_set():
                return await asyncio.shield(task)
            return await self._follow(sink.turn_id, user_id, -1, self._write_or_gone)
        except _SocketGone:  # a write found the socket closed
            if request.on_disconnect == "cancel":
                sink.cancel()
            return b""
        except asyncio.CancelledError:  # the socket went away and its worker was cancelled
            if request.on_disconnect == "cancel":
                sink.cancel()
            raise
        finally:
            announced.cancel()

    async def _write_or_gone(self, frame: bytes) -> None:
        await self.dispatcher.write(frame)
        if self.dispatcher.closed:
            raise _SocketGone()

    async def _follow(
        self, turn_id: str, user_id: str, after_seq: int, write: Callable[[bytes], Awaitable[None]] | None = None
    ) -> bytes:
        try:
            return await self.streams.follow(turn_id, user_id, after_seq, write or self.dispatcher.write)
        except FellBehind:
            await self._close(WS_TRY_AGAIN_LATER, "fell too far behind a streamed turn; resume it with type 8", "stream_lag")
            return b""

    async def resume_turn(self, request: ResumeRequest, user_id: str) -> bytes:
        return await self._follow(request.turn_id, user_id, request.after_seq)

    async def cancel_turn(self, request: CancelRequest, user_id: str) -> dict[str, Any]:
        return await self.streams.cancel(request.turn_id, user_id)

    async def delete_session(self, request: SessionRequest, user_id: str) -> dict[str, Any]:
        if not is_uuid(user_id):
            raise ProtocolError(ErrorCode.DELETE_SESSION)
        return await self._durable(delete_session(self.gw, self.runner.store, request.session_id, user_id))

    async def list_models(self, request: UserRequest, user_id: str) -> dict[str, Any]:
        listed = await self._billing(self.gw.billing.models, user_id, ErrorCode.MODEL_LIST)
        return {"models": sorted(m.name for m in listed.models)}

    async def balance(self, request: UserRequest, user_id: str) -> dict[str, Any]:
        money = await self._billing(self.gw.billing.balance, user_id, ErrorCode.BALANCE_DETAILS)
        return {"balance": money.balance}

    async def search(self, request: SearchRequest, user_id: str) -> dict[str, Any]:
        # no user can have a non-UUID id (as for type 1); an unknown user simply finds nothing
        if not is_uuid(user_id):
            raise ProtocolError(ErrorCode.USER_NOT_FOUND)
        try:
            found = await self.gw.sessions.search(user_id, request.query, request.limit)
        except AppError as exc:
            logger.error("could not search: %s", exc.message)
            raise ProtocolError(ErrorCode.INTERNAL) from None
        results = [
            {"session_id": h.session_id, "session_name": h.session_name, "seq": h.seq, "role": h.role,
             "snippet": h.snippet, "created_at": h.created_at}
            for h in found.items
        ]
        return {"user_id": user_id, "results": results}

    async def _billing(self, read: Callable[[str], Awaitable[T]], user_id: str, failure: ErrorCode) -> T:
        """One of billing's reads of a user; an unknown (or impossible) user is USER_NOT_FOUND."""
        if not is_uuid(user_id):
            raise ProtocolError(ErrorCode.USER_NOT_FOUND)
        try:
            return await read(user_id)
        except (NotFoundError, BadRequestError):
            raise ProtocolError(ErrorCode.USER_NOT_FOUND) from None
        except AppError as exc:
            logger.error("billing call failed: %s", exc.message)
            raise ProtocolError(failure) from None


class _SocketGone(Exception):
    """The socket following a streamed turn is closed."""


async def measured_turn(runner: TurnRunner, request: ChatRequest, user_id: str, sink: Any = None) -> dict[str, Any]:
    started = time.perf_counter()
    outcome = "ok"
    try:
        return await runner.run(request, user_id, sink)
    except ProtocolError as exc:
        outcome = f"error_{int(exc.code)}"
        raise
    except BaseException:
        outcome = "error_14"
        raise
    finally:
        CHAT_TURNS.labels(outcome).inc()
        CHAT_TURN_SECONDS.observe(time.perf_counter() - started)


async def delete_session(gw: GatewayContext, cache: ContextStore, session_id: str, user_id: str) -> dict[str, Any]:
    try:
        await gw.sessions.remove(session_id, user_id)
    except AppError as exc:
        if not isinstance(exc, (NotFoundError, BadRequestError)):
            logger.error("could not delete session: %s", exc.message)
        raise ProtocolError(ErrorCode.DELETE_SESSION) from None
    try:
        await gw.files.remove_session_files(session_id, user_id)
    except AppError as exc:
        # the session is gone; the files service's orphan sweep removes what is left
        logger.warning("could not delete the session's files: %s", exc.message)
    await cache.invalidate(session_id)
    return {"user_id": user_id}


@websocket("/ws")
async def chat_socket(socket: WebSocket, gateway: GatewayDependency) -> None:
    settings = gateway.settings
    if not origin_allowed(socket.headers.get("origin"), settings):
        # Refused before the handshake (HTTP 403): a page of another site gets no socket at all.
        CHAT_SOCKETS_REFUSED.labels("origin").inc()
        logger.info("socket refused: origin not allowed", extra={"origin": (socket.headers.get("origin") or "")[:200]})
        await socket.close(code=WS_POLICY_VIOLATION, reason="origin not allowed")
        return
    subprotocol = socket_credentials(socket).subprotocol
    try:
        identity = await authenticate_socket(socket, settings)
    except AuthenticationError as exc:
        # Accepted, then closed: unlike an HTTP 401, a close code and reason reach a browser's
        # script, which can then fetch a fresh token.
        CHAT_SOCKETS_REFUSED.labels("auth").inc()
        logger.info("socket refused: %s", exc.reason)
        await socket.accept(subprotocols=subprotocol)
        await socket.close(code=WS_TRY_AGAIN_LATER if exc.retryable else WS_POLICY_VIOLATION, reason=exc.reason)
        return
    limits = gateway.limits
    subject = subject_of(identity.user_id if identity is not None else None, socket.client)
    async with limits.sockets.hold(subject) as granted:
        await socket.accept(subprotocols=subprotocol)
        if not granted:
            CHAT_SOCKETS_REFUSED.labels("too_many_sockets").inc()
            logger.info("socket refused: too many sockets", extra={"limit": settings.max_sockets_per_user})
            await socket.close(code=WS_TRY_AGAIN_LATER, reason="too many sockets for this user; try again later")
            return
        session = SocketSession(
            socket,
            gateway.context,
            gateway.runner,
            identity,
            limiter=limits.requests,
            subject=subject,
        )
        registry = gateway.sockets
        if registry.draining:
            await socket.close(code=WS_GOING_AWAY, reason="server shutting down")
            return
        registry.add(session)
        CHAT_OPEN_SOCKETS.inc()
        try:
            await session.serve()
        finally:
            CHAT_OPEN_SOCKETS.dec()
            registry.discard(session)


websocket_routes = [chat_socket]
