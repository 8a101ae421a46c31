"""The committed gRPC code matches proto/ (regenerate with ``python -m devstack proto``), and the
original contract's wire names and field numbers (proto/ai_service.proto) are intact."""
from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf.descriptor import FieldDescriptor

from chat_common.aiproto import ai_service_pb2
from devstack.proto import GENERATED, generate

COMMITTED = Path(__file__).resolve().parents[1] / "services" / "common" / "chat_common" / "aiproto"


def test_committed_code_is_what_the_proto_generates(tmp_path: Path) -> None:
    produced = generate(tmp_path)
    assert sorted(path.name for path in produced) == sorted(GENERATED)
    for path in produced:
        committed = COMMITTED / path.name
        assert committed.exists(), f"{committed} is missing; run `python -m devstack proto`"
        assert path.read_bytes() == committed.read_bytes(), (
            f"{committed.name} is out of date with proto/ai_service.proto; run `python -m devstack proto`"
        )


S, F, TS = FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_MESSAGE

ORIGINAL_REQUEST = {
    "user_id": (1, S), "session_id": (2, S), "chat_message": (3, S), "model_name": (4, S),
    "session_prompt": (5, S), "file_name": (6, S), "chat_summary": (7, S), "chat_history": (8, S),
    "balance": (9, F), "timestamp": (10, TS), "model_provider": (11, S),
}
ORIGINAL_RESPONSE = {"response_text": (1, S), "cost": (2, F), "timestamp": (3, TS)}


def test_package_service_and_method_are_the_originals() -> None:
    file = ai_service_pb2.DESCRIPTOR
    assert file.package == "ai_service"
    service = file.services_by_name["AIService"]
    assert service.full_name == "ai_service.AIService"
    process = service.methods_by_name["Process"]
    assert process.input_type.full_name == "ai_service.Request"
    assert process.output_type.full_name == "ai_service.Response"
    assert not process.client_streaming and not process.server_streaming


@pytest.mark.parametrize(
    ("message", "expected"),
    [("Request", ORIGINAL_REQUEST), ("Response", ORIGINAL_RESPONSE)],
)
def test_original_fields_keep_their_numbers_and_types(message: str, expected: dict[str, tuple[int, int]]) -> None:
    descriptor = ai_service_pb2.DESCRIPTOR.message_types_by_name[message]
    for name, (number, field_type) in expected.items():
        field = descriptor.fields_by_name[name]
        assert (field.number, field.type) == (number, field_type), name
    timestamp = descriptor.fields_by_name["timestamp"]
    assert timestamp.message_type.full_name == "google.protobuf.Timestamp"
    # Everything added to an original message is an extension numbered from 100 up.
    for field in descriptor.fields:
        if field.name not in expected:
            assert field.number >= 100, f"{message}.{field.name} uses original-range number {field.number}"


def test_original_fields_are_singular_except_file_name() -> None:
    for message, fields in (("Request", ORIGINAL_REQUEST), ("Response", ORIGINAL_RESPONSE)):
        descriptor = ai_service_pb2.DESCRIPTOR.message_types_by_name[message]
        for name in fields:
            assert descriptor.fields_by_name[name].is_repeated == (name == "file_name"), f"{message}.{name}"


def test_extension_fields_are_where_the_gateway_expects_them() -> None:
    request = ai_service_pb2.DESCRIPTOR.message_types_by_name["Request"].fields_by_name
    response = ai_service_pb2.DESCRIPTOR.message_types_by_name["Response"].fields_by_name
    assert (request["input_price_nanos_per_1k"].number, request["output_price_nanos_per_1k"].number) == (100, 101)
    # optional (presence tracked): unset means the provider's own limit, not zero tokens
    assert request["max_output_tokens"].number == 102 and request["max_output_tokens"].has_presence
    assert not ai_service_pb2.Request().HasField("max_output_tokens")
    assert (response["input_tokens"].number, response["output_tokens"].number, response["cost_nanos"].number) == (
        100, 101, 102
    )
    summarize = ai_service_pb2.DESCRIPTOR.services_by_name["AIService"].methods_by_name["Summarize"]
    assert summarize.input_type.full_name == "ai_service.SummaryRequest"
    assert summarize.output_type.full_name == "ai_service.Response"
