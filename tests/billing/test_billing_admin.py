"""Users, the catalogue, entitlements, credits and debits, the ledger, and what bad input gets."""
from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import pytest
from litestar.testing import AsyncTestClient

from chat_common.app import SERVICE_TOKEN_HEADER
from chat_common.db import plain_dsn

from .conftest import SCHEMA, balance_of, create_user, ledger_of

SEEDED = {
    0: ("gpt-3.5-turbo-0125", "openai", 16385, 500_000, 1_500_000),
    1: ("gpt-3.5-turbo", "openai", 16385, 3_000_000, 6_000_000),
    2: ("gpt-3.5-turbo-1106", "openai", 16385, 1_000_000, 2_000_000),
    3: ("gpt-3.5-turbo-instruct", "openai", 4096, 1_500_000, 2_000_000),
    4: ("gpt-4-turbo", "openai", 128000, 10_000_000, 30_000_000),
    5: ("gpt-4-turbo-2024-04-09", "openai", 128000, 10_000_000, 30_000_000),
    6: ("gpt-4", "openai", 8192, 30_000_000, 60_000_000),
    7: ("gpt-4-32k", "openai", 32768, 60_000_000, 120_000_000),
    8: ("llama3.1:8b", "ollama", 4096, 1_500_000, 2_000_000),
}


async def test_the_catalogue_is_seeded_from_the_protocol(billing: AsyncTestClient) -> None:
    models = (await billing.get("/v1/models")).json()["models"]
    seeded = {
        m["model_id"]: (m["name"], m["provider"], m["context_length"],
                        m["input_price_nanos_per_1k"], m["output_price_nanos_per_1k"])
        for m in models if m["model_id"] in SEEDED
    }
    assert seeded == SEEDED
    llama = next(m for m in models if m["model_id"] == 8)
    assert (llama["input_price_per_1k"], llama["output_price_per_1k"], llama["active"]) == (0.0015, 0.002, True)


async def test_user_reply_and_its_model_list(billing: AsyncTestClient) -> None:
    user = await create_user(billing, balance="1.5", models=[8, 4, 5, 4])
    assert user["models"] == [4, 5, 8]
    assert (user["balance"], user["balance_nanos"]) == (1.5, 1_500_000_000)
    assert user["created_at"].endswith("Z")
    fetched = (await billing.get(f"/v1/users/{user['user_id']}")).json()
    assert fetched == user
    listing = (await billing.get(f"/v1/users/{user['user_id']}/models")).json()["models"]
    assert [m["name"] for m in listing] == ["gpt-4-turbo", "gpt-4-turbo-2024-04-09", "llama3.1:8b"]


async def test_editing_the_catalogue(billing: AsyncTestClient) -> None:
    user = await create_user(billing, models=[8])
    body = {"name": "aardvark-1", "provider": "ollama", "context_length": 8192,
            "input_price_per_1k": 0.0004, "output_price_per_1k": "0.0008"}
    created = await billing.put("/v1/models/50", json=body)
    assert created.status_code == 200, created.text
    assert created.json() == {
        "model_id": 50, "name": "aardvark-1", "provider": "ollama", "context_length": 8192,
        "input_price_nanos_per_1k": 400_000, "output_price_nanos_per_1k": 800_000,
        "input_price_per_1k": 0.0004, "output_price_per_1k": 0.0008, "active": True,
    }
    granted = await billing.post(f"/v1/users/{user['user_id']}/models/grant", json={"model_ids": [50]})
    assert granted.json()["models"] == [8, 50]
    names = [m["name"] for m in (await billing.get(f"/v1/users/{user['user_id']}/models")).json()["models"]]
    assert names == ["aardvark-1", "llama3.1:8b"]

    replaced = await billing.put(
        "/v1/models/50", json={**body, "input_price_nanos_per_1k": 1, "input_price_per_1k": None, "active": False}
    )
    assert replaced.status_code == 200
    assert (replaced.json()["input_price_nanos_per_1k"], replaced.json()["active"]) == (1, False)
    names = [m["name"] for m in (await billing.get(f"/v1/users/{user['user_id']}/models")).json()["models"]]
    assert names == ["llama3.1:8b"]  # inactive models leave the list, the entitlement stays
    assert (await billing.get(f"/v1/users/{user['user_id']}")).json()["models"] == [8, 50]

    taken = await billing.put("/v1/models/51", json={**body, "name": "llama3.1:8b"})
    assert taken.status_code == 409
    assert taken.json()["error"]["code"] == "conflict"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/models/52", {"name": "m", "provider": "p", "context_length": 1,
                           "input_price_per_1k": -0.001, "output_price_per_1k": 0}),
        ("/v1/models/52", {"name": "m", "provider": "p", "context_length": 1,
                           "input_price_per_1k": 0.0000000001, "output_price_per_1k": 0}),
        ("/v1/models/52", {"name": "m", "provider": "p", "context_length": 1,
                           "input_price_per_1k": "NaN", "output_price_per_1k": 0}),
        ("/v1/models/52", {"name": "m", "provider": "p", "context_length": 1, "input_price_per_1k": 1}),
        ("/v1/models/52", {"name": "m", "provider": "p", "context_length": 0,
                           "input_price_per_1k": 1, "output_price_per_1k": 1}),
        ("/v1/models/52", {"name": "", "provider": "p", "context_length": 1,
                           "input_price_per_1k": 1, "output_price_per_1k": 1}),
        ("/v1/models/-1", {"name": "m", "provider": "p", "context_length": 1,
                           "input_price_per_1k": 1, "output_price_per_1k": 1}),
        ("/v1/models/abc", {"name": "m", "provider": "p", "context_length": 1,
                            "input_price_per_1k": 1, "output_price_per_1k": 1}),
        ("/v1/models/99999999999", {"name": "m", "provider": "p", "context_length": 1,
                                    "input_price_per_1k": 1, "output_price_per_1k": 1}),
    ],
)
async def test_bad_catalogue_edits_are_400(billing: AsyncTestClient, path: str, body: dict[str, Any]) -> None:
    reply = await billing.put(path, json=body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["code"] in ("bad_request", "validation_error")
    assert all(m["model_id"] != 52 for m in (await billing.get("/v1/models")).json()["models"])


async def test_grant_and_revoke(billing: AsyncTestClient) -> None:
    user = await create_user(billing, models=[])
    path = f"/v1/users/{user['user_id']}/models"
    assert (await billing.post(f"{path}/grant", json={"model_ids": [8, 4]})).json()["models"] == [4, 8]
    assert (await billing.post(f"{path}/grant", json={"model_ids": [4]})).json()["models"] == [4, 8]
    assert (await billing.post(f"{path}/revoke", json={"model_ids": [4]})).json()["models"] == [8]

    unknown = await billing.post(f"{path}/grant", json={"model_ids": [8, 12345]})
    assert unknown.status_code == 400
    assert unknown.json()["error"]["details"] == {"unknown_model_ids": [12345]}
    assert (await billing.post(f"{path}/grant", json={"model_ids": []})).status_code == 400
    nobody = await billing.post(f"/v1/users/{uuid.uuid4()}/models/grant", json={"model_ids": [8]})
    assert nobody.status_code == 404
    assert (await billing.get(f"/v1/users/{user['user_id']}")).json()["models"] == [8]


async def test_credit_and_debit(billing: AsyncTestClient) -> None:
    user = await create_user(billing, balance="0.25")
    path = f"/v1/users/{user['user_id']}"
    credit = await billing.post(
        f"{path}/credit", json={"amount": 0.1, "idempotency_key": f"c:{uuid.uuid4()}", "reason": "support"}
    )
    assert credit.status_code == 200
    entry = credit.json()
    assert (entry["kind"], entry["amount_nanos"]) == ("credit", 100_000_000)
    assert entry["balance_after_nanos"] == 350_000_000
    assert (entry["amount"], entry["balance_after"], entry["reason"]) == (0.1, 0.35, "support")

    debit_body = {"amount_nanos": 50_000_000, "idempotency_key": f"d:{uuid.uuid4()}"}
    debit = await billing.post(f"{path}/debit", json=debit_body)
    assert debit.status_code == 200
    assert (debit.json()["amount_nanos"], debit.json()["balance_after_nanos"]) == (-50_000_000, 300_000_000)

    too_much = await billing.post(f"{path}/debit", json={"amount": 1, "idempotency_key": f"d:{uuid.uuid4()}"})
    assert too_much.status_code == 402
    assert too_much.json()["error"]["code"] == "insufficient_balance"
    assert (await balance_of(billing, user["user_id"]))["balance_nanos"] == 300_000_000

    nobody = await billing.post(
        f"/v1/users/{uuid.uuid4()}/credit", json={"amount": 1, "idempotency_key": f"c:{uuid.uuid4()}"}
    )
    assert nobody.status_code == 404


@pytest.mark.parametrize(
    "body",
    [
        {"amount": -1},
        {"amount": 0},
        {"amount_nanos": 0},
        {"amount_nanos": -5},
        {"amount": 1, "amount_nanos": 1},
        {},
        {"amount": 1e30},
        {"amount": "1e5000"},
        {"amount": "Infinity"},
        {"amount": 0.1234567891},
        {"amount": True},
        {"amount_nanos": 1.5},
        {"amount_nanos": 10**30},
        {"amount": 1, "idempotency_key": ""},
        {"amount": 1, "idempotency_key": "k" * 201},
        {"amount": 1, "idempotency_key": "bad\x00key"},
        {"amount": 1, "reason": "r" * 501},
        {"amount": 1, "surprise": 1},
    ],
)
async def test_bad_amounts_are_400_and_change_nothing(billing: AsyncTestClient, body: dict[str, Any]) -> None:
    user = await create_user(billing)
    request = {"idempotency_key": f"k:{uuid.uuid4()}", **body}
    for action in ("credit", "debit"):
        reply = await billing.post(f"/v1/users/{user['user_id']}/{action}", json=request)
        assert reply.status_code == 400, (action, reply.text)
        assert reply.json()["error"]["code"] in ("bad_request", "validation_error")
    assert len(await ledger_of(billing, user["user_id"])) == 1


async def test_a_balance_cannot_be_credited_past_a_billion_dollars(billing: AsyncTestClient) -> None:
    user = await create_user(billing, balance="999999999")
    path = f"/v1/users/{user['user_id']}/credit"
    over = await billing.post(path, json={"amount": 2, "idempotency_key": f"c:{uuid.uuid4()}"})
    assert over.status_code == 400
    exact = await billing.post(path, json={"amount": 1, "idempotency_key": f"c:{uuid.uuid4()}"})
    assert exact.json()["balance_after_nanos"] == 10**18


async def test_ledger_pages_newest_first(billing: AsyncTestClient) -> None:
    user = await create_user(billing, balance="0")
    path = f"/v1/users/{user['user_id']}"
    for nanos in range(1, 8):
        body = {"amount_nanos": nanos, "idempotency_key": f"p:{uuid.uuid4()}"}
        reply = await billing.post(f"{path}/credit", json=body)
        assert reply.status_code == 200
    first = (await billing.get(f"{path}/ledger", params={"limit": 3})).json()
    assert (first["total"], first["limit"], first["offset"]) == (7, 3, 0)
    assert [e["amount_nanos"] for e in first["items"]] == [7, 6, 5]
    third = (await billing.get(f"{path}/ledger", params={"limit": 3, "offset": 6})).json()
    assert [e["amount_nanos"] for e in third["items"]] == [1]
    past_the_end = (await billing.get(f"{path}/ledger", params={"offset": 100})).json()
    assert (past_the_end["items"], past_the_end["total"]) == ([], 7)
    default = (await billing.get(f"{path}/ledger")).json()
    assert (default["limit"], len(default["items"])) == (50, 7)
    for params in ({"limit": 0}, {"limit": 501}, {"offset": -1}, {"limit": "x"}):
        assert (await billing.get(f"{path}/ledger", params=params)).status_code == 400
    assert (await billing.get(f"/v1/users/{uuid.uuid4()}/ledger")).status_code == 404


# a reservation id nothing is stored under; fixed, as it is part of test ids (which every
# pytest-xdist worker must collect alike)
NO_RESERVATION = uuid.uuid5(uuid.NAMESPACE_URL, "test_billing_admin/no-reservation")


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/users/not-a-uuid", None),
        ("GET", "/v1/users/not-a-uuid/balance", None),
        ("GET", "/v1/users/not-a-uuid/ledger", None),
        ("POST", "/v1/users/not-a-uuid/credit", {"amount": 1, "idempotency_key": "k"}),
        ("POST", "/v1/reservations/not-a-uuid/settle", {"cost_nanos": 1, "idempotency_key": "k"}),
        ("POST", "/v1/users", {"username": "x" * 201}),
        ("POST", "/v1/users", {"username": ""}),
        ("POST", "/v1/users", {"username": "tab\tname"}),
        ("POST", "/v1/users", {"username": "u", "user_id": "nope"}),
        ("POST", "/v1/users", {"username": "u", "models": "4,5"}),
        ("POST", "/v1/users", {"username": "u", "models": [-1]}),
        ("POST", "/v1/users", {"username": "u", "models": [2**40]}),
        ("POST", "/v1/users", {"username": "u", "models": [99999]}),
        ("POST", "/v1/users", {"username": "u", "balance": -1}),
        ("POST", "/v1/users", {"username": "u", "admin": True}),
        ("POST", "/v1/users", {"username": 5}),
        ("POST", "/v1/users", [1, 2]),
        ("POST", "/v1/users", "just a string"),
        ("POST", "/v1/reservations", {"user_id": str(uuid.uuid4()), "model_id": 8, "input_tokens": -1,
                                      "output_tokens": 1, "idempotency_key": "k"}),
        ("POST", "/v1/reservations", {"user_id": str(uuid.uuid4()), "model_id": 8, "input_tokens": 10**12,
                                      "output_tokens": 1, "idempotency_key": "k"}),
        ("POST", "/v1/reservations", {"user_id": str(uuid.uuid4()), "model_id": 8, "input_tokens": 1,
                                      "output_tokens": 1, "idempotency_key": "k", "ttl_seconds": 0}),
        ("POST", "/v1/reservations", {"user_id": str(uuid.uuid4()), "model_id": 8, "input_tokens": 1,
                                      "output_tokens": 1}),
        ("POST", f"/v1/reservations/{NO_RESERVATION}/settle", {"cost_nanos": -1, "idempotency_key": "k"}),
        ("POST", f"/v1/reservations/{NO_RESERVATION}/settle",
         {"cost_nanos": 1, "idempotency_key": "k", "details": {"note": "nul\x00inside"}}),
        ("POST", f"/v1/reservations/{NO_RESERVATION}/settle",
         {"cost_nanos": 1, "idempotency_key": "k", "details": [1, 2]}),
        ("POST", f"/v1/reservations/{NO_RESERVATION}/release", {}),
    ],
)
async def test_bad_input_is_a_clear_400(billing: AsyncTestClient, method: str, path: str, body: Any) -> None:
    reply = await billing.request(method, path, json=body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["code"] in ("bad_request", "validation_error")
    assert error["message"]


async def test_malformed_and_oversized_bodies(billing: AsyncTestClient) -> None:
    headers = {"content-type": "application/json"}
    broken = await billing.post("/v1/users", content=b'{"username": ', headers=headers)
    assert broken.status_code == 400
    assert broken.json()["error"]["code"] == "bad_request"
    huge = await billing.post("/v1/users", content=b'{"username": "' + b"x" * 200_000 + b'"}', headers=headers)
    assert huge.status_code == 413
    assert huge.json()["error"]["code"] == "payload_too_large"


async def test_deeply_nested_bodies_are_refused(billing: AsyncTestClient) -> None:
    headers = {"content-type": "application/json"}
    for depth in (40, 3_000, 30_000):
        nested = b"[" * depth + b"]" * depth
        body = b'{"cost_nanos": 1, "idempotency_key": "k", "details": {"a": ' + nested + b"}}"
        reply = await billing.post(f"/v1/reservations/{uuid.uuid4()}/settle", content=body, headers=headers)
        assert reply.status_code == 400, (depth, reply.text)
        assert "nests deeper" in reply.json()["error"]["message"]


async def test_the_service_token_is_required(billing: AsyncTestClient, service_token: str) -> None:
    missing = await billing.get("/v1/models", headers={SERVICE_TOKEN_HEADER: ""})
    assert missing.status_code == 401
    wrong = await billing.get("/v1/models", headers={SERVICE_TOKEN_HEADER: service_token[:-1]})
    assert wrong.status_code == 401
    assert wrong.json()["error"]["code"] == "unauthorized"
    ready = await billing.get("/ready", headers={SERVICE_TOKEN_HEADER: ""})
    assert (ready.status_code, ready.json()["checks"]) == (200, {"database": "ok"})


async def test_the_ledger_refuses_updates_and_deletes(billing: AsyncTestClient, billing_database: str) -> None:
    user = await create_user(billing)
    connection = await asyncpg.connect(plain_dsn(billing_database), server_settings={"search_path": SCHEMA})
    try:
        for statement in ("UPDATE ledger SET amount_nanos = 0", "DELETE FROM ledger", "TRUNCATE ledger"):
            with pytest.raises(asyncpg.RaiseError, match="append-only"):
                await connection.execute(statement)
    finally:
        await connection.close()
    assert (await ledger_of(billing, user["user_id"]))[0]["amount_nanos"] == 1_000_000_000


# One of each kind of trouble: wrong types, overflow of every integer width, non-finite and
# over-precise numbers, oversized and control-character strings, and nested containers.
HOSTILE_VALUES: list[Any] = [
    None, True, -1, 2**63, 10**40, 0.5, "1e999", "NaN", "", "x" * 5_000, "nul\x00", "not-a-uuid",
    [1, "a"], {"a": {"b": [2**70]}},
]


async def test_no_input_makes_the_service_fail(billing: AsyncTestClient) -> None:
    """Every field of every writing call, and the ids in the paths, replaced by hostile values:
    each reply is a deliberate 4xx or a success, never a 5xx (nor, see no_error_logs, a logged error)."""
    owner = await create_user(billing, balance="1")
    user_id = owner["user_id"]
    reservation = (await billing.post("/v1/reservations", json={
        "user_id": user_id, "model_id": 8, "input_tokens": 1, "output_tokens": 1, "idempotency_key": "fuzz-r"})).json()
    rid = reservation["reservation_id"]
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/v1/users", {"username": "fuzz", "models": [8], "balance": 1, "user_id": str(uuid.uuid4()),
                               "idempotency_key": "fuzz-u"}),
        ("POST", f"/v1/users/{user_id}/models/grant", {"model_ids": [4], "idempotency_key": "fuzz-g"}),
        ("POST", f"/v1/users/{user_id}/models/revoke", {"model_ids": [4], "idempotency_key": "fuzz-v"}),
        ("POST", f"/v1/users/{user_id}/credit", {"amount": 1, "idempotency_key": "fuzz-c", "reason": "r"}),
        ("POST", f"/v1/users/{user_id}/debit", {"amount_nanos": 1, "idempotency_key": "fuzz-d"}),
        ("PUT", "/v1/models/70", {"name": "fuzz-model", "provider": "p", "context_length": 10,
                                  "input_price_per_1k": 0.001, "output_price_per_1k": 0.001, "active": True}),
        ("POST", "/v1/reservations", {"user_id": user_id, "model_id": 8, "model_name": "llama3.1:8b",
                                      "input_tokens": 1, "output_tokens": 1, "idempotency_key": "fuzz-r2",
                                      "ttl_seconds": 60, "turn_id": "t"}),
        ("POST", f"/v1/reservations/{rid}/settle", {"cost_nanos": 1, "idempotency_key": "fuzz-s", "turn_id": "t",
                                                    "details": {"a": 1}, "user_id": user_id}),
        ("POST", f"/v1/reservations/{rid}/release", {"idempotency_key": "fuzz-l", "user_id": user_id}),
    ]
    statuses: set[int] = set()
    for method, path, valid in calls:
        for field in valid:
            for index, value in enumerate(HOSTILE_VALUES):
                body = {**valid, field: value}
                if "idempotency_key" in body and field != "idempotency_key":
                    body["idempotency_key"] = f"{valid['idempotency_key']}-{field}-{index}"
                reply = await billing.request(method, path, json=body)
                assert reply.status_code < 500, (method, path, field, value, reply.text)
                statuses.add(reply.status_code)
    for segment in ("%00", "..", "x" * 3000, "-1", "1e3", "%E2%80%AE", str(uuid.uuid4()).upper()):
        for method, path in (("GET", f"/v1/users/{segment}"), ("GET", f"/v1/users/{segment}/ledger"),
                             ("GET", f"/v1/reservations/{segment}?user_id={segment}"),
                             ("PUT", f"/v1/models/{segment}"), ("POST", f"/v1/reservations/{segment}/release")):
            reply = await billing.request(method, path, json={"idempotency_key": "fuzz-p"})
            assert reply.status_code < 500, (method, path, reply.text)
    assert {400, 200} <= statuses
