"""The money path of a turn as the rebuilt gateway drives it: reserves idempotent on turn_id,
leases, settles after expiry, owed charges by key (POST /v1/charges) under concurrent replays
from two billing replicas, and the SQL statements each call sends."""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from litestar.testing import AsyncTestClient

from chat_billing.app import create_app
from chat_billing.charges.schemas import ChargeBatchIn, ChargeIn
from chat_billing.charges.services import ChargeService
from chat_billing.pg import Pg
from chat_billing.reservations.schemas import (
    LeaseRequest,
    ReleaseRequest,
    ReserveRequest,
    SettleRequest,
)
from chat_billing.reservations.services import ReservationService
from chat_common import contracts
from chat_common.app import SERVICE_TOKEN_HEADER

from .conftest import (
    SCHEMA,
    assert_ledger_explains,
    balance_of,
    billing_settings,
    create_user,
    ledger_of,
)

LLAMA = 8
LLAMA_1K_EACH_NANOS = 3_500_000


def reserve_body(user_id: str, turn_id: str | None, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "user_id": user_id, "model_id": LLAMA, "input_tokens": 1000, "output_tokens": 1000,
        "idempotency_key": f"reserve:{turn_id or uuid.uuid4()}",
    }
    if turn_id is not None:
        body["turn_id"] = turn_id
    body.update(overrides)
    return body


async def reserve(client: AsyncTestClient, user_id: str, turn_id: str | None = None, **overrides: Any) -> Any:
    reply = await client.post("/v1/reservations", json=reserve_body(user_id, turn_id, **overrides))
    assert reply.status_code == 201, reply.text
    return reply.json()


def turn_charge(user_id: str, reservation_id: str, turn_id: str, cost: int) -> dict[str, Any]:
    return {"key": f"turn:{turn_id}", "kind": "turn", "user_id": user_id, "session_id": str(uuid.uuid4()),
            "turn_id": turn_id, "cost_nanos": cost, "reservation_id": reservation_id}


def summary_charge(user_id: str, session_id: str, upto: int, cost: int, turn_id: str = "t") -> dict[str, Any]:
    return {"key": f"summary:{session_id}:{upto}", "kind": "summary", "user_id": user_id,
            "session_id": session_id, "turn_id": turn_id, "cost_nanos": cost, "model_name": "llama3.1:8b"}


async def charge(client: AsyncTestClient, *items: dict[str, Any]) -> list[dict[str, Any]]:
    reply = await client.post("/v1/charges", json={"items": list(items)})
    assert reply.status_code == 200, reply.text
    results = reply.json()["results"]
    assert [r["key"] for r in results] == [i["key"] for i in items]
    # The reply is the contract's type.
    import msgspec

    msgspec.json.decode(reply.content, type=contracts.ChargeBatchResult)
    return results


# -- reserve idempotent on turn_id -------------------------------------------------------------


async def test_a_turn_reserved_twice_holds_once(billing: AsyncTestClient) -> None:
    user = await create_user(billing, balance="1")
    turn = str(uuid.uuid4())
    first = await reserve(billing, user["user_id"], turn)
    # Another idempotency key, other estimates: the turn's first hold is the answer.
    again = await reserve(billing, user["user_id"], turn, idempotency_key="another-key", input_tokens=5)
    assert again["reservation_id"] == first["reservation_id"]
    assert again["amount_nanos"] == first["amount_nanos"] == LLAMA_1K_EACH_NANOS
    assert again["balance_nanos"] == first["balance_nanos"]
    assert again["turn_id"] == turn
    balance = await balance_of(billing, user["user_id"])
    assert (balance["balance_nanos"], balance["reserved_nanos"]) == (1_000_000_000 - LLAMA_1K_EACH_NANOS,
                                                                      LLAMA_1K_EACH_NANOS)
    assert [row["kind"] for row in await ledger_of(billing, user["user_id"])] == ["credit", "reserve"]

    # Settled, the same turn reserved once more is still that reservation (nothing new held).
    settled = await billing.post(f"/v1/reservations/{first['reservation_id']}/settle",
                                 json={"cost_nanos": 1_000, "idempotency_key": f"settle:{turn}", "turn_id": turn})
    assert settled.status_code == 200
    late = await reserve(billing, user["user_id"], turn)
    assert (late["reservation_id"], late["status"]) == (first["reservation_id"], "settled")
    assert (await balance_of(billing, user["user_id"]))["balance_nanos"] == 1_000_000_000 - 1_000


async def test_concurrent_reserves_of_one_turn_hold_once(billing: AsyncTestClient) -> None:
    user = await create_user(billing, balance="1")
    turn = str(uuid.uuid4())
    replies = await asyncio.gather(*(
        billing.post("/v1/reservations", json=reserve_body(user["user_id"], turn, idempotency_key=f"k{i}"))
        for i in range(12)
    ))
    assert {r.status_code for r in replies} == {201}
    assert len({r.json()["reservation_id"] for r in replies}) == 1
    rows = await ledger_of(billing, user["user_id"])
    assert [row["kind"] for row in rows] == ["credit", "reserve"]
    assert_ledger_explains(rows, 1_000_000_000 - LLAMA_1K_EACH_NANOS)


async def test_a_turn_id_of_another_user_is_a_conflict(billing: AsyncTestClient) -> None:
    owner = await create_user(billing)
    other = await create_user(billing)
    turn = str(uuid.uuid4())
    await reserve(billing, owner["user_id"], turn)
    reply = await billing.post("/v1/reservations", json=reserve_body(other["user_id"], turn))
    assert reply.status_code == 409
    assert (await balance_of(billing, other["user_id"]))["balance_nanos"] == 1_000_000_000


async def test_a_refused_turn_reserve_may_be_asked_again(billing: AsyncTestClient) -> None:
    user = await create_user(billing, balance="0")
    turn = str(uuid.uuid4())
    refused = await billing.post("/v1/reservations", json=reserve_body(user["user_id"], turn))
    assert refused.status_code == 402
    await billing.post(f"/v1/users/{user['user_id']}/credit", json={"amount": 1, "idempotency_key": turn})
    assert (await reserve(billing, user["user_id"], turn))["status"] == "open"


# -- lease -------------------------------------------------------------------------------------


async def test_lease_pushes_an_open_hold_and_keeps_it_from_the_sweep(billing: AsyncTestClient) -> None:
    user = await create_user(billing)
    held = await reserve(billing, user["user_id"], str(uuid.uuid4()), ttl_seconds=1)
    leased = await billing.post(f"/v1/reservations/{held['reservation_id']}/lease",
                                json={"user_id": user["user_id"], "ttl_seconds": 600})
    assert leased.status_code == 200, leased.text
    body = leased.json()
    assert (body["reservation_id"], body["status"]) == (held["reservation_id"], "open")
    assert body["expires_at"] > held["expires_at"]
    await asyncio.sleep(1.1)
    await billing.post("/v1/reservations/expire")
    state = await billing.get(f"/v1/reservations/{held['reservation_id']}", params={"user_id": user["user_id"]})
    assert state.json()["status"] == "open"


async def test_lease_of_a_foreign_unknown_or_closed_reservation(billing: AsyncTestClient) -> None:
    owner = await create_user(billing)
    other = await create_user(billing)
    held = await reserve(billing, owner["user_id"], str(uuid.uuid4()))
    rid = held["reservation_id"]
    foreign = await billing.post(f"/v1/reservations/{rid}/lease", json={"user_id": other["user_id"], "ttl_seconds": 30})
    assert foreign.status_code == 404
    unknown = await billing.post(f"/v1/reservations/{uuid.uuid4()}/lease",
                                 json={"user_id": owner["user_id"], "ttl_seconds": 30})
    assert unknown.status_code == 404
    for bad in ({"user_id": owner["user_id"], "ttl_seconds": 0}, {"user_id": owner["user_id"]},
                {"user_id": "nope", "ttl_seconds": 30}):
        assert (await billing.post(f"/v1/reservations/{rid}/lease", json=bad)).status_code == 400

    released = await billing.post(f"/v1/reservations/{rid}/release",
                                  json={"idempotency_key": "r", "user_id": owner["user_id"]})
    assert released.status_code == 200
    closed = await billing.post(f"/v1/reservations/{rid}/lease", json={"user_id": owner["user_id"], "ttl_seconds": 600})
    assert closed.status_code == 200
    assert closed.json()["status"] == "released"
    assert closed.json()["expires_at"] == released.json()["expires_at"]  # left as it is


# -- settle once, also after expiry or release ----------------------------------------------------


async def test_settle_after_release_still_charges_and_only_once(billing: AsyncTestClient) -> None:
    user = await create_user(billing, balance_nanos=10_000_000, balance=None)
    turn = str(uuid.uuid4())
    held = await reserve(billing, user["user_id"], turn)
    rid = held["reservation_id"]
    await billing.post(f"/v1/reservations/{rid}/release", json={"idempotency_key": "x", "user_id": user["user_id"]})
    settle = {"cost_nanos": 12_000_000, "idempotency_key": f"settle:{turn}", "user_id": user["user_id"]}
    replies = await asyncio.gather(*(billing.post(f"/v1/reservations/{rid}/settle", json=settle) for _ in range(8)))
    assert {r.status_code for r in replies} == {200}
    assert len({r.content for r in replies}) == 1  # every repeat answers the stored outcome
    body = replies[0].json()
    assert (body["status"], body["charged_nanos"], body["shortfall_nanos"]) == ("settled", 10_000_000, 2_000_000)
    assert body["balance_nanos"] == 0
    rows = await ledger_of(billing, user["user_id"])
    assert [row["kind"] for row in rows] == ["credit", "reserve", "release", "settle"]
    assert rows[-1]["reason"] == "settled after the reservation was released"
    assert_ledger_explains(rows, 0)


# -- POST /v1/charges ------------------------------------------------------------------------------


async def test_turn_charges_settle_once(billing: AsyncTestClient) -> None:
    user = await create_user(billing, balance="1")
    turn = str(uuid.uuid4())
    held = await reserve(billing, user["user_id"], turn)
    item = turn_charge(user["user_id"], held["reservation_id"], turn, 2_000_000)
    [first] = await charge(billing, item)
    assert (first["status"], first["charged_nanos"], first["shortfall_nanos"]) == ("charged", 2_000_000, 0)
    [again] = await charge(billing, item)
    assert (again["status"], again["charged_nanos"]) == ("already", 2_000_000)
    # The settle route agrees: settled once.
    settle = await billing.post(f"/v1/reservations/{held['reservation_id']}/settle",
                                json={"cost_nanos": 9, "idempotency_key": "late", "user_id": user["user_id"]})
    assert (settle.json()["status"], settle.json()["charged_nanos"]) == ("settled", 2_000_000)
    assert (await balance_of(billing, user["user_id"]))["balance_nanos"] == 1_000_000_000 - 2_000_000
    rows = await ledger_of(billing, user["user_id"])
    assert [row["kind"] for row in rows] == ["credit", "reserve", "settle"]
    assert rows[-1]["turn_id"] == turn


async def test_summary_charges_are_a_debit_of_their_own_once_per_key(billing: AsyncTestClient) -> None:
    user = await create_user(billing, balance_nanos=5_000_000, balance=None)
    session = str(uuid.uuid4())
    [first] = await charge(billing, summary_charge(user["user_id"], session, 10, 3_000_000, turn_id="turn-s"))
    assert (first["status"], first["charged_nanos"], first["shortfall_nanos"]) == ("charged", 3_000_000, 0)
    [again] = await charge(billing, summary_charge(user["user_id"], session, 10, 3_000_000))
    assert (again["status"], again["charged_nanos"]) == ("already", 3_000_000)
    # The next fold costs more than is left: what the balance cannot cover is shortfall.
    [short] = await charge(billing, summary_charge(user["user_id"], session, 20, 4_000_000))
    assert (short["status"], short["charged_nanos"], short["shortfall_nanos"]) == ("charged", 2_000_000, 2_000_000)
    [broke] = await charge(billing, summary_charge(user["user_id"], session, 30, 1_000))
    assert (broke["status"], broke["charged_nanos"], broke["shortfall_nanos"]) == ("charged", 0, 1_000)
    rows = await ledger_of(billing, user["user_id"])
    assert [(r["kind"], r["reason"]) for r in rows[1:]] == [("debit", "summary")] * 3
    assert rows[1]["turn_id"] == "turn-s"
    assert rows[1]["idempotency_key"] == f"summary:{session}:10"
    assert rows[1]["model_id"] == LLAMA
    assert rows[1]["details"] == {"session_id": session}
    assert_ledger_explains(rows, 0)


async def test_refused_items_do_not_fail_the_others(billing: AsyncTestClient) -> None:
    owner = await create_user(billing, balance="1")
    other = await create_user(billing, balance="1")
    turn = str(uuid.uuid4())
    held = await reserve(billing, owner["user_id"], turn)
    session = str(uuid.uuid4())
    items = [
        summary_charge(str(uuid.uuid4()), session, 1, 10),  # unknown user
        turn_charge(owner["user_id"], str(uuid.uuid4()), "t-unknown", 10),  # unknown reservation
        turn_charge(other["user_id"], held["reservation_id"], turn, 10),  # another user's reservation
        {**turn_charge(owner["user_id"], held["reservation_id"], "t-none", 10), "reservation_id": None},
        {**summary_charge(owner["user_id"], session, 2, 10), "user_id": "not-a-uuid"},
        turn_charge(owner["user_id"], held["reservation_id"], turn, 1_000_000),  # fine
        summary_charge(owner["user_id"], session, 3, 500),  # fine
    ]
    items[3] = {k: v for k, v in items[3].items() if v is not None}
    results = await charge(billing, *items)
    assert [r["status"] for r in results] == ["refused"] * 5 + ["charged", "charged"]
    assert all(r["message"] for r in results[:5])
    assert (await balance_of(billing, owner["user_id"]))["balance_nanos"] == 1_000_000_000 - 1_000_000 - 500
    assert (await balance_of(billing, other["user_id"]))["balance_nanos"] == 1_000_000_000
    # A summary key taken by one user is refused for another.
    [taken] = await charge(billing, summary_charge(other["user_id"], session, 3, 500))
    assert taken["status"] == "refused"
    # More than 500 items, or a malformed item, is a bad request as a whole.
    too_many = [summary_charge(owner["user_id"], session, 100 + i, 1) for i in range(501)]
    assert (await billing.post("/v1/charges", json={"items": too_many})).status_code == 400
    bad = {**summary_charge(owner["user_id"], session, 9, 1), "cost_nanos": -1}
    assert (await billing.post("/v1/charges", json={"items": [bad]})).status_code == 400


async def test_a_replayed_batch_of_settled_turns_is_all_already(billing: AsyncTestClient) -> None:
    user = await create_user(billing, balance="1")
    items = []
    for _ in range(20):
        turn = str(uuid.uuid4())
        held = await reserve(billing, user["user_id"], turn)
        items.append(turn_charge(user["user_id"], held["reservation_id"], turn, 100_000))
    session = str(uuid.uuid4())
    items += [summary_charge(user["user_id"], session, upto, 1_000) for upto in range(5)]
    first = await charge(billing, *items)
    assert {r["status"] for r in first} == {"charged"}
    replay = await charge(billing, *items)
    assert {r["status"] for r in replay} == {"already"}
    assert [r["charged_nanos"] for r in replay] == [r["charged_nanos"] for r in first]
    # Duplicates inside one batch: the first applies, the second is already.
    dup = summary_charge(user["user_id"], session, 99, 7)
    assert [r["status"] for r in await charge(billing, dup, dup)] == ["charged", "already"]
    assert (await balance_of(billing, user["user_id"]))["balance_nanos"] == 1_000_000_000 - 20 * 100_000 - 5_000 - 7


@pytest.fixture
async def second_replica(billing_database: str, service_token: str) -> AsyncIterator[AsyncTestClient]:
    """Another billing replica (its own app and pool) on the same database."""
    app = create_app(billing_settings(billing_database, service_token))
    async with AsyncTestClient(app) as client:
        client.headers[SERVICE_TOKEN_HEADER] = service_token
        yield client


async def test_concurrent_replays_from_two_replicas_charge_each_key_once(
    billing: AsyncTestClient, second_replica: AsyncTestClient
) -> None:
    user = await create_user(billing, balance_nanos=50_000_000, balance=None)
    user_id = user["user_id"]
    items = []
    for _ in range(6):
        turn = str(uuid.uuid4())
        held = await reserve(billing, user_id, turn)
        items.append(turn_charge(user_id, held["reservation_id"], turn, 3_000_000))
    session = str(uuid.uuid4())
    # The summaries alone cost more than is left: shortfall, never below zero.
    items += [summary_charge(user_id, session, upto, 9_000_000) for upto in range(6)]
    batches = []
    for index in range(16):
        ordered = items if index % 2 else list(reversed(items))
        batches.append((billing if index % 2 else second_replica).post("/v1/charges", json={"items": ordered}))
    replies = await asyncio.gather(*batches)
    assert {r.status_code for r in replies} == {200}
    per_key: dict[str, list[dict[str, Any]]] = {}
    for reply in replies:
        for result in reply.json()["results"]:
            per_key.setdefault(result["key"], []).append(result)
    for key, results in per_key.items():
        assert sum(1 for r in results if r["status"] == "charged") == 1, key
        assert {r["status"] for r in results} <= {"charged", "already"}
        assert len({(r["charged_nanos"], r["shortfall_nanos"]) for r in results}) == 1, key
    rows = await ledger_of(billing, user_id)
    assert sorted(row["kind"] for row in rows) == sorted(["credit"] + ["reserve", "settle"] * 6 + ["debit"] * 6)
    balance = await balance_of(billing, user_id)
    assert balance["reserved_nanos"] == 0
    # 72M owed against 50M: what was charged is what left the balance, the rest is shortfall
    # (how much depends on the order the replicas got to the keys: a settle returns its hold).
    charged = sum(results[0]["charged_nanos"] for results in per_key.values())
    shortfall = sum(results[0]["shortfall_nanos"] for results in per_key.values())
    assert charged + shortfall == 6 * 3_000_000 + 6 * 9_000_000
    assert balance["balance_nanos"] == 50_000_000 - charged >= 0
    assert_ledger_explains(rows, balance["balance_nanos"])


# -- statements per call -----------------------------------------------------------------------


async def test_statements_sent_per_call(billing: AsyncTestClient, billing_database: str) -> None:
    """Every statement a call sends (asyncpg's query logger sees BEGIN, COMMIT and any reset
    query too). Counted after a warm-up, once each statement is prepared on the connection;
    a connection's first use of a statement adds one prepare round trip."""
    user = await create_user(billing, balance="1")
    user_id = uuid.UUID(user["user_id"])
    sent: list[str] = []

    async def log_queries(connection: asyncpg.Connection) -> None:
        connection.add_query_logger(lambda query: sent.append(query.query))

    pg = Pg(billing_database, SCHEMA, min_size=1, max_size=1, init=log_queries)
    await pg.open()
    try:
        reservations = ReservationService(pg, 30)
        charges = ChargeService(pg)

        async def count(call: Any) -> int:
            await call()  # warm-up with a different turn (prepares the statements)
            sent.clear()
            await call()
            return len(sent)

        async def turn_pair() -> None:
            turn = str(uuid.uuid4())
            held = await reservations.reserve(ReserveRequest(
                user_id=user_id, input_tokens=10, output_tokens=10, idempotency_key=f"reserve:{turn}",
                model_id=LLAMA, turn_id=turn))
            rid = uuid.UUID(held.reservation_id)
            await reservations.lease(rid, LeaseRequest(user_id=user_id, ttl_seconds=30))
            await reservations.settle(rid, SettleRequest(cost_nanos=5, idempotency_key=f"settle:{turn}",
                                                         turn_id=turn, user_id=user_id))
            await reservations.release(rid, ReleaseRequest(idempotency_key=f"release:{turn}", user_id=user_id))

        assert await count(turn_pair) == 4  # reserve, lease, settle, release: one statement each

        async def keyed_reserve() -> None:
            await reservations.reserve(ReserveRequest(
                user_id=user_id, input_tokens=10, output_tokens=10, idempotency_key=str(uuid.uuid4()),
                model_id=LLAMA))

        # Without turn_id the idempotency table: BEGIN, claim, reserve, remember, COMMIT.
        assert await count(keyed_reserve) == 5

        settled: list[ChargeIn] = []
        for _ in range(50):
            turn = str(uuid.uuid4())
            held = await reservations.reserve(ReserveRequest(
                user_id=user_id, input_tokens=10, output_tokens=10, idempotency_key=turn, model_id=LLAMA,
                turn_id=turn))
            rid = held.reservation_id
            await reservations.settle(uuid.UUID(rid), SettleRequest(cost_nanos=5, idempotency_key=turn))
            settled.append(ChargeIn(key=f"turn:{turn}", kind="turn", user_id=str(user_id), session_id="s",
                                    turn_id=turn, cost_nanos=5, reservation_id=rid))
        summary = ChargeIn(key=f"summary:{uuid.uuid4()}:1", kind="summary", user_id=str(user_id),
                           session_id="s", turn_id="t", cost_nanos=5)
        warm_up = ChargeIn(key=f"summary:{uuid.uuid4()}:1", kind="summary", user_id=str(user_id),
                           session_id="s", turn_id="t", cost_nanos=5)
        await charges.apply(ChargeBatchIn(items=[settled[0], warm_up]))  # prepares (and asyncpg's type look-ups)
        sent.clear()
        result = await charges.apply(ChargeBatchIn(items=[*settled, summary]))
        assert [r.status for r in result.results] == ["already"] * 50 + ["charged"]
        assert len(sent) == 2, sent  # one look-up for the whole batch, one call for the new summary
        sent.clear()
        await charges.apply(ChargeBatchIn(items=[*settled, summary]))
        assert len(sent) == 1  # all already: the look-up alone
        sent.clear()
        await charges.apply(ChargeBatchIn(items=[summary]))
        assert len(sent) == 1  # the gateway's inline summary charge: one call
    finally:
        await pg.close()


# -- the connection pool ---------------------------------------------------------------------------


async def test_the_pool_hands_over_drops_cancelled_and_recovers(billing_database: str) -> None:
    pg = Pg(billing_database, SCHEMA, min_size=1, max_size=2)
    await pg.open()
    try:
        pool = pg.pool
        # More callers than connections: the rest wait and are handed connections in turn.
        values = await asyncio.gather(*(pool.fetchval("SELECT $1::int FROM pg_sleep(0.01)", i)
                                        for i in range(10)))
        assert values == list(range(10))
        assert pool._size <= 2

        # A request cancelled in the middle of a query: its connection is closed, not reused.
        slow = asyncio.create_task(pool.fetchval("SELECT pg_sleep(5)"))
        await asyncio.sleep(0.2)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        assert await pool.fetchval("SELECT 42") == 42

        # A failed statement leaves its connection usable; an open transaction is never reused.
        with pytest.raises(asyncpg.PostgresError):
            await pool.fetchval("SELECT 1 / 0")
        async with pool.acquire() as connection:
            await connection.execute("BEGIN")
        assert await pool.fetchval("SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction'"
                                   " AND datname = current_database()") == 0

        # A connection killed from the server side is replaced.
        async with pool.acquire() as victim, pool.acquire() as killer:
            await killer.fetchval("SELECT pg_terminate_backend($1)", victim.get_server_pid())
        failures, answers = 0, []
        for _ in range(4):
            try:
                answers.append(await pool.fetchval("SELECT 7"))
            # (InternalClientError: the termination arrived in the middle of the call)
            except (asyncpg.InterfaceError, asyncpg.InternalClientError, asyncpg.PostgresError, ConnectionError):
                failures += 1  # the one request that found the dead connection; it is dropped
        assert failures <= 1 and answers == [7] * (4 - failures)
    finally:
        await pg.close()
