"""Every mutating call replayed with its idempotency key: the same reply, and nothing changes."""
from __future__ import annotations

import uuid
from typing import Any

from litestar.testing import AsyncTestClient

from .conftest import balance_of, create_user, ledger_of


async def state_of(client: AsyncTestClient, user_id: str) -> tuple[Any, ...]:
    user = (await client.get(f"/v1/users/{user_id}")).json()
    models = (await client.get("/v1/models")).json()
    return user, await balance_of(client, user_id), await ledger_of(client, user_id), models


async def assert_replay_changes_nothing(
    client: AsyncTestClient, user_id: str, method: str, path: str, body: dict[str, Any]
) -> Any:
    first = await client.request(method, path, json=body)
    assert first.status_code < 300, first.text
    before = await state_of(client, user_id)
    replay = await client.request(method, path, json=body)
    assert replay.status_code == first.status_code
    assert replay.content == first.content
    assert await state_of(client, user_id) == before
    return first.json()


async def test_every_mutating_call_replays_its_first_result(billing: AsyncTestClient) -> None:
    key = uuid.uuid4().hex
    create = {"username": "replayed", "models": [8], "balance": 2, "idempotency_key": f"user:{key}"}
    first = await billing.post("/v1/users", json=create)
    assert first.status_code == 201
    user_id = first.json()["user_id"]
    before = await state_of(billing, user_id)
    replay = await billing.post("/v1/users", json=create)
    assert (replay.status_code, replay.content) == (201, first.content)
    assert await state_of(billing, user_id) == before

    users = f"/v1/users/{user_id}"
    await assert_replay_changes_nothing(
        billing, user_id, "POST", f"{users}/models/grant", {"model_ids": [4, 5], "idempotency_key": f"grant:{key}"}
    )
    await assert_replay_changes_nothing(
        billing, user_id, "POST", f"{users}/models/revoke", {"model_ids": [5], "idempotency_key": f"revoke:{key}"}
    )
    await assert_replay_changes_nothing(
        billing, user_id, "POST", f"{users}/credit", {"amount": 0.5, "idempotency_key": f"credit:{key}"}
    )
    await assert_replay_changes_nothing(
        billing, user_id, "POST", f"{users}/debit", {"amount_nanos": 1_000, "idempotency_key": f"debit:{key}"}
    )
    reserve = {"user_id": user_id, "model_id": 8, "input_tokens": 500, "output_tokens": 500,
               "idempotency_key": f"reserve:{key}"}
    reservation = await assert_replay_changes_nothing(billing, user_id, "POST", "/v1/reservations", reserve)
    await assert_replay_changes_nothing(
        billing, user_id, "POST", f"/v1/reservations/{reservation['reservation_id']}/settle",
        {"cost_nanos": 1_000_000, "idempotency_key": f"settle:{key}", "turn_id": key},
    )
    second = await assert_replay_changes_nothing(
        billing, user_id, "POST", "/v1/reservations", {**reserve, "idempotency_key": f"reserve2:{key}"}
    )
    await assert_replay_changes_nothing(
        billing, user_id, "POST", f"/v1/reservations/{second['reservation_id']}/release",
        {"idempotency_key": f"release:{key}"},
    )
    await assert_replay_changes_nothing(
        billing, user_id, "PUT", "/v1/models/60",
        {"name": "replayed-model", "provider": "ollama", "context_length": 2048,
         "input_price_per_1k": "0.001", "output_price_per_1k": "0.002", "idempotency_key": f"model:{key}"},
    )

    # After all of it: 2 $ in, 0.5 $ in, 1000 nanos out, 1M nanos charged for the one settled turn.
    balance = await balance_of(billing, user_id)
    assert balance["balance_nanos"] == 2_500_000_000 - 1_000 - 1_000_000
    kinds = [row["kind"] for row in await ledger_of(billing, user_id)]
    assert kinds == ["credit", "credit", "debit", "reserve", "settle", "reserve", "release"]


async def test_creating_a_user_with_a_stable_id_twice_creates_it_once(billing: AsyncTestClient) -> None:
    demo_id = str(uuid.uuid4())
    body = {"username": "demo", "models": [4, 5, 8], "balance": 1, "user_id": demo_id}
    first = await billing.post("/v1/users", json=body)
    again = await billing.post("/v1/users", json=body)
    assert first.status_code == again.status_code == 201
    assert first.json() == again.json()
    assert first.json()["balance_nanos"] == 1_000_000_000
    assert len(await ledger_of(billing, demo_id)) == 1


async def test_a_key_reused_for_a_different_request_is_refused(billing: AsyncTestClient) -> None:
    user = await create_user(billing)
    path = f"/v1/users/{user['user_id']}/credit"
    key = f"credit:{uuid.uuid4()}"
    assert (await billing.post(path, json={"amount": 1, "idempotency_key": key})).status_code == 200
    reused = await billing.post(path, json={"amount": 2, "idempotency_key": key})
    assert reused.status_code == 409
    assert reused.json()["error"]["code"] == "conflict"
    other_user = await create_user(billing)
    elsewhere = await billing.post(
        f"/v1/users/{other_user['user_id']}/credit", json={"amount": 1, "idempotency_key": key}
    )
    assert elsewhere.status_code == 409
    assert (await balance_of(billing, user["user_id"]))["balance_nanos"] == 2_000_000_000
    assert (await balance_of(billing, other_user["user_id"]))["balance_nanos"] == 1_000_000_000


async def test_a_refused_call_is_not_remembered(billing: AsyncTestClient) -> None:
    """A 402 changed nothing, so the same key may succeed once the balance allows it."""
    user = await create_user(billing, balance="0")
    body = {"user_id": user["user_id"], "model_id": 8, "input_tokens": 10, "output_tokens": 10,
            "idempotency_key": f"reserve:{uuid.uuid4()}"}
    assert (await billing.post("/v1/reservations", json=body)).status_code == 402
    credit = {"amount": 1, "idempotency_key": f"credit:{uuid.uuid4()}"}
    assert (await billing.post(f"/v1/users/{user['user_id']}/credit", json=credit)).status_code == 200
    assert (await billing.post("/v1/reservations", json=body)).status_code == 201
