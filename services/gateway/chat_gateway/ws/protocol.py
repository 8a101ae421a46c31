"""The wire format of ``/ws``: request Structs per message type, the error codes, and turning a
raw frame into a validated request (or a :class:`ProtocolError` carrying the reply).

Codes 0-16 and their strings are the original backend's (docs/protocol-errors.md) and must stay
byte-for-byte the same: the original UI only looks for the ``error`` key, but other clients match
on the text. Codes from 100 up are ours; ``docs/protocol-errors.md`` lists them.
"""
from __future__ import annotations

import logging
import re
from enum import IntEnum
from typing import Any

import msgspec

from chat_common.errors import uuid_or_none
from chat_common.names import ISSUED_FILE_NAME, NEW_SESSION
from chat_gateway.settings import GatewaySettings

logger = logging.getLogger(__name__)


class MessageType(IntEnum):
    USER_DETAILS = 0
    LIST_SESSIONS = 1
    SESSION_CHATS = 2
    CHAT_MESSAGE = 3
    DELETE_SESSION = 4
    LIST_MODELS = 5
    BALANCE = 6
    # extension: streamed turns (docs/protocol.md, "Extensions"); 7 is sent only, never asked
    TURN_DELTA = 7
    RESUME_TURN = 8
    CANCEL_TURN = 9
    # extension: search over one's own history (docs/protocol.md, "Extensions")
    SEARCH = 10


class ErrorCode(IntEnum):
    JSON_PARSING = 0
    UNKNOWN_MESSAGE = 1
    JSON_MARSHAL = 2
    USER_NOT_FOUND = 3
    CREATE_SESSION = 4
    LOAD_SESSION = 5
    AI_RESPONSE = 6
    MODEL_ACCESS = 7
    LOAD_CHATS = 9
    DELETE_SESSION = 10
    MODEL_LIST = 11
    INTERNAL = 14
    INSUFFICIENT_BALANCE = 15
    BALANCE_DETAILS = 16
    # ours (docs/protocol-errors.md: new failure kinds get codes from 100 up)
    INVALID_FRAME = 100
    MISSING_FIELD = 101
    WRONG_FIELD_TYPE = 102
    INVALID_VALUE = 103
    FILE_NOT_FOUND = 104
    FIELD_TOO_LONG = 105
    USER_MISMATCH = 106
    SESSION_BUSY = 107
    RATE_LIMITED = 108
    # streamed turns (120 up, clear of the spending limits' codes)
    TURN_NOT_FOUND = 120
    TURN_INTERRUPTED = 121
    DAILY_LIMIT = 109
    MONTHLY_LIMIT = 110
    SESSION_LIMIT = 111


# The original strings, verbatim (including "Does Not Exists").
ORIGINAL_MESSAGES: dict[ErrorCode, str] = {
    ErrorCode.JSON_PARSING: "JSON Parsing Error",
    ErrorCode.UNKNOWN_MESSAGE: "Unknown Message",
    ErrorCode.JSON_MARSHAL: "JSON Marshal Error",
    ErrorCode.USER_NOT_FOUND: "User Does Not Exists",
    ErrorCode.CREATE_SESSION: "Unable to Create Session",
    ErrorCode.LOAD_SESSION: "Unable to Load Session",
    ErrorCode.AI_RESPONSE: "Unable to Receive Response To Query",
    ErrorCode.MODEL_ACCESS: "User Does Not Have Model Access",
    ErrorCode.LOAD_CHATS: "Unable to Load Chats",
    ErrorCode.DELETE_SESSION: "Unable to Delete Session",
    ErrorCode.MODEL_LIST: "Unable to Generate AI Model List",
    ErrorCode.INTERNAL: "Internal Server Error",
    ErrorCode.INSUFFICIENT_BALANCE: "Insufficient balance",
    ErrorCode.BALANCE_DETAILS: "Unable to get balance details",
}

# Defaults for our codes; most replies carry a more specific text naming the field.
DEFAULT_MESSAGES: dict[ErrorCode, str] = {
    **ORIGINAL_MESSAGES,
    ErrorCode.INVALID_FRAME: "Invalid request: expected {\"type\": <int>, \"data\": {...}}",
    ErrorCode.MISSING_FIELD: "Missing required field",
    ErrorCode.WRONG_FIELD_TYPE: "Field has the wrong type",
    ErrorCode.INVALID_VALUE: "Field has an invalid value",
    ErrorCode.FILE_NOT_FOUND: "File not found",
    ErrorCode.FIELD_TOO_LONG: "Field is too long",
    ErrorCode.USER_MISMATCH: "user_id does not match the authenticated user",
    ErrorCode.SESSION_BUSY: "Session is busy with another message; try again",
    ErrorCode.RATE_LIMITED: "Rate limit exceeded: too many requests; slow down",
    ErrorCode.TURN_NOT_FOUND: "Unknown turn: no such turn of this user, or it ended too long ago",
    ErrorCode.TURN_INTERRUPTED: "The turn was interrupted: the gateway running it stopped; reload the session",
    ErrorCode.DAILY_LIMIT: "Daily spending limit reached",
    ErrorCode.MONTHLY_LIMIT: "Monthly spending limit reached",
    ErrorCode.SESSION_LIMIT: "Session spending limit reached",
}


class ProtocolError(Exception):
    """An error reply. Raised anywhere below a handler; the dispatcher turns it into a frame."""

    def __init__(self, code: ErrorCode, message: str | None = None) -> None:
        self.code = ErrorCode(code)
        if self.code in ORIGINAL_MESSAGES:
            # the original strings are the contract: never reworded
            message = ORIGINAL_MESSAGES[self.code]
        self.message = message or DEFAULT_MESSAGES[self.code]
        super().__init__(self.message)


# ---------------------------------------------------------------------------------------------
# Structs. ``user_id`` is optional on the wire so that an authenticated socket may omit it; the
# handlers resolve it through ``auth.effective_user_id``, which insists on it when unauthenticated.


class Envelope(msgspec.Struct):
    type: int
    data: msgspec.Raw = msgspec.Raw(b"{}")


class UserRequest(msgspec.Struct):
    user_id: str | None = None


class SessionRequest(msgspec.Struct):
    session_id: str
    user_id: str | None = None


class ChatRequest(msgspec.Struct):
    session_id: str
    message: str
    user_id: str | None = None
    model_name: str | None = None
    model_id: int | None = None
    # None (absent) keeps the session's stored prompt; "" sets it empty.
    session_prompt: str | None = None
    file_name: str | None = None
    # extension (streamed turns, docs/protocol.md): stream the reply as type 7 deltas
    stream: bool = False
    on_disconnect: str | None = None  # "continue" (the default) or "cancel"

    @property
    def is_new(self) -> bool:
        return self.session_id == NEW_SESSION


class ResumeRequest(msgspec.Struct):
    turn_id: str
    after_seq: int = 0
    user_id: str | None = None


class CancelRequest(msgspec.Struct):
    turn_id: str
    user_id: str | None = None


ON_DISCONNECT = ("continue", "cancel")


class SearchRequest(msgspec.Struct):
    query: str
    user_id: str | None = None
    limit: int = 20


SEARCH_MAX_LIMIT = 100


REQUEST_TYPES: dict[int, type[msgspec.Struct]] = {
    MessageType.USER_DETAILS: UserRequest,
    MessageType.LIST_SESSIONS: UserRequest,
    MessageType.SESSION_CHATS: SessionRequest,
    MessageType.CHAT_MESSAGE: ChatRequest,
    MessageType.DELETE_SESSION: SessionRequest,
    MessageType.LIST_MODELS: UserRequest,
    MessageType.BALANCE: UserRequest,
    MessageType.RESUME_TURN: ResumeRequest,
    MessageType.CANCEL_TURN: CancelRequest,
    MessageType.SEARCH: SearchRequest,
}

MAX_USER_ID_CHARS = 128
MAX_MODEL_NAME_CHARS = 200
MAX_MODEL_ID = 2**31 - 1

_TYPE_NAMES = {
    "str": "a string",
    "int": "an integer",
    "int | null": "an integer",
    "str | null": "a string",
    "object": "an object",
}
_MISSING_RE = re.compile(r"Object missing required field `(?P<field>[^`]+)`(?: - at `\$(?P<path>[^`]*)`)?")
_EXPECTED_RE = re.compile(r"Expected `(?P<expected>[^`]+)`, got `(?P<got>[^`]+)`(?: - at `\$(?P<path>[^`]*)`)?")


def _field_path(prefix: str, path: str | None, field: str | None = None) -> str:
    parts = [prefix] if prefix else []
    if path:
        parts.append(path.lstrip("."))
    if field:
        parts.append(field)
    return ".".join(p for p in parts if p) or prefix or "request"


def validation_error(exc: msgspec.ValidationError, prefix: str) -> ProtocolError:
    """msgspec's message rewritten to name the field the way a client sends it."""
    text = str(exc)
    if match := _MISSING_RE.match(text):
        field = _field_path(prefix, match.group("path"), match.group("field"))
        return ProtocolError(ErrorCode.MISSING_FIELD, f"Missing required field `{field}`")
    if match := _EXPECTED_RE.match(text):
        expected = match.group("expected")
        path = match.group("path")
        field = _field_path(prefix, path)
        if not path and prefix == "data":
            return ProtocolError(
                ErrorCode.INVALID_FRAME, f"Invalid request: `data` must be an object, got {match.group('got')}"
            )
        if not path and not prefix:
            return ProtocolError(
                ErrorCode.INVALID_FRAME, f"Invalid request: expected a JSON object, got {match.group('got')}"
            )
        if field == "type":
            return ProtocolError(ErrorCode.INVALID_FRAME, f"Invalid request: `type` must be an integer, got {match.group('got')}")
        want = _TYPE_NAMES.get(expected, f"of type {expected}")
        return ProtocolError(
            ErrorCode.WRONG_FIELD_TYPE, f"Field `{field}` must be {want}, got {match.group('got')}"
        )
    return ProtocolError(ErrorCode.INVALID_VALUE, f"Invalid request: {text}")


class Frame(msgspec.Struct):
    """A decoded frame: its type (None when it could not be read) and the validated request."""

    type: int | None
    request: Any = None
    error: ProtocolError | None = None


_TOO_DEEP = ProtocolError(ErrorCode.INVALID_FRAME, "Invalid request: JSON nested too deeply")


_NOT_UTF8 = ProtocolError(ErrorCode.JSON_PARSING)


def frame_text(raw: str | bytes | bytearray | memoryview) -> bytes | None:
    """The frame as UTF-8 bytes, or None when it is not UTF-8 text.

    The one entry point for text and binary frames alike: a binary frame is read as the UTF-8
    text it must hold, and checked as a whole here, before any of it is decoded. (msgspec skips
    the bytes of ``data`` in the envelope and only meets a bad byte while decoding the request,
    where it raises UnicodeDecodeError instead of DecodeError.) A ``str`` with lone surrogates
    (no server hands one over, but a caller in-process might) is refused the same way.
    """
    if isinstance(raw, str):
        try:
            return raw.encode("utf-8")
        except UnicodeEncodeError:
            return None
    data = bytes(raw)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return data


def decode_frame(raw: str | bytes, settings: GatewaySettings) -> Frame:
    """Never raises: every failure becomes ``Frame.error`` with the code the reply carries."""
    text = frame_text(raw)
    if text is None:
        return Frame(type=None, error=_NOT_UTF8)
    try:
        return _decode(text, settings)
    except Exception as exc:  # pragma: no cover - a decoder bug must cost one reply, not the socket
        logger.warning("frame could not be decoded: %s", type(exc).__name__)
        return Frame(type=None, error=ProtocolError(ErrorCode.JSON_PARSING))


def _decode(raw: bytes, settings: GatewaySettings) -> Frame:
    try:
        envelope = msgspec.json.decode(raw, type=Envelope)
    except msgspec.ValidationError as exc:
        return Frame(type=None, error=validation_error(exc, ""))
    except msgspec.DecodeError:
        return Frame(type=None, error=ProtocolError(ErrorCode.JSON_PARSING))
    except RecursionError:
        # valid JSON nested thousands deep ("[[[[..."): msgspec gives up with RecursionError,
        # which would otherwise end the socket's receive loop
        return Frame(type=None, error=_TOO_DEEP)
    request_type = REQUEST_TYPES.get(envelope.type)
    if request_type is None:
        return Frame(type=envelope.type, error=ProtocolError(ErrorCode.UNKNOWN_MESSAGE))
    try:
        request = msgspec.json.decode(envelope.data, type=request_type)
        validate_request(request, settings)
    except msgspec.ValidationError as exc:
        return Frame(type=envelope.type, error=validation_error(exc, "data"))
    except (msgspec.DecodeError, UnicodeDecodeError):  # pragma: no cover - checked as a whole above
        return Frame(type=envelope.type, error=ProtocolError(ErrorCode.JSON_PARSING))
    except RecursionError:  # pragma: no cover - the envelope's decode meets the depth first
        return Frame(type=envelope.type, error=_TOO_DEEP)
    except ProtocolError as exc:
        return Frame(type=envelope.type, error=exc)
    return Frame(type=envelope.type, request=request)


# ---------------------------------------------------------------------------------------------
# Value checks msgspec cannot express with settings known only at run time.


def _check_text(name: str, value: str, limit: int, *, allow_blank: bool) -> None:
    if not allow_blank and not value.strip():
        raise ProtocolError(ErrorCode.INVALID_VALUE, f"Field `data.{name}` must not be empty")
    if len(value) > limit:
        raise ProtocolError(
            ErrorCode.FIELD_TOO_LONG, f"Field `data.{name}` is too long: {len(value)} characters, at most {limit}"
        )
    if "\x00" in value:
        # PostgreSQL text cannot hold NUL; refusing here beats a 500 from the sessions service
        raise ProtocolError(ErrorCode.INVALID_VALUE, f"Field `data.{name}` must not contain NUL characters")


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def is_uuid(value: str) -> bool:
    return uuid_or_none(value) is not None


def _check_session_id(value: str, *, allow_new: bool) -> str:
    if allow_new and value == NEW_SESSION:
        return value
    parsed = uuid_or_none(value)
    if parsed is None:
        allowed = 'a UUID or "NEW"' if allow_new else "a UUID"
        raise ProtocolError(ErrorCode.INVALID_VALUE, f"Field `data.session_id` must be {allowed}")
    return str(parsed)


def validate_request(request: msgspec.Struct, settings: GatewaySettings) -> None:
    user_id = getattr(request, "user_id", None)
    if user_id is not None:
        _check_text("user_id", user_id, MAX_USER_ID_CHARS, allow_blank=False)
    if isinstance(request, SessionRequest):
        request.session_id = _check_session_id(request.session_id, allow_new=False)
    elif isinstance(request, SearchRequest):
        # plain text: NUL (which PostgreSQL text cannot hold) is dropped, not refused
        request.query = request.query.replace("\x00", "")
        _check_text("query", request.query, settings.max_message_chars, allow_blank=False)
        if not 1 <= request.limit <= SEARCH_MAX_LIMIT:
            raise ProtocolError(ErrorCode.INVALID_VALUE, f"Field `data.limit` must be 1 to {SEARCH_MAX_LIMIT}")
    elif isinstance(request, ChatRequest):
        request.session_id = _check_session_id(request.session_id, allow_new=True)
        _check_text("message", request.message, settings.max_message_chars, allow_blank=False)
        if request.session_prompt is not None:
            _check_text("session_prompt", request.session_prompt, settings.max_prompt_chars, allow_blank=True)
        if request.file_name:
            _check_text("file_name", request.file_name, settings.max_file_name_chars, allow_blank=False)
            if not ISSUED_FILE_NAME.fullmatch(request.file_name):
                # Only the names the files service issues (what it stores and answers for): "/x",
                # "x/" or "//x" would reach the same file through the files service's path
                # normalisation, and the raw string would be stored as the turn's `file` entry.
                raise ProtocolError(ErrorCode.FILE_NOT_FOUND)
        else:
            request.file_name = None
        if request.on_disconnect is not None and request.on_disconnect not in ON_DISCONNECT:
            raise ProtocolError(
                ErrorCode.INVALID_VALUE, 'Field `data.on_disconnect` must be "continue" or "cancel"'
            )
        if request.model_name:
            _check_text("model_name", request.model_name, MAX_MODEL_NAME_CHARS, allow_blank=False)
            if _CONTROL.search(request.model_name):
                # no catalogue name has one, and billing refuses them outright
                raise ProtocolError(
                    ErrorCode.INVALID_VALUE, "Field `data.model_name` must not contain control characters"
                )
        else:
            request.model_name = None
            if request.model_id is None:
                raise ProtocolError(
                    ErrorCode.MISSING_FIELD, "Missing required field `data.model_name` (or `data.model_id`)"
                )
            if not 0 <= request.model_id <= MAX_MODEL_ID:
                raise ProtocolError(ErrorCode.INVALID_VALUE, "Field `data.model_id` must be a model id (0 or more)")


# ---------------------------------------------------------------------------------------------
# Replies


def encode_reply(message_type: int, data: Any) -> bytes:
    return msgspec.json.encode({"type": message_type, "data": data})


def encode_error(error: ProtocolError, message_type: int | None) -> bytes:
    return msgspec.json.encode({"error": error.message, "code": int(error.code), "type": message_type})
