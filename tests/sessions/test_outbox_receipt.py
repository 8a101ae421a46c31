"""The receipt's details kept with an owed charge (migration 0007): written with the turn or the
summary in the same transaction, handed back by the outbox listing as the gateway decodes it,
absent when not sent, and never leaking into another row of the same transaction."""
from __future__ import annotations

import uuid
from typing import Any

import msgspec
from litestar.testing import AsyncTestClient

from chat_common import contracts

from .conftest import append_turn, create_session, fetch, new_id

RECEIPT: dict[str, Any] = {
    "input_tokens": 120, "output_tokens": 34, "first_seq": 0, "last_seq": 1, "summarized_upto": 0,
    "prompt_sha256": "ab" * 32,
}


async def _listed(client: AsyncTestClient, keys: set[str]) -> dict[str, contracts.Charge]:
    response = await client.get("/v1/outbox", params={"older_than_seconds": 0, "limit": 500})
    assert response.status_code == 200
    page = msgspec.json.decode(response.content, type=contracts.OutboxPage)
    return {item.charge.key: item.charge for item in page.items if item.charge.key in keys}


async def test_a_turn_and_a_summary_keep_their_receipt_in_the_outbox(
    client: AsyncTestClient, database_url: str
) -> None:
    user = new_id()
    session_id = (await create_session(client, user))["session_id"]
    await append_turn(client, session_id, user)
    turn, plain = new_id(), new_id()
    await append_turn(client, session_id, user, turn, expected_entry_count=2, charge={
        "cost_nanos": 5_000, "reservation_id": new_id(), "model_name": "gpt-4", "receipt": RECEIPT,
    })
    # a charge without details, right after: nothing carried over from the one before
    await append_turn(client, session_id, user, plain, charge={"cost_nanos": 7})
    fold: dict[str, Any] = {"input_tokens": 50, "output_tokens": 9, "first_seq": 0, "last_seq": 5, "summarized_upto": 6}
    stored = await client.put(f"/v1/sessions/{session_id}/summary", json={
        "user_id": user, "summary": "S6", "summarized_upto": 6, "turn_id": turn,
        "charge": {"cost_nanos": 700, "model_name": "gpt-4", "receipt": fold},
    })
    assert stored.status_code == 200

    keys = {f"turn:{turn}", f"turn:{plain}", f"summary:{session_id}:6"}
    listed = await _listed(client, keys)
    assert set(listed) == keys
    assert listed[f"turn:{turn}"].receipt == contracts.ReceiptDetails(**RECEIPT)
    assert listed[f"turn:{plain}"].receipt is None
    assert listed[f"summary:{session_id}:6"].receipt == contracts.ReceiptDetails(**fold)
    rows = await fetch(database_url, "SELECT key, receipt FROM outbox WHERE session_id = $1", uuid.UUID(session_id))
    assert {r["key"]: r["receipt"] is None for r in rows} == {
        f"turn:{turn}": False, f"turn:{plain}": True, f"summary:{session_id}:6": False
    }


async def test_a_replayed_append_keeps_the_first_receipt(client: AsyncTestClient) -> None:
    user = new_id()
    session_id = (await create_session(client, user))["session_id"]
    turn = new_id()
    await append_turn(client, session_id, user, turn, charge={"cost_nanos": 1, "receipt": RECEIPT})
    await append_turn(client, session_id, user, turn, charge={"cost_nanos": 1, "receipt": {"input_tokens": 1}})
    listed = await _listed(client, {f"turn:{turn}"})
    assert listed[f"turn:{turn}"].receipt == contracts.ReceiptDetails(**RECEIPT)


async def test_a_receipt_out_of_bounds_is_refused(client: AsyncTestClient) -> None:
    user = new_id()
    session_id = (await create_session(client, user))["session_id"]
    for bad in ({"input_tokens": -1}, {"first_seq": 2**31}, {"prompt_sha256": "not a digest"}):
        response = await client.post(f"/v1/sessions/{session_id}/turns", json={
            "user_id": user, "turn_id": new_id(), "entries": [{"role": "user", "content": "q"}],
            "charge": {"cost_nanos": 1, "receipt": bad},
        })
        assert response.status_code == 400, (bad, response.text)
