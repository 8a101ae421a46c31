"""Every route's reply is in ``GET /schema/openapi.json`` as what it is.

Each HTTP service's app is built (``create_app`` from the environment; building connects to
nothing) and its OpenAPI document read: a route answering JSON must declare a schema that is an
object with properties (or an array of such objects), never ``bytes`` (``type: string``) nor an
untyped map. The two downloads (a file's bytes, streamed with the file's own content type) are
the only routes exempt.
"""
from __future__ import annotations

import importlib
from typing import Any

import pytest

SERVICES = ("gateway", "sessions", "files", "billing")
METHODS = ("get", "post", "put", "patch", "delete")
# (service, method, path): the bytes of a stored file, streamed with its own content type.
DOWNLOADS = {
    ("gateway", "GET", "/uploads/{file_name}"),
    ("files", "GET", "/v1/files/{file_name}/content"),
}
# The idempotent billing calls that used to be declared as bytes, with the struct they answer.
BILLING_REPLIES = {
    ("POST", "/v1/users"): "UserReply",
    ("POST", "/v1/users/{user_id}/models/grant"): "UserReply",
    ("POST", "/v1/users/{user_id}/models/revoke"): "UserReply",
    ("POST", "/v1/users/{user_id}/credit"): "LedgerEntryReply",
    ("POST", "/v1/users/{user_id}/debit"): "LedgerEntryReply",
    ("POST", "/v1/reservations"): "ReservationReply",
    ("POST", "/v1/reservations/{reservation_id}/settle"): "ReservationReply",
    ("POST", "/v1/reservations/{reservation_id}/release"): "ReservationReply",
}
GATEWAY_REPLIES = {
    ("GET", "/v1/admin/users/{user_id}/export"): "UserExport",
    ("POST", "/v1/admin/users/import"): "ImportReport",
    ("POST", "/v1/admin/users/{user_id}/erase"): "EraseReport",
    ("POST", "/upload"): "UploadReply",
}


@pytest.fixture(scope="module")
def documents() -> dict[str, dict[str, Any]]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SERVICE_TOKEN", "openapi-test-token")
        env.setenv("MIGRATE_ON_START", "false")
        return {
            name: importlib.import_module(f"chat_{name}.app").create_app().openapi_schema.to_schema()
            for name in SERVICES
        }


def resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        name = schema["$ref"].removeprefix("#/components/schemas/")
        schema = document["components"]["schemas"][name]
    return schema


def is_typed_object(document: dict[str, Any], schema: dict[str, Any]) -> bool:
    schema = resolve(document, schema)
    if schema.get("type") == "array":
        return is_typed_object(document, schema.get("items", {}))
    return schema.get("type") == "object" and bool(schema.get("properties"))


def operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, operation)
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in METHODS
    ]


def success_replies(operation: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {status: reply for status, reply in operation["responses"].items() if status.startswith("2")}


@pytest.mark.parametrize("service", SERVICES)
def test_every_json_route_declares_an_object_reply(documents: dict[str, dict[str, Any]], service: str) -> None:
    document = documents[service]
    untyped: list[str] = []
    for method, path, operation in operations(document):
        if (service, method, path) in DOWNLOADS:
            continue
        replies = success_replies(operation)
        assert replies, f"{service} {method} {path} declares no 2xx reply"
        for status, reply in replies.items():
            content = reply.get("content") or {}
            if not content:
                # only "204 No Content" may say nothing
                assert status == "204", f"{service} {method} {path} {status} declares no body"
                continue
            assert list(content) == ["application/json"], f"{service} {method} {path}: {list(content)}"
            if not is_typed_object(document, content["application/json"].get("schema", {})):
                untyped.append(f"{method} {path} {status}: {content['application/json'].get('schema')}")
    assert untyped == [], f"{service}: JSON replies without an object schema"


def test_the_exempt_downloads_exist(documents: dict[str, dict[str, Any]]) -> None:
    """An exemption naming a route that is gone (or renamed) would hide nothing: refuse it."""
    for service, method, path in DOWNLOADS:
        assert method.lower() in documents[service]["paths"][path]


@pytest.mark.parametrize(
    ("service", "expected"), [("billing", BILLING_REPLIES), ("gateway", GATEWAY_REPLIES)], ids=["billing", "gateway"]
)
def test_replies_once_declared_as_bytes_name_their_struct(
    documents: dict[str, dict[str, Any]], service: str, expected: dict[tuple[str, str], str]
) -> None:
    document = documents[service]
    for (method, path), struct in expected.items():
        replies = success_replies(document["paths"][path][method.lower()])
        assert len(replies) == 1, (method, path, replies)
        [reply] = replies.values()
        ref = reply["content"]["application/json"]["schema"].get("$ref", "")
        # Litestar prefixes a component with its module path when two structs share a name
        assert ref.split("/")[-1].split("_")[-1] == struct, (method, path, ref)


def test_reply_status_codes_are_the_documented_ones(documents: dict[str, dict[str, Any]]) -> None:
    """Building the reply in the controller kept each status: 201 for what creates, else 200."""
    billing = documents["billing"]["paths"]
    gateway = documents["gateway"]["paths"]
    assert set(success_replies(billing["/v1/users"]["post"])) == {"201"}
    assert set(success_replies(billing["/v1/reservations"]["post"])) == {"201"}
    for path in ("/v1/users/{user_id}/credit", "/v1/users/{user_id}/debit",
                 "/v1/users/{user_id}/models/grant", "/v1/reservations/{reservation_id}/settle"):
        assert set(success_replies(billing[path]["post"])) == {"200"}, path
    assert set(success_replies(gateway["/v1/admin/users/import"]["post"])) == {"201"}
    assert set(success_replies(gateway["/v1/admin/users/{user_id}/erase"]["post"])) == {"200"}
    assert set(success_replies(gateway["/upload"]["post"])) == {"202"}
