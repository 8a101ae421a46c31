"""Frame decoding and validation: every bad input becomes the right error code, never an
exception."""
from __future__ import annotations

import json
import uuid

import msgspec
import pytest

from chat_gateway.settings import GatewaySettings
from chat_gateway.ws.protocol import (
    ORIGINAL_MESSAGES,
    ChatRequest,
    ErrorCode,
    ProtocolError,
    SessionRequest,
    UserRequest,
    decode_frame,
    encode_error,
)

# fixed ids (they are part of test ids, which every pytest-xdist worker must collect alike)
USER = str(uuid.uuid5(uuid.NAMESPACE_URL, "test_protocol/user"))
SESSION = str(uuid.uuid5(uuid.NAMESPACE_URL, "test_protocol/session"))


@pytest.fixture(scope="module")
def settings() -> GatewaySettings:
    return GatewaySettings.from_env()


def frame(type_: object, **data: object) -> str:
    return json.dumps({"type": type_, "data": data})


def chat(**overrides: object) -> str:
    data: dict[str, object] = {
        "user_id": USER,
        "session_id": "NEW",
        "model_name": "llama3.1:8b",
        "message": "hello",
        "session_prompt": "be brief",
        "file_name": "",
    }
    data.update(overrides)
    return json.dumps({"type": 3, "data": {k: v for k, v in data.items() if v is not ...}})


def test_original_error_strings_are_verbatim() -> None:
    assert {int(k): v for k, v in ORIGINAL_MESSAGES.items()} == {
        0: "JSON Parsing Error",
        1: "Unknown Message",
        2: "JSON Marshal Error",
        3: "User Does Not Exists",
        4: "Unable to Create Session",
        5: "Unable to Load Session",
        6: "Unable to Receive Response To Query",
        7: "User Does Not Have Model Access",
        9: "Unable to Load Chats",
        10: "Unable to Delete Session",
        11: "Unable to Generate AI Model List",
        14: "Internal Server Error",
        15: "Insufficient balance",
        16: "Unable to get balance details",
    }
    # an original code cannot be reworded by a caller
    assert ProtocolError(ErrorCode.USER_NOT_FOUND, "something else").message == "User Does Not Exists"


def test_error_reply_shape() -> None:
    body = msgspec.json.decode(encode_error(ProtocolError(ErrorCode.UNKNOWN_MESSAGE), 42))
    assert body == {"error": "Unknown Message", "code": 1, "type": 42}


@pytest.mark.parametrize(
    ("raw", "type_"),
    [(frame(t, user_id=USER), t) for t in (0, 1, 5, 6)]
    + [(frame(2, user_id=USER, session_id=SESSION), 2), (frame(4, user_id=USER, session_id=SESSION), 4)],
)
def test_valid_frames(settings: GatewaySettings, raw: str, type_: int) -> None:
    decoded = decode_frame(raw, settings)
    assert decoded.error is None
    assert decoded.type == type_
    assert decoded.request.user_id == USER
    assert isinstance(decoded.request, SessionRequest if type_ in (2, 4) else UserRequest)


def test_valid_chat_frames(settings: GatewaySettings) -> None:
    decoded = decode_frame(chat(), settings)
    assert decoded.error is None
    request = decoded.request
    assert isinstance(request, ChatRequest)
    assert request.is_new and request.model_name == "llama3.1:8b" and request.file_name is None
    by_id = decode_frame(chat(model_name=..., model_id=8, session_id=SESSION.upper()), settings).request
    assert by_id.model_name is None and by_id.model_id == 8
    assert by_id.session_id == SESSION  # normalised, so Redis keys and paths agree
    # session_prompt absent keeps the stored one: None, not ""
    assert decode_frame(chat(session_prompt=...), settings).request.session_prompt is None
    # bytes work as well as text, and unknown extra fields are ignored
    assert decode_frame(chat(extra={"x": 1}).encode(), settings).error is None


@pytest.mark.parametrize(
    ("raw", "code", "type_", "text"),
    [
        ("not json", 0, None, "JSON Parsing Error"),
        ('{"type": 0, "data": {', 0, None, "JSON Parsing Error"),
        ("", 0, None, "JSON Parsing Error"),
        ('"\\ud800"', 0, None, "JSON Parsing Error"),
        ("[1, 2]", 100, None, "expected a JSON object"),
        ("null", 100, None, "expected a JSON object"),
        ('{"data": {}}', 101, None, "`type`"),
        ('{"type": "0", "data": {}}', 100, None, "`type` must be an integer"),
        ('{"type": 1.5, "data": {}}', 100, None, "`type` must be an integer"),
        ('{"type": true, "data": {}}', 100, None, "`type` must be an integer"),
        (frame(7, user_id=USER), 1, 7, "Unknown Message"),
        (frame(-1, user_id=USER), 1, -1, "Unknown Message"),
        ('{"type": 99999999999999999999999, "data": {}}', 1, 99999999999999999999999, "Unknown Message"),
        ('{"type": 0, "data": null}', 100, 0, "`data` must be an object"),
        ('{"type": 0, "data": []}', 100, 0, "`data` must be an object"),
        ('{"type": 0, "data": "x"}', 100, 0, "`data` must be an object"),
        (frame(0, user_id=5), 102, 0, "`data.user_id` must be a string"),
        (frame(0, user_id=""), 103, 0, "`data.user_id` must not be empty"),
        (frame(0, user_id="x" * 200), 105, 0, "`data.user_id` is too long"),
        (frame(2, user_id=USER), 101, 2, "Missing required field `data.session_id`"),
        (frame(2, user_id=USER, session_id="NEW"), 103, 2, "`data.session_id` must be a UUID"),
        (frame(4, user_id=USER, session_id="nope"), 103, 4, "`data.session_id` must be a UUID"),
        (frame(4, user_id=USER, session_id=7), 102, 4, "`data.session_id` must be a string"),
        (chat(session_id="x"), 103, 3, '`data.session_id` must be a UUID or "NEW"'),
        (chat(session_id=...), 101, 3, "Missing required field `data.session_id`"),
        (chat(message=...), 101, 3, "Missing required field `data.message`"),
        (chat(message=""), 103, 3, "`data.message` must not be empty"),
        (chat(message=" \n\t "), 103, 3, "`data.message` must not be empty"),
        (chat(message=12), 102, 3, "`data.message` must be a string"),
        (chat(message="a\u0000b"), 103, 3, "`data.message` must not contain NUL"),
        (chat(model_name=...), 101, 3, "`data.model_name` (or `data.model_id`)"),
        (chat(model_name=""), 101, 3, "`data.model_name` (or `data.model_id`)"),
        (chat(model_name=..., model_id="8"), 102, 3, "`data.model_id` must be an integer"),
        (chat(model_name=..., model_id=-1), 103, 3, "`data.model_id`"),
        (chat(model_name=..., model_id=2**40), 103, 3, "`data.model_id`"),
        (chat(model_name=8), 102, 3, "`data.model_name` must be a string"),
        (chat(session_prompt=5), 102, 3, "`data.session_prompt` must be a string"),
        (chat(file_name=3), 102, 3, "`data.file_name` must be a string"),
    ],
)
def test_bad_frames(settings: GatewaySettings, raw: str, code: int, type_: int | None, text: str) -> None:
    decoded = decode_frame(raw, settings)
    assert decoded.request is None
    assert decoded.error is not None
    assert decoded.type == type_
    assert int(decoded.error.code) == code, decoded.error.message
    assert text in decoded.error.message


def test_lengths_come_from_settings(settings: GatewaySettings) -> None:
    limit = settings.max_message_chars
    assert decode_frame(chat(message="é" * limit), settings).error is None  # characters, not bytes
    too_long = decode_frame(chat(message="é" * (limit + 1)), settings).error
    assert too_long is not None and too_long.code == ErrorCode.FIELD_TOO_LONG
    assert "`data.message`" in too_long.message and str(limit) in too_long.message
    prompt = decode_frame(chat(session_prompt="p" * (settings.max_prompt_chars + 1)), settings).error
    assert prompt is not None and prompt.code == ErrorCode.FIELD_TOO_LONG and "`data.session_prompt`" in prompt.message
    name = decode_frame(chat(file_name="f" * (settings.max_file_name_chars + 1)), settings).error
    assert name is not None and name.code == ErrorCode.FIELD_TOO_LONG and "`data.file_name`" in name.message
    # an empty prompt is allowed: the original UI sends "" when the user set none
    assert decode_frame(chat(session_prompt=""), settings).error is None


def test_user_id_is_resolved_through_the_auth_seam() -> None:
    from chat_gateway.auth import effective_user_id

    assert effective_user_id(None, USER) == USER
    for claimed in (None, ""):
        with pytest.raises(ProtocolError) as missing:
            effective_user_id(None, claimed)
        assert missing.value.code == ErrorCode.MISSING_FIELD and "`data.user_id`" in missing.value.message
    # authenticated: the token's user wins, an absent claim is fine, a different one is refused
    assert effective_user_id(USER, None) == USER
    assert effective_user_id(USER, USER) == USER
    with pytest.raises(ProtocolError) as mismatch:
        effective_user_id(USER, str(uuid.uuid4()))
    assert mismatch.value.code == ErrorCode.USER_MISMATCH
