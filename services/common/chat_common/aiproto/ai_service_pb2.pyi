import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Request(_message.Message):
    __slots__ = ("user_id", "session_id", "chat_message", "model_name", "session_prompt", "file_name", "chat_summary", "chat_history", "balance", "timestamp", "model_provider", "input_price_nanos_per_1k", "output_price_nanos_per_1k", "max_output_tokens")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CHAT_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    SESSION_PROMPT_FIELD_NUMBER: _ClassVar[int]
    FILE_NAME_FIELD_NUMBER: _ClassVar[int]
    CHAT_SUMMARY_FIELD_NUMBER: _ClassVar[int]
    CHAT_HISTORY_FIELD_NUMBER: _ClassVar[int]
    BALANCE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    MODEL_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    INPUT_PRICE_NANOS_PER_1K_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PRICE_NANOS_PER_1K_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    session_id: str
    chat_message: str
    model_name: str
    session_prompt: str
    file_name: _containers.RepeatedScalarFieldContainer[str]
    chat_summary: str
    chat_history: str
    balance: float
    timestamp: _timestamp_pb2.Timestamp
    model_provider: str
    input_price_nanos_per_1k: int
    output_price_nanos_per_1k: int
    max_output_tokens: int
    def __init__(self, user_id: _Optional[str] = ..., session_id: _Optional[str] = ..., chat_message: _Optional[str] = ..., model_name: _Optional[str] = ..., session_prompt: _Optional[str] = ..., file_name: _Optional[_Iterable[str]] = ..., chat_summary: _Optional[str] = ..., chat_history: _Optional[str] = ..., balance: _Optional[float] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., model_provider: _Optional[str] = ..., input_price_nanos_per_1k: _Optional[int] = ..., output_price_nanos_per_1k: _Optional[int] = ..., max_output_tokens: _Optional[int] = ...) -> None: ...

class Response(_message.Message):
    __slots__ = ("response_text", "cost", "timestamp", "input_tokens", "output_tokens", "cost_nanos")
    RESPONSE_TEXT_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_NANOS_FIELD_NUMBER: _ClassVar[int]
    response_text: str
    cost: float
    timestamp: _timestamp_pb2.Timestamp
    input_tokens: int
    output_tokens: int
    cost_nanos: int
    def __init__(self, response_text: _Optional[str] = ..., cost: _Optional[float] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., cost_nanos: _Optional[int] = ...) -> None: ...

class SummaryRequest(_message.Message):
    __slots__ = ("user_id", "session_id", "model_name", "model_provider", "previous_summary", "chat_entries", "timestamp", "input_price_nanos_per_1k", "output_price_nanos_per_1k")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_SUMMARY_FIELD_NUMBER: _ClassVar[int]
    CHAT_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    INPUT_PRICE_NANOS_PER_1K_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PRICE_NANOS_PER_1K_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    session_id: str
    model_name: str
    model_provider: str
    previous_summary: str
    chat_entries: str
    timestamp: _timestamp_pb2.Timestamp
    input_price_nanos_per_1k: int
    output_price_nanos_per_1k: int
    def __init__(self, user_id: _Optional[str] = ..., session_id: _Optional[str] = ..., model_name: _Optional[str] = ..., model_provider: _Optional[str] = ..., previous_summary: _Optional[str] = ..., chat_entries: _Optional[str] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., input_price_nanos_per_1k: _Optional[int] = ..., output_price_nanos_per_1k: _Optional[int] = ...) -> None: ...

class StreamChunk(_message.Message):
    __slots__ = ("delta", "done", "cost", "timestamp", "input_tokens", "output_tokens", "cost_nanos")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_NANOS_FIELD_NUMBER: _ClassVar[int]
    delta: str
    done: bool
    cost: float
    timestamp: _timestamp_pb2.Timestamp
    input_tokens: int
    output_tokens: int
    cost_nanos: int
    def __init__(self, delta: _Optional[str] = ..., done: _Optional[bool] = ..., cost: _Optional[float] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., cost_nanos: _Optional[int] = ...) -> None: ...
