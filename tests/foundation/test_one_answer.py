"""One answer for the same mistake, whichever internal service is asked (docs/internal-api.md,
Conventions: Errors).

- A malformed UUID in a path or a query is 400 ``validation_error``, message ``<key> must be a
  UUID``, details ``[{"message": "Invalid UUID", "key": <key>, "source": "path"|"query"}]``.
- A body field the call does not declare is 400 ``validation_error`` (nested ones included),
  the details naming the unknown field; ``idempotency_key`` is no field of the files calls.

Each case also sends the same request made right (a well-formed id, the body without the extra
field) and sees it get past validation, so a refusal is for the mistake and nothing else.

The sessions, files and billing apps run in-process on one freshly migrated database (a schema
each); the files app runs without its lifespan (no object store: none of these calls reaches it).
Also checked without a server: every request body of the three apps refuses unknown fields, and
declares every field the gateway's contract structs (chat_common.contracts) send.
"""
from __future__ import annotations

import importlib
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import httpx
import msgspec
import pytest
from litestar.testing import AsyncTestClient

from chat_common import contracts as c
from chat_common.app import SERVICE_TOKEN_HEADER
from chat_common.db import apply_migrations
from chat_common.settings import ServiceSettings

# a well-formed id nothing is stored under; fixed, as it is part of test ids (which every
# pytest-xdist worker must collect alike)
U = str(uuid.uuid5(uuid.NAMESPACE_URL, "test_one_answer/nobody"))
BAD = "not-a-uuid"
FILE = "0123456789abcdef0123456789abcdef.txt"  # the shape of a name the files service makes


@pytest.fixture(scope="module")
async def database(fresh_database: str) -> str:
    for schema, package in (("sessions", "chat_sessions"), ("files", "chat_files"), ("billing", "chat_billing")):
        await apply_migrations(fresh_database, schema, package)
    return fresh_database


@pytest.fixture(scope="module")
async def clients(database: str, service_token: str) -> AsyncIterator[dict[str, httpx.AsyncClient]]:
    from chat_billing.app import create_app as billing_app
    from chat_billing.settings import BillingSettings
    from chat_files.app import create_app as files_app
    from chat_files.settings import FilesSettings
    from chat_sessions.app import create_app as sessions_app
    from chat_sessions.settings import SessionsSettings

    def service(name: str) -> ServiceSettings:
        return ServiceSettings(name=name, host="127.0.0.1", port=0, service_token=service_token)

    sessions = sessions_app(SessionsSettings(service=service("sessions"), database_url=database, db_schema="sessions"))
    billing = billing_app(BillingSettings(
        service=service("billing"), database_url=database, db_schema="billing",
        reservation_ttl_seconds=300, reservation_sweep_seconds=3600,
    ))
    files = files_app(FilesSettings(
        service=service("files"), database_url=database, db_schema="files",
        s3_endpoint="http://127.0.0.1:9", s3_access_key="unused", s3_secret_key="unused", s3_bucket="unused",
        file_sweep_seconds=0,
    ))
    headers = {SERVICE_TOKEN_HEADER: service_token}
    await files.state.files.start()  # what its lifespan does first (ASGITransport runs no lifespan)
    async with (
        AsyncTestClient(sessions) as sessions_client,
        AsyncTestClient(billing) as billing_client,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=cast(Any, files)), base_url="http://files.test", headers=headers
        ) as files_client,
    ):
        sessions_client.headers.update(headers)
        billing_client.headers.update(headers)
        try:
            yield {"sessions": sessions_client, "files": files_client, "billing": billing_client}
        finally:
            files.state.files.storage.close()
            await files.state.files.close()


# (service, method, path with {id}, the key refused, where it is, a body)
MALFORMED_IDS = [
    ("sessions", "GET", "/v1/sessions/{id}?user_id=" + U, "session_id", "path", None),
    ("sessions", "GET", "/v1/sessions?user_id={id}", "user_id", "query", None),
    ("sessions", "GET", "/v1/sessions/" + U + "/turns/{id}?user_id=" + U, "turn_id", "path", None),
    ("sessions", "POST", "/v1/admin/users/{id}/erase", "user_id", "path", None),
    ("files", "GET", "/v1/sessions/{id}/files?user_id=" + U, "session_id", "path", None),
    ("files", "DELETE", "/v1/sessions/{id}/files?user_id=" + U, "session_id", "path", None),
    ("files", "GET", "/v1/users/{id}/usage", "user_id", "path", None),
    ("files", "GET", f"/v1/files/{FILE}?user_id={{id}}", "user_id", "query", None),
    ("files", "POST", "/v1/admin/users/{id}/files/erase", "user_id", "path", None),
    ("billing", "GET", "/v1/users/{id}", "user_id", "path", None),
    ("billing", "GET", "/v1/users/{id}/ledger", "user_id", "path", None),
    ("billing", "GET", "/v1/reservations/" + U + "?user_id={id}", "user_id", "query", None),
    ("billing", "POST", "/v1/reservations/{id}/release", "reservation_id", "path", {"idempotency_key": "k"}),
]


@pytest.mark.parametrize(
    ("service", "method", "path", "key", "source", "body"), MALFORMED_IDS,
    ids=[f"{case[0]} {case[1]} {case[2]}" for case in MALFORMED_IDS],
)
async def test_a_malformed_id_is_the_same_validation_error_everywhere(
    clients: dict[str, httpx.AsyncClient], service: str, method: str, path: str, key: str, source: str, body: Any
) -> None:
    client = clients[service]
    refused = await client.request(method, path.format(id=BAD), json=body)
    assert refused.status_code == 400, refused.text
    assert refused.json() == {
        "error": {
            "code": "validation_error",
            "message": f"{key} must be a UUID",
            "details": [{"message": "Invalid UUID", "key": key, "source": source}],
        }
    }
    well_formed = await client.request(method, path.format(id=str(uuid.uuid4())), json=body)
    assert well_formed.status_code != 400, well_formed.text


def unknown_field_cases() -> list[tuple[str, str, str, dict[str, Any], tuple[str | int, ...]]]:
    """(service, method, path, a body that passes validation, where in it to add a field)."""
    turn = str(uuid.uuid4())
    return [
        ("sessions", "POST", "/v1/sessions", {"user_id": U, "name": "n", "model_name": "m"}, ()),
        ("sessions", "POST", f"/v1/sessions/{U}/turns",
         {"user_id": U, "turn_id": turn, "entries": [{"role": "user", "content": "hi"}]}, ("entries", 0)),
        ("sessions", "POST", f"/v1/sessions/{U}/turns",
         {"user_id": U, "turn_id": turn, "entries": [{"role": "user", "content": "hi"}],
          "charge": {"cost_nanos": 1, "receipt": {"input_tokens": 1}}}, ("charge", "receipt")),
        ("sessions", "PUT", f"/v1/sessions/{U}/summary",
         {"user_id": U, "summary": "s", "summarized_upto": 1, "turn_id": turn}, ()),
        ("sessions", "POST", "/v1/outbox/ack", {"outbox_ids": []}, ()),
        ("sessions", "POST", "/v1/retention/expire", {"older_than_seconds": 10**9}, ()),
        ("sessions", "POST", f"/v1/admin/users/{U}/import", {"sessions": []}, ()),
        ("files", "POST", f"/v1/files/{FILE}/attach", {"user_id": U, "session_id": U}, ()),
        ("files", "POST", f"/v1/files/{FILE}/used", {"user_id": U, "session_id": U, "turn_id": turn}, ()),
        ("files", "POST", f"/v1/admin/users/{U}/files/import", {"files": []}, ()),
        ("billing", "POST", "/v1/users", {"username": "one-answer"}, ()),
        ("billing", "POST", f"/v1/reservations/{U}/settle",
         {"cost_nanos": 1, "idempotency_key": "k", "receipt": {"input_tokens": 1}}, ("receipt",)),
        ("billing", "POST", f"/v1/admin/users/{U}/erase", {"pseudonym": str(uuid.uuid4())}, ()),
    ]


def with_field(body: dict[str, Any], at: tuple[str | int, ...], name: str, value: Any) -> dict[str, Any]:
    copy = msgspec.json.decode(msgspec.json.encode(body))
    target = copy
    for step in at:
        target = target[step]
    target[name] = value
    return cast(dict[str, Any], copy)


UNKNOWN = unknown_field_cases()


@pytest.mark.parametrize(
    ("service", "method", "path", "body", "at"), UNKNOWN,
    ids=[f"{case[0]} {case[1]} {case[2].replace(U, '{id}')} {'.'.join(map(str, case[4])) or 'top'}" for case in UNKNOWN],
)
async def test_an_unknown_body_field_is_refused_everywhere(
    clients: dict[str, httpx.AsyncClient], service: str, method: str, path: str, body: dict[str, Any],
    at: tuple[str | int, ...],
) -> None:
    client = clients[service]
    refused = await client.request(method, path, json=with_field(body, at, "surplus_field", 1))
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["code"] == "validation_error"
    assert error["message"]
    [problem] = error["details"]
    assert problem["source"] == "body"
    assert "unknown field `surplus_field`" in problem["message"]
    # the same body without it gets past validation
    accepted = await client.request(method, path, json=body)
    assert accepted.status_code != 400, accepted.text


@pytest.mark.parametrize("call", ["attach", "used"])
async def test_files_takes_no_idempotency_key(clients: dict[str, httpx.AsyncClient], call: str) -> None:
    """Attach and used are idempotent by the file's state; a key is refused, not ignored."""
    body = {"user_id": U, "session_id": U, "idempotency_key": "k"}
    if call == "used":
        body["turn_id"] = str(uuid.uuid4())
    refused = await clients["files"].post(f"/v1/files/{FILE}/{call}", json=body)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["code"] == "validation_error"
    assert "unknown field `idempotency_key`" in refused.json()["error"]["details"][0]["message"]


# -- without a server ----------------------------------------------------------------------------


def request_bodies(service: str) -> dict[str, type[msgspec.Struct]]:
    app = importlib.import_module(f"chat_{service}.app").create_app()
    bodies: dict[str, type[msgspec.Struct]] = {}
    for route in app.routes:
        for handler in getattr(route, "route_handlers", []):
            data = handler.parsed_fn_signature.parameters.get("data")
            if data is not None:
                bodies[f"{sorted(handler.http_methods)} {route.path}"] = data.annotation
    return bodies


def structs_within(cls: type[msgspec.Struct]) -> list[msgspec.inspect.StructType]:
    """The struct and every struct nested in its fields, each once."""
    found: dict[type, msgspec.inspect.StructType] = {}
    pending: list[msgspec.inspect.Type] = [msgspec.inspect.type_info(cls)]
    while pending:
        info = pending.pop()
        if isinstance(info, msgspec.inspect.StructType):
            if info.cls in found:
                continue
            found[info.cls] = info
            pending.extend(field.type for field in info.fields)
        elif isinstance(info, msgspec.inspect.UnionType):
            pending.extend(info.types)
        elif isinstance(info, (msgspec.inspect.ListType, msgspec.inspect.SetType, msgspec.inspect.FrozenSetType,
                               msgspec.inspect.VarTupleType)):
            pending.append(info.item_type)
        elif isinstance(info, msgspec.inspect.DictType):
            pending.append(info.value_type)
        elif isinstance(info, msgspec.inspect.Metadata):
            pending.append(info.type)
    return list(found.values())


# Import bodies are exports: checked at their top level; what is inside is the export format's.
IMPORTS = {"SessionsImport", "FilesImport"}


@pytest.mark.parametrize("service", ["sessions", "files", "billing"])
def test_every_request_body_refuses_unknown_fields(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVICE_TOKEN", "one-answer-token")
    bodies = request_bodies(service)
    assert bodies, f"{service}: no request bodies found"
    lenient = [
        f"{route}: {info.cls.__qualname__}"
        for route, cls in bodies.items()
        for info in (structs_within(cls) if cls.__name__ not in IMPORTS else [struct_info(cls)])
        if not info.forbid_unknown_fields
    ]
    assert lenient == []


def struct_info(cls: type[msgspec.Struct]) -> msgspec.inspect.StructType:
    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType), cls
    return info


def field_names(cls: type[msgspec.Struct]) -> set[str]:
    return {field.encode_name for field in struct_info(cls).fields}


def gateway_sends() -> list[tuple[type[msgspec.Struct], str, str]]:
    """Each contract struct the gateway (or the sessions outbox, via the gateway) sends as a
    body, and the service struct that decodes it."""
    return [
        (c.SessionCreate, "chat_sessions.sessions.schemas", "SessionCreate"),
        (c.TurnAppend, "chat_sessions.sessions.schemas", "TurnAppend"),
        (c.EntryIn, "chat_sessions.sessions.schemas", "EntryIn"),
        (c.OwedCharge, "chat_sessions.sessions.schemas", "OwedCharge"),
        (c.ReceiptDetails, "chat_sessions.sessions.schemas", "Receipt"),
        (c.SummaryUpdate, "chat_sessions.sessions.schemas", "SummaryUpdate"),
        (c.ExpireRequest, "chat_sessions.sessions.schemas", "ExpireRequest"),
        (c.ExpiredAck, "chat_sessions.sessions.schemas", "ExpiredAck"),
        (c.OutboxAck, "chat_sessions.sessions.schemas", "OutboxAck"),
        (c.SessionsExport, "chat_sessions.sessions.admin", "SessionsImport"),
        (c.ErasureStep, "chat_sessions.sessions.admin", "ErasureStepIn"),
        (c.FileUse, "chat_files.files.schemas", "MarkUsed"),
        (c.FilesExport, "chat_files.files.admin", "FilesImport"),
        (c.ReserveRequest, "chat_billing.reservations.schemas", "ReserveRequest"),
        (c.SettleRequest, "chat_billing.reservations.schemas", "SettleRequest"),
        (c.ReceiptDetails, "chat_billing.reservations.schemas", "ReceiptIn"),
        (c.ReleaseRequest, "chat_billing.reservations.schemas", "ReleaseRequest"),
        (c.LeaseRequest, "chat_billing.reservations.schemas", "LeaseRequest"),
        (c.Charge, "chat_billing.charges.schemas", "ChargeIn"),
        (c.ChargeBatch, "chat_billing.charges.schemas", "ChargeBatchIn"),
        (c.BillingExport, "chat_billing.admin", "BillingImport"),
        (c.BillingErase, "chat_billing.admin", "BillingEraseIn"),
    ]


@pytest.mark.parametrize(
    ("contract", "module", "name"), gateway_sends(), ids=[f"{s[0].__name__}->{s[2]}" for s in gateway_sends()]
)
def test_every_field_a_contract_sends_is_declared(contract: type[msgspec.Struct], module: str, name: str) -> None:
    """With unknown fields refused, a field the gateway sends that a service does not declare
    would fail every turn: each contract's fields are a subset of its decoder's."""
    decoder = getattr(importlib.import_module(module), name)
    assert struct_info(decoder).forbid_unknown_fields
    assert field_names(contract) - field_names(decoder) == set()
