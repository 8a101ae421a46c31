"""Reserve then settle, release, expiry, refusals and ownership, through the HTTP API against a
real PostgreSQL."""
from __future__ import annotations

import asyncio
import uuid
from typing import Any

from litestar.testing import AsyncTestClient

from chat_billing.app import create_app
from chat_common.app import SERVICE_TOKEN_HEADER

from .conftest import (
    assert_ledger_explains,
    balance_of,
    billing_settings,
    create_user,
    ledger_of,
)

# llama3.1:8b: 1_500_000 nanos per 1K input tokens, 2_000_000 per 1K output tokens.
LLAMA = 8
LLAMA_1K_EACH_NANOS = 3_500_000


async def reserve(client: AsyncTestClient, user_id: str, **overrides: Any) -> Any:
    body: dict[str, Any] = {
        "user_id": user_id,
        "model_id": LLAMA,
        "input_tokens": 1000,
        "output_tokens": 1000,
        "idempotency_key": f"reserve:{uuid.uuid4()}",
    }
    body.update(overrides)
    return await client.post("/v1/reservations", json=body)


async def settle(client: AsyncTestClient, reservation_id: str, cost_nanos: int, **extra: Any) -> Any:
    body = {"cost_nanos": cost_nanos, "idempotency_key": f"settle:{uuid.uuid4()}", **extra}
    return await client.post(f"/v1/reservations/{reservation_id}/settle", json=body)


async def release(client: AsyncTestClient, reservation_id: str, **extra: Any) -> Any:
    body = {"idempotency_key": f"release:{uuid.uuid4()}", **extra}
    return await client.post(f"/v1/reservations/{reservation_id}/release", json=body)


async def test_reserve_prices_the_estimate_and_holds_it(billing: AsyncTestClient) -> None:
    user = await create_user(billing, balance="1")
    reply = await reserve(billing, user["user_id"], input_tokens=1234, output_tokens=567, ttl_seconds=60)
    assert reply.status_code == 201, reply.text
    reservation = reply.json()
    # ceil((1234 * 1_500_000 + 567 * 2_000_000) / 1000)
    assert reservation["amount_nanos"] == 2_985_000
    assert reservation["status"] == "open"
    assert reservation["model"]["name"] == "llama3.1:8b"
    assert reservation["balance_nanos"] == 1_000_000_000 - 2_985_000
    balance = await balance_of(billing, user["user_id"])
    assert balance == {
        "user_id": user["user_id"],
        "balance": 0.997015,
        "balance_nanos": 997_015_000,
        "reserved_nanos": 2_985_000,
    }


async def test_reserve_by_model_name(billing: AsyncTestClient) -> None:
    user = await create_user(billing, models=[4])
    body = {"model_name": "gpt-4-turbo", "input_tokens": 10, "output_tokens": 10}
    reply = await reserve(billing, user["user_id"], model_id=None, **body)
    assert reply.status_code == 201, reply.text
    assert reply.json()["model"]["model_id"] == 4

    mismatch = await reserve(billing, user["user_id"], model_id=4, model_name="gpt-4")
    assert mismatch.status_code == 400
    neither = await reserve(billing, user["user_id"], model_id=None)
    assert neither.status_code == 400


async def test_refusals_change_nothing(billing: AsyncTestClient) -> None:
    user = await create_user(billing, balance="0.001", models=[4, 8])
    user_id = user["user_id"]
    rows_before = await ledger_of(billing, user_id)

    not_granted = await reserve(billing, user_id, model_id=6)
    assert not_granted.status_code == 403
    assert not_granted.json()["error"]["code"] == "model_not_entitled"
    unknown_model = await reserve(billing, user_id, model_id=999, model_name=None)
    assert unknown_model.status_code == 403
    assert unknown_model.json()["error"]["code"] == "model_not_entitled"
    unknown_name = await reserve(billing, user_id, model_id=None, model_name="no-such-model")
    assert unknown_name.status_code == 403

    # 1M nanos balance; gpt-4-turbo for 1K+1K tokens costs 40M.
    too_little = await reserve(billing, user_id, model_id=4)
    assert too_little.status_code == 402
    error = too_little.json()["error"]
    assert error["code"] == "insufficient_balance"
    assert error["details"] == {"balance_nanos": 1_000_000, "required_nanos": 40_000_000}

    unknown_user = await reserve(billing, str(uuid.uuid4()))
    assert unknown_user.status_code == 404
    assert unknown_user.json()["error"]["code"] == "not_found"

    assert (await balance_of(billing, user_id))["balance_nanos"] == 1_000_000
    assert await ledger_of(billing, user_id) == rows_before


async def test_zero_balance_is_refused_even_for_a_free_estimate(billing: AsyncTestClient) -> None:
    user = await create_user(billing, balance="0")
    reply = await reserve(billing, user["user_id"], input_tokens=0, output_tokens=0)
    assert reply.status_code == 402
    assert reply.json()["error"]["code"] == "insufficient_balance"


async def test_inactive_model_cannot_be_reserved(billing: AsyncTestClient) -> None:
    put = await billing.put(
        "/v1/models/40",
        json={"name": "retired-model", "provider": "openai", "context_length": 4096,
              "input_price_per_1k": 0.001, "output_price_per_1k": 0.002, "active": False},
    )
    assert put.status_code == 200, put.text
    user = await create_user(billing, models=[40])
    reply = await reserve(billing, user["user_id"], model_id=40)
    assert reply.status_code == 403
    assert reply.json()["error"]["code"] == "model_not_entitled"


async def test_release_on_failure_charges_nothing(billing: AsyncTestClient) -> None:
    user = await create_user(billing, balance="1")
    reservation = (await reserve(billing, user["user_id"])).json()
    assert reservation["balance_nanos"] == 1_000_000_000 - LLAMA_1K_EACH_NANOS

    released = await release(billing, reservation["reservation_id"], user_id=user["user_id"])
    assert released.status_code == 200, released.text
    body = released.json()
    assert body["status"] == "released"
    assert body["release_reason"] == "released"
    assert body["charged_nanos"] == 0
    assert body["released_nanos"] == LLAMA_1K_EACH_NANOS
    assert body["balance_nanos"] == 1_000_000_000

    again = await release(billing, reservation["reservation_id"])  # another key: still nothing more
    assert again.status_code == 200
    assert again.json()["balance_nanos"] == 1_000_000_000
    balance = await balance_of(billing, user["user_id"])
    assert balance["balance_nanos"] == 1_000_000_000
    assert balance["reserved_nanos"] == 0
    rows = await ledger_of(billing, user["user_id"])
    assert [row["kind"] for row in rows] == ["credit", "reserve", "release"]
    assert_ledger_explains(rows, 1_000_000_000)


async def test_settle_returns_the_hold_and_charges_the_cost(billing: AsyncTestClient) -> None:
    user = await create_user(billing, balance="1")
    reservation = (await reserve(billing, user["user_id"], turn_id="turn-a")).json()
    reply = await settle(billing, reservation["reservation_id"], 1_234_567, details={"output_tokens": 321})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["status"] == "settled"
    assert body["charged_nanos"] == 1_234_567
    assert body["released_nanos"] == LLAMA_1K_EACH_NANOS - 1_234_567
    assert body["shortfall_nanos"] == 0
    assert body["balance_nanos"] == 1_000_000_000 - 1_234_567

    # Settling again under a new key must not charge the turn twice.
    twice = await settle(billing, reservation["reservation_id"], 1_234_567)
    assert twice.status_code == 200
    assert (await balance_of(billing, user["user_id"]))["balance_nanos"] == 1_000_000_000 - 1_234_567
    rows = await ledger_of(billing, user["user_id"])
    assert [row["kind"] for row in rows] == ["credit", "reserve", "settle"]
    assert rows[-1]["turn_id"] == "turn-a"
    assert rows[-1]["details"] == {"output_tokens": 321}
    assert rows[-1]["charged_nanos"] == 1_234_567


async def test_settle_never_takes_the_balance_below_zero(billing: AsyncTestClient) -> None:
    user = await create_user(billing, balance_nanos=5_000_000, balance=None)
    reservation = (await reserve(billing, user["user_id"])).json()
    reply = await settle(billing, reservation["reservation_id"], 9_000_000)
    body = reply.json()
    assert body["charged_nanos"] == 5_000_000
    assert body["shortfall_nanos"] == 4_000_000
    assert body["released_nanos"] == 0
    assert body["balance_nanos"] == 0
    rows = await ledger_of(billing, user["user_id"])
    assert rows[-1]["shortfall_nanos"] == 4_000_000
    assert_ledger_explains(rows, 0)


async def test_expire_endpoint_releases_and_a_late_settle_still_charges(billing: AsyncTestClient) -> None:
    user = await create_user(billing, balance="0.01")
    short = (await reserve(billing, user["user_id"], ttl_seconds=1)).json()
    long = (await reserve(billing, user["user_id"], ttl_seconds=600)).json()
    await asyncio.sleep(1.1)

    expired = await billing.post("/v1/reservations/expire")
    assert expired.status_code == 200
    assert expired.json()["released"] >= 1
    state = await billing.get(f"/v1/reservations/{short['reservation_id']}", params={"user_id": user["user_id"]})
    assert state.json()["status"] == "released"
    assert state.json()["release_reason"] == "expired"
    still_open = await billing.get(f"/v1/reservations/{long['reservation_id']}", params={"user_id": user["user_id"]})
    assert still_open.json()["status"] == "open"
    assert (await balance_of(billing, user["user_id"]))["balance_nanos"] == 10_000_000 - LLAMA_1K_EACH_NANOS

    # The turn finished after all: its cost is charged from the balance, clamped at zero.
    late = await settle(billing, short["reservation_id"], 8_000_000)
    body = late.json()
    assert body["status"] == "settled"
    assert body["charged_nanos"] == 10_000_000 - LLAMA_1K_EACH_NANOS
    assert body["shortfall_nanos"] == 8_000_000 - body["charged_nanos"]
    assert body["balance_nanos"] == 0
    rows = await ledger_of(billing, user["user_id"])
    assert [row["kind"] for row in rows] == ["credit", "reserve", "reserve", "release", "settle"]
    assert rows[-1]["reason"] == "settled after the reservation was expired"
    assert_ledger_explains(rows, 0)


async def test_the_sweep_releases_expired_reservations(billing_database: str, service_token: str) -> None:
    app = create_app(billing_settings(billing_database, service_token, reservation_sweep_seconds=0.2))
    async with AsyncTestClient(app) as client:
        client.headers[SERVICE_TOKEN_HEADER] = service_token
        user = await create_user(client, balance="1")
        reservation = (await reserve(client, user["user_id"], ttl_seconds=1)).json()
        status = "open"
        for _ in range(50):
            await asyncio.sleep(0.1)
            reply = await client.get(
                f"/v1/reservations/{reservation['reservation_id']}", params={"user_id": user["user_id"]}
            )
            status = reply.json()["status"]
            if status != "open":
                break
        assert status == "released"
        assert reply.json()["release_reason"] == "expired"
        balance = await balance_of(client, user["user_id"])
        assert balance == {**balance, "balance_nanos": 1_000_000_000, "reserved_nanos": 0}


async def test_another_users_reservation_is_not_found(billing: AsyncTestClient) -> None:
    owner = await create_user(billing)
    other = await create_user(billing)
    reservation = (await reserve(billing, owner["user_id"])).json()
    rid = reservation["reservation_id"]

    assert (await settle(billing, rid, 1, user_id=other["user_id"])).status_code == 404
    assert (await release(billing, rid, user_id=other["user_id"])).status_code == 404
    peek = await billing.get(f"/v1/reservations/{rid}", params={"user_id": other["user_id"]})
    assert peek.status_code == 404
    assert peek.json()["error"]["code"] == "not_found"
    assert (await settle(billing, str(uuid.uuid4()), 1)).status_code == 404
    assert (await billing.get(f"/v1/reservations/{rid}")).status_code == 400  # user_id is required

    mine = await billing.get(f"/v1/reservations/{rid}", params={"user_id": owner["user_id"]})
    assert mine.json()["status"] == "open"
    assert (await balance_of(billing, other["user_id"]))["balance_nanos"] == 1_000_000_000
