"""Balance-aware reserves (migration 0006) through billing's HTTP API on a real PostgreSQL: off by
default; on per user or per model, a reserve the balance or a limit refuses is made smaller down
to the caller's floor, and its settle never takes more than that hold."""
from __future__ import annotations

import uuid
from typing import Any

from litestar.testing import AsyncTestClient

from chat_billing.metrics import SMALLER_RESERVATIONS

from .conftest import assert_ledger_explains, balance_of, create_user, ledger_of

LLAMA = 8  # 1_500_000 nanos per 1K input tokens, 2_000_000 per 1K output tokens
FULL = 1024
FLOOR = 64


async def reserve(client: AsyncTestClient, user_id: str, **overrides: Any) -> Any:
    body: dict[str, Any] = {
        "user_id": user_id, "model_id": LLAMA, "input_tokens": 100, "output_tokens": FULL,
        "idempotency_key": f"reserve:{uuid.uuid4()}", "turn_id": str(uuid.uuid4()), "min_output_tokens": FLOOR,
    }
    body.update(overrides)
    return await client.post("/v1/reservations", json=body)


async def settle(client: AsyncTestClient, reservation: dict[str, Any], cost_nanos: int) -> dict[str, Any]:
    response = await client.post(f"/v1/reservations/{reservation['reservation_id']}/settle", json={
        "cost_nanos": cost_nanos, "idempotency_key": f"settle:{uuid.uuid4()}", "user_id": reservation["user_id"],
    })
    assert response.status_code == 200, response.text
    return response.json()


async def switch(client: AsyncTestClient, user_id: str, enabled: bool | None) -> dict[str, Any]:
    response = await client.put(f"/v1/users/{user_id}/balance-aware", json={"enabled": enabled})
    assert response.status_code == 200, response.text
    return response.json()


# 100 input tokens cost 150_000; each output token 2_000. $0.0003 leaves room for 75 output tokens.
SMALL = "0.0003"


async def test_off_by_default_a_low_balance_is_refused_as_before(billing: AsyncTestClient) -> None:
    user = (await create_user(billing, balance=SMALL))["user_id"]
    refused = await reserve(billing, user)
    assert refused.status_code == 402 and refused.json()["error"]["code"] == "insufficient_balance"
    shown = (await billing.get(f"/v1/users/{user}/balance-aware")).json()
    assert shown["enabled"] is None and all(m["balance_aware"] is False for m in shown["models"])
    assert (await ledger_of(billing, user))[-1]["kind"] == "credit"  # nothing written


async def test_on_a_low_balance_gets_a_smaller_hold_and_a_settle_within_it(billing: AsyncTestClient) -> None:
    user = (await create_user(billing, balance=SMALL))["user_id"]
    shown = await switch(billing, user, True)
    assert shown["enabled"] is True and all(m["balance_aware"] for m in shown["models"])
    smaller_before = SMALLER_RESERVATIONS._value.get()
    reply = await reserve(billing, user)
    assert reply.status_code == 201, reply.text
    assert SMALLER_RESERVATIONS._value.get() == smaller_before + 1
    hold = reply.json()
    assert hold["max_output_tokens"] == hold["output_tokens"] == 75
    assert hold["amount_nanos"] == 150_000 + 75 * 2_000 == 300_000 and hold["balance_nanos"] == 0
    # the same turn again: the same hold, and the same cap
    again = (await reserve(billing, user, turn_id=hold["turn_id"])).json()
    assert again["reservation_id"] == hold["reservation_id"] and again["max_output_tokens"] == 75

    # the AI overran the hold: the settle takes the hold, no more, and says what the AI reported
    settled = await settle(billing, hold, 450_000)
    assert (settled["charged_nanos"], settled["cost_nanos"]) == (300_000, 300_000)
    rows = await ledger_of(billing, user)
    assert rows[-1]["kind"] == "settle" and rows[-1]["details"]["balance_aware"] == {
        "cost_nanos": 450_000, "cap_nanos": 300_000
    }
    balance = (await balance_of(billing, user))["balance_nanos"]
    assert balance == 0
    assert_ledger_explains(rows, balance)


async def test_below_the_floor_and_without_a_floor_it_is_refused(billing: AsyncTestClient) -> None:
    user = (await create_user(billing, balance="0.0002"))["user_id"]  # room for 25 output tokens
    await switch(billing, user, True)
    refused = await reserve(billing, user)
    assert refused.status_code == 402 and refused.json()["error"]["code"] == "insufficient_balance"
    assert (await reserve(billing, user, min_output_tokens=20)).status_code == 201
    rich = (await create_user(billing, balance="0.0003"))["user_id"]
    await switch(billing, rich, True)
    body_without_floor = await reserve(billing, rich, min_output_tokens=None)
    assert body_without_floor.status_code == 402  # a caller that sends no floor: exactly as before


async def test_a_daily_limit_is_made_smaller_too_and_a_settle_within_the_hold(billing: AsyncTestClient) -> None:
    user = (await create_user(billing, balance="5"))["user_id"]
    assert (await billing.put(f"/v1/users/{user}/limits", json={"daily": "0.0005"})).status_code == 200
    refused = await reserve(billing, user)
    assert refused.status_code == 402 and refused.json()["error"]["code"] == "daily_limit_exceeded"
    await switch(billing, user, True)
    hold = (await reserve(billing, user)).json()
    assert hold["max_output_tokens"] == 175 and hold["amount_nanos"] == 500_000
    settled = await settle(billing, hold, 10_000_000)
    assert settled["charged_nanos"] == 500_000
    limits = (await billing.get(f"/v1/users/{user}/limits")).json()
    assert limits["daily"]["spent_nanos"] == 500_000 <= limits["daily"]["limit_nanos"]
    # the day is spent: refused, whatever the switch says
    assert (await reserve(billing, user)).json()["error"]["code"] == "daily_limit_exceeded"


async def test_a_per_model_switch_and_a_users_off_overrides_it(billing: AsyncTestClient) -> None:
    model = 9000 + uuid.uuid4().int % 900
    put = await billing.put(f"/v1/models/{model}", json={
        "name": f"aware-{model}", "provider": "ollama", "context_length": 4096,
        "input_price_per_1k": "0.0015", "output_price_per_1k": "0.002",
    })
    assert put.status_code == 200, put.text
    on = (await create_user(billing, balance=SMALL, models=[model]))["user_id"]
    off = (await create_user(billing, balance=SMALL, models=[model]))["user_id"]
    assert (await reserve(billing, on, model_id=model)).status_code == 402
    shown = await billing.put(f"/v1/models/{model}/balance-aware", json={"enabled": True})
    assert shown.status_code == 200 and shown.json()["enabled"] is True
    await switch(billing, off, False)
    assert (await reserve(billing, on, model_id=model)).json()["max_output_tokens"] == 75
    assert (await reserve(billing, off, model_id=model)).status_code == 402
    assert (await billing.get(f"/v1/users/{off}/balance-aware")).json()["models"][0]["balance_aware"] is False
    await switch(billing, off, None)  # back to the model's setting
    assert (await billing.get(f"/v1/users/{off}/balance-aware")).json()["models"][0]["balance_aware"] is True
    await billing.put(f"/v1/models/{model}/balance-aware", json={"enabled": False})
    assert (await billing.get(f"/v1/users/{off}/balance-aware")).json()["models"][0]["balance_aware"] is False


async def test_unknown_user_or_model_is_404(billing: AsyncTestClient) -> None:
    assert (await billing.put(f"/v1/users/{uuid.uuid4()}/balance-aware", json={"enabled": True})).status_code == 404
    assert (await billing.get(f"/v1/users/{uuid.uuid4()}/balance-aware")).status_code == 404
    assert (await billing.put("/v1/models/999999/balance-aware", json={"enabled": True})).status_code == 404
    user = (await create_user(billing))["user_id"]
    assert (await billing.put(f"/v1/users/{user}/balance-aware", json={"enabled": "yes"})).status_code == 400
