"""Streamed turns (docs/protocol.md, "Extensions" (streamed turns)): deltas through Redis, resumable from any replica.

A streamed turn is an ordinary turn (chat/turn.py) whose generate step is :meth:`StreamSink.generate`:
the AI's ``ProcessStream`` deltas are appended, one entry each, to a Redis stream of the turn
(``turnstream:{id}``), and the turn's final reply is its last entry. Nobody is written to
directly: the socket that started the turn follows the stream exactly like a type 8 follower on
any other socket or replica, so a slow reader never slows the turn (Redis is the buffer, one
turn's worth; a reader that falls too far behind is closed and may resume), and every reader sees
the same frames in the same order, without gap or repeat.

Keys, per turn:

- ``turnstream:{id}``: the stream; fields ``s`` (seq), ``k`` (``d`` a type 7 frame, ``e`` the
  final reply) and ``f`` (the frame, as sent);
- ``turnstream:{id}:meta``: a hash with the owner (``user``) and, once ended, ``finish``;
- ``turnstream:{id}:live``: present while a gateway runs the turn (a short lease it renews); a
  follower that finds neither it nor an end gives up with 121 instead of waiting forever;
- ``turnstream:{id}:cancel``: a type 9 that reached another replica than the one running it.

Once the turn ended, the stream and its meta are kept ``STREAM_RETENTION_SECONDS``.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, cast

import grpc
from redis.asyncio import Redis
from redis.exceptions import RedisError

from chat_common.aiproto import ai_service_pb2 as pb
from chat_common.money import dollars_to_nanos, token_cost_nanos
from chat_gateway.chat.turn import (
    NothingProduced,
    Turn,
    TurnRunner,
    _cost_nanos,
    _grpc_code,
    _grpc_text,
    _tokens,
    estimate_tokens,
)
from chat_gateway.ws.metrics import CHAT_AI_SECONDS, CHAT_ERRORS
from chat_gateway.ws.protocol import (
    ErrorCode,
    MessageType,
    ProtocolError,
    encode_error,
    encode_reply,
    is_uuid,
)

logger = logging.getLogger(__name__)

LIVE_MS = 10_000  # a turn whose gateway stopped renewing is given up on this soon
HEARTBEAT_SECONDS = 1.0
FOLLOW_BLOCK_MS = 1_000
BATCH = 256
MAX_FOLLOWER_LAG = 2_048  # entries a reader may be behind the turn before it is closed
FOLLOWER_SEND_SECONDS = 10.0  # a socket that takes longer to accept one frame is closed
CANCEL_WAIT_SECONDS = 15.0
# What XREAD answers on the gateway's client (bytes, not decoded): [(stream, [(id, fields)])].
# redis-py's types allow str too, for a client that decodes.
_Read = list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]
_STREAM_UNIMPLEMENTED_SECONDS = 300.0


def _key(turn_id: str) -> str:
    return f"turnstream:{{{turn_id}}}"


class FellBehind(Exception):
    """A follower is more than ``MAX_FOLLOWER_LAG`` entries behind the turn."""


class TurnStreams:
    """One per gateway process (next to its :class:`TurnRunner`)."""

    def __init__(self, redis: Redis, retention_seconds: int) -> None:
        self.redis = redis
        self.retention = max(1, int(retention_seconds))
        self.local: dict[str, StreamSink] = {}
        self.stream_missing_until = 0.0

    def sink(self, user_id: str) -> "StreamSink":
        return StreamSink(self, str(uuid.uuid4()), user_id)

    # -- running a streamed turn -----------------------------------------------------------------

    async def run(self, turn: Awaitable[dict[str, Any]], sink: "StreamSink") -> bytes:
        """The turn to its end; its final frame (reply or error) is the stream's last entry once
        the turn was announced (a refused turn announces nothing and writes nothing)."""
        reason = "error"
        try:
            reply = await turn
            reason = str(reply.get("finish_reason", "stop"))
            frame = encode_reply(MessageType.CHAT_MESSAGE, reply)
        except ProtocolError as exc:
            CHAT_ERRORS.labels(str(int(exc.code))).inc()
            frame = encode_error(exc, MessageType.CHAT_MESSAGE)
        except Exception:
            logger.exception("streamed turn failed")
            CHAT_ERRORS.labels(str(int(ErrorCode.INTERNAL))).inc()
            frame = encode_error(ProtocolError(ErrorCode.INTERNAL), MessageType.CHAT_MESSAGE)
        finally:
            sink.stop_heartbeat()
            self.local.pop(sink.turn_id, None)
        if sink.announced.is_set():
            await sink.finish(frame, reason)
        return frame

    # -- readers ---------------------------------------------------------------------------------

    async def owner(self, turn_id: str) -> tuple[bytes | None, bytes | None]:
        if not is_uuid(turn_id):
            return None, None
        owner, finish = cast("list[bytes | None]", await self.redis.hmget(f"{_key(turn_id)}:meta", "user", "finish"))
        return owner, finish

    async def follow(self, turn_id: str, user_id: str, after_seq: int, write: Callable[[bytes], Awaitable[None]]) -> bytes:
        """Write every delta frame with ``seq > after_seq``, old and live, and return the final
        frame. Unknown, expired and foreign turns are all :data:`ErrorCode.TURN_NOT_FOUND`."""
        try:
            owner, _ = await self.owner(turn_id)
        except RedisError as exc:
            logger.error("turn stream unavailable: %s", exc)
            raise ProtocolError(ErrorCode.INTERNAL) from None
        if owner is None or owner.decode() != user_id:
            raise ProtocolError(ErrorCode.TURN_NOT_FOUND)
        key = _key(turn_id)
        last_id: bytes | str = "0-0"
        read = 0
        while True:
            result = cast(_Read, await self.redis.xread({key: last_id}, count=BATCH, block=FOLLOW_BLOCK_MS))
            entries = result[0][1] if result else []
            if not entries:
                if not await self._alive(turn_id):
                    # nobody runs it any more; one last look for an end written meanwhile
                    result = cast(_Read, await self.redis.xread({key: last_id}, count=BATCH))
                    entries = result[0][1] if result else []
                    if not entries:
                        code = ErrorCode.TURN_INTERRUPTED if await self.redis.exists(key) else ErrorCode.TURN_NOT_FOUND
                        raise ProtocolError(code)
                else:
                    continue
            for entry_id, fields in entries:
                last_id = entry_id
                read += 1
                if fields[b"k"] == b"e":
                    return bytes(fields[b"f"])
                if int(fields[b"s"]) > after_seq:
                    try:
                        await asyncio.wait_for(write(bytes(fields[b"f"])), FOLLOWER_SEND_SECONDS)
                    except asyncio.TimeoutError:
                        raise FellBehind() from None  # the socket is closed: a cut frame is moot
            if len(entries) == BATCH and await self.redis.xlen(key) - read > MAX_FOLLOWER_LAG:
                raise FellBehind()

    async def _alive(self, turn_id: str) -> bool:
        live, finish = await asyncio.gather(
            self.redis.exists(f"{_key(turn_id)}:live"), self.redis.hget(f"{_key(turn_id)}:meta", "finish")
        )
        return bool(live) or finish is not None

    async def cancel(self, turn_id: str, user_id: str) -> dict[str, Any]:
        """Type 9: ``cancelled`` once the turn ended as cancelled, ``finished`` when it had
        ended (or ends) otherwise."""
        try:
            owner, finish = await self.owner(turn_id)
        except RedisError as exc:
            logger.error("turn stream unavailable: %s", exc)
            raise ProtocolError(ErrorCode.INTERNAL) from None
        if owner is None or owner.decode() != user_id:
            raise ProtocolError(ErrorCode.TURN_NOT_FOUND)
        if finish is None:
            local = self.local.get(turn_id)
            if local is not None:
                local.cancel()
            else:  # another replica runs it: its heartbeat sees this within a second
                await self.redis.set(f"{_key(turn_id)}:cancel", b"1", px=self.retention * 1000)
            deadline = time.monotonic() + CANCEL_WAIT_SECONDS
            while finish is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                finish = cast("bytes | None", await self.redis.hget(f"{_key(turn_id)}:meta", "finish"))
                if finish is None and not await self.redis.exists(f"{_key(turn_id)}:live"):
                    break
        status = "finished" if finish not in (None, b"cancelled") else "cancelled"
        return {"turn_id": turn_id, "status": status}


class StreamSink:
    """One streamed turn's writer; ``turn.py`` calls :meth:`started` and :meth:`generate`."""

    def __init__(self, streams: TurnStreams, turn_id: str, user_id: str) -> None:
        self.streams = streams
        self.redis = streams.redis
        self.turn_id = turn_id
        self.user_id = user_id
        self.key = _key(turn_id)
        self.session_id = ""
        self.seq = 0
        self.announced = asyncio.Event()
        self.cancelled = asyncio.Event()
        self._heartbeat: asyncio.Task[None] | None = None

    def cancel(self) -> None:
        self.cancelled.set()

    # -- called by the turn ----------------------------------------------------------------------

    async def started(self, turn: Turn) -> None:
        """Seq 0: the turn passed its checks (names the turn, and the new session)."""
        assert turn.context is not None
        self.session_id = turn.session_id
        frame = encode_reply(MessageType.TURN_DELTA, {
            "turn_id": self.turn_id, "session_id": turn.session_id, "session_name": turn.context.name,
            "seq": 0, "delta": "",
        })
        keep = self.streams.retention * 1000 + LIVE_MS
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(f"{self.key}:meta", "user", self.user_id)
        pipe.pexpire(f"{self.key}:meta", keep)
        pipe.set(f"{self.key}:live", b"1", px=LIVE_MS)
        pipe.xadd(self.key, {"s": 0, "k": "d", "f": frame})
        pipe.pexpire(self.key, keep)
        await pipe.execute()
        self.streams.local[self.turn_id] = self
        self._heartbeat = asyncio.create_task(self._beat())
        self.announced.set()

    async def delta(self, text: str) -> None:
        self.seq += 1
        frame = encode_reply(MessageType.TURN_DELTA, {
            "turn_id": self.turn_id, "session_id": self.session_id, "seq": self.seq, "delta": text,
        })
        await self.redis.xadd(self.key, {"s": self.seq, "k": "d", "f": frame})

    async def finish(self, frame: bytes, reason: str) -> None:
        keep = self.streams.retention * 1000
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(self.key, {"s": self.seq + 1, "k": "e", "f": frame})
        pipe.hset(f"{self.key}:meta", "finish", reason)
        pipe.delete(f"{self.key}:live", f"{self.key}:cancel")
        pipe.pexpire(self.key, keep)
        pipe.pexpire(f"{self.key}:meta", keep)
        try:
            await pipe.execute()
        except RedisError as exc:  # followers give up with 121 once the live lease is gone
            logger.error("could not end the turn stream: %s", exc)
        finally:
            self.streams.local.pop(self.turn_id, None)

    def stop_heartbeat(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()

    async def _beat(self) -> None:
        keep = self.streams.retention * 1000 + LIVE_MS
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            try:
                pipe = self.redis.pipeline(transaction=False)
                pipe.set(f"{self.key}:live", b"1", px=LIVE_MS)
                pipe.pexpire(self.key, keep)
                pipe.pexpire(f"{self.key}:meta", keep)
                pipe.exists(f"{self.key}:cancel")
                *_, cancel = await pipe.execute()
                if cancel:
                    self.cancel()
            except RedisError as exc:
                logger.warning("turn stream heartbeat failed: %s", exc)

    async def generate(self, runner: TurnRunner, turn: Turn, request: pb.Request) -> None:
        """The AI's reply delta by delta. Sets the turn's text (what was produced: all of it, or
        the prefix before a cancel or an AI failure), cost and finish reason; a cancel before any
        text raises :class:`NothingProduced` (nothing stored, the hold released)."""
        if time.monotonic() < self.streams.stream_missing_until:
            await self._whole(runner, turn, request)
            return
        parts: list[str] = []
        reported: pb.StreamChunk | None = None
        started = time.perf_counter()
        call = runner.gw.ai.ProcessStream(
            request, timeout=runner.settings.ai_timeout_seconds, metadata=runner._metadata()
        )
        cancelled = asyncio.ensure_future(self.cancelled.wait())
        try:
            while True:
                read = asyncio.ensure_future(call.read())
                await asyncio.wait({read, cancelled}, return_when=asyncio.FIRST_COMPLETED)
                if self.cancelled.is_set():  # checked first: chunks may be waiting all along
                    read.cancel()
                    turn.finish_reason = "cancelled"
                    break
                try:
                    chunk = read.result()
                except (grpc.RpcError, asyncio.CancelledError) as exc:
                    if self.cancelled.is_set():
                        turn.finish_reason = "cancelled"
                        break
                    if _grpc_code(exc) == grpc.StatusCode.UNIMPLEMENTED and not parts:
                        # an AI service built for the original: Process, the reply as one delta
                        self.streams.stream_missing_until = time.monotonic() + _STREAM_UNIMPLEMENTED_SECONDS
                        await self._whole(runner, turn, request)
                        return
                    logger.warning("AI service failed the streamed turn: %s", _grpc_text(exc))
                    if not parts:
                        raise ProtocolError(ErrorCode.AI_RESPONSE) from None
                    turn.finish_reason = "error"  # what was produced is stored and charged
                    break
                if chunk is grpc.aio.EOF:
                    break
                if chunk.delta:
                    parts.append(chunk.delta)
                    await self.delta(chunk.delta)
                if chunk.cost_nanos or chunk.cost or chunk.input_tokens or chunk.output_tokens:
                    reported = chunk
        finally:
            cancelled.cancel()
            call.cancel()  # no-op when it ended; otherwise the AI stops asking its model
            CHAT_AI_SECONDS.labels("process_stream").observe(time.perf_counter() - started)
        turn.reply_text = "".join(parts)
        if not parts and turn.finish_reason == "cancelled":
            raise NothingProduced()
        turn.cost_nanos = self._cost(turn, reported, request)
        if turn.receipt is not None and reported is not None:  # usage as the AI reported it (cumulative)
            turn.receipt.input_tokens, turn.receipt.output_tokens = _tokens(reported)

    def _cost(self, turn: Turn, reported: pb.StreamChunk | None, request: pb.Request) -> int:
        """As the AI reported it (cumulative, so a cancelled call's covers what it produced), or
        counted here when it reported nothing: the input and the text produced, never more."""
        if reported is not None and (turn.finish_reason == "stop" or reported.output_tokens):
            if reported.cost_nanos:
                return int(reported.cost_nanos)
            if reported.cost > 0:
                return dollars_to_nanos(reported.cost)
        if turn.finish_reason == "stop" and reported is None:
            return 0  # as a plain turn whose AI reports no cost
        model = turn.model
        input_tokens = estimate_tokens(
            request.session_prompt, request.chat_summary, request.chat_history, request.chat_message
        )
        output_tokens = estimate_tokens(turn.reply_text)
        return token_cost_nanos(
            input_tokens, output_tokens, model.input_price_nanos_per_1k, model.output_price_nanos_per_1k
        )

    async def _whole(self, runner: TurnRunner, turn: Turn, request: pb.Request) -> None:
        call = asyncio.ensure_future(runner._ai_call("process", runner.gw.ai.Process, request))
        cancelled = asyncio.ensure_future(self.cancelled.wait())
        try:
            await asyncio.wait({call, cancelled}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cancelled.cancel()
        if not call.done():
            call.cancel()
            turn.finish_reason = "cancelled"
            raise NothingProduced()
        try:
            reply = call.result()
        except (grpc.RpcError, asyncio.TimeoutError) as exc:
            logger.warning("AI service failed the turn: %s", _grpc_text(exc))
            raise ProtocolError(ErrorCode.AI_RESPONSE) from None
        turn.reply_text = reply.response_text
        turn.cost_nanos = _cost_nanos(reply)
        if turn.receipt is not None:
            turn.receipt.input_tokens, turn.receipt.output_tokens = _tokens(reply)
        if reply.response_text:
            await self.delta(reply.response_text)


def turn_streams(runner: TurnRunner) -> TurnStreams:
    """The process's streams, kept on its runner."""
    streams = getattr(runner, "streams", None)
    if streams is None:
        streams = TurnStreams(runner.gw.redis, runner.settings.stream_retention_seconds)
        runner.streams = streams  # type: ignore[attr-defined]
    return streams
