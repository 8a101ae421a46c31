"""The chat turn seen from the AI's side (a recording stand-in AI behind real gateway processes):
pipelining around slow turns, the last-N window and the running summary, ordering across two
gateways, Redis wipes, failures and hang-ups."""
from __future__ import annotations

import asyncio
import json
import time
import uuid

from redis.asyncio import Redis

from devstack.servers import ServiceProcess
from devstack.stack import Stack

from .conftest import (
    PROCESS_COST_NANOS,
    SUMMARY_COST_NANOS,
    StandInAI,
    assert_ai_saw_exact_window,
    assert_coherent,
    assert_error,
    assert_ok,
    balance_of,
    connect,
    internal,
    new_user,
    start_gateway,
    ws_url,
)

START_NANOS = 1_000_000_000


async def chat_of(url: str, user: str, session: str) -> list[dict[str, str]]:
    async with connect(url) as c:
        return json.loads(assert_ok(await c.request(2, user_id=user, session_id=session), 2)["chat"])


async def test_slow_turn_does_not_hold_up_other_requests(stack: Stack, stand_in_gateway: ServiceProcess) -> None:
    user = new_user(stack)
    async with connect(ws_url(stand_in_gateway)) as client:
        await client.send(3, user_id=user, session_id="NEW", model_id=8, message="slow:2.5 take your time",
                          session_prompt="")
        await client.send(1, user_id=user)
        await client.send(6, user_id=user)
        first, second = await client.recv(), await client.recv()
        # answered while the turn's AI call is still running: before its reply, not after
        assert {first["type"], second["type"]} == {1, 6}
        assert assert_ok(first if first["type"] == 1 else second, 1)["session_info"] == []
        turn = assert_ok(await client.recv(), 3)
        assert turn["message"] == "reply to: slow:2.5 take your time"
        assert turn["session_name"] == "slow:2.5 take your"


async def test_ai_request_carries_everything(
    stack: Stack, stand_in_ai: StandInAI, stand_in_gateway: ServiceProcess
) -> None:
    user = new_user(stack, balance=2.5)
    async with connect(ws_url(stand_in_gateway)) as client:
        session = assert_ok(await client.chat(user, "NEW", "first", session_prompt="You are terse."), 3)["session_id"]
        # no session_prompt: the stored one is kept
        await client.send(3, user_id=user, session_id=session, model_name="gpt-4-turbo", message="second")
        assert_ok(await client.recv(), 3)
    first, second = stand_in_ai.seen_for(session)
    assert first.model == "llama3.1:8b" and first.provider == "ollama"
    assert first.prompt == "You are terse." and second.prompt == "You are terse."
    assert second.model == "gpt-4-turbo" and second.provider == "openai"
    assert second.input_price == 10_000_000  # $0.01 per 1K in nano-dollars, from the reservation's model
    assert first.balance == 2.5
    assert first.files == [] and first.history == [] and first.summary == ""
    assert second.history == [{"role": "user", "content": "first"}, {"role": "assistant", "content": "reply to: first"}]
    uuid.UUID(first.metadata["x-turn-id"])
    assert first.metadata["x-turn-id"] != second.metadata["x-turn-id"]
    assert first.metadata["x-request-id"]
    # the turn id the AI saw is the one the ledger recorded for the debit
    ledger = stack.admin("GET", f"/v1/users/{user}/ledger?limit=100")["items"]
    settled = {e["turn_id"] for e in ledger if e["kind"] == "settle"}
    assert settled == {first.metadata["x-turn-id"], second.metadata["x-turn-id"]}


async def run_window_test(stack: Stack, ai: StandInAI, gateway: ServiceProcess) -> None:
    user = new_user(stack)
    async with connect(ws_url(gateway)) as client:
        session = assert_ok(await client.chat(user, "NEW", "turn 1"), 3)["session_id"]
        for i in range(2, 16):
            assert assert_ok(await client.chat(user, session, f"turn {i}"), 3)["message"] == f"reply to: turn {i}"
    final = await chat_of(ws_url(gateway), user, session)
    assert len(final) == 30
    assert_coherent(final)
    assert assert_ai_saw_exact_window(ai, session, final, window=10) == 15
    last = ai.seen_for(session)[-1]
    assert len(last.history) == 10 and last.history == final[18:28]
    # Folded ahead, in chunks: after turn 6 (12 entries, 2 past the window) the whole session
    # so far, and again after turn 12 (24 entries); turn 15 saw 19-28 and a summary of 1-24.
    assert last.summary.splitlines() == [f"{e['role']}: {e['content']}" for e in final[:24]]
    stored = internal(stack, "sessions", "GET", f"/v1/sessions/{session}?user_id={user}")
    assert stored["summarized_upto"] == 24 and stored["entry_count"] == 30
    assert stored["summary"].splitlines() == [f"{e['role']}: {e['content']}" for e in final[:24]]
    # 15 turns and 2 folds, each charged once
    money = balance_of(stack, user)
    assert money["reserved_nanos"] == 0
    assert money["balance_nanos"] == START_NANOS - 15 * PROCESS_COST_NANOS - 2 * SUMMARY_COST_NANOS
    # the protocol's balance (type 6, dollars) shows exactly the same fall
    async with connect(ws_url(gateway)) as client:
        shown = assert_ok(await client.request(6, user_id=user), 6)["balance"]
    assert shown == (START_NANOS - 15 * PROCESS_COST_NANOS - 2 * SUMMARY_COST_NANOS) / 1_000_000_000


async def test_window_and_summary_with_summarize_rpc(
    stack: Stack, stand_in_ai: StandInAI, stand_in_gateway: ServiceProcess
) -> None:
    before = len(stand_in_ai.summaries)
    await run_window_test(stack, stand_in_ai, stand_in_gateway)
    mine = stand_in_ai.summaries[before:]
    # two folds, each of the 12 entries not yet summarized, the second on top of the first
    assert [len(s["entries"]) for s in mine] == [12, 12]
    assert mine[0]["previous"] == "" and len(mine[1]["previous"].splitlines()) == 12


async def test_window_and_summary_with_an_original_ai_service(
    stack: Stack, original_ai: StandInAI, original_ai_gateway: ServiceProcess
) -> None:
    """Summarize answers UNIMPLEMENTED: the progressive-summary prompt through Process."""
    await run_window_test(stack, original_ai, original_ai_gateway)
    assert original_ai.fallback_summaries == 2


async def test_two_gateways_one_session(
    stack: Stack, stand_in_ai: StandInAI, stand_in_gateway: ServiceProcess
) -> None:
    other = start_gateway(stack, stand_in_ai.port, MAX_CHAT_HISTORY_CONTEXT="10")
    gateways = [stand_in_gateway, other]
    user = new_user(stack)
    async with connect(ws_url(stand_in_gateway)) as client:
        session = assert_ok(await client.chat(user, "NEW", "turn 0"), 3)["session_id"]

    async def turn(i: int) -> dict:
        async with connect(ws_url(gateways[i % 2])) as client:
            return assert_ok(await client.chat(user, session, f"turn {i}"), 3)

    replies = await asyncio.gather(*(turn(i) for i in range(1, 20)))
    assert sorted(r["message"] for r in replies) == sorted(f"reply to: turn {i}" for i in range(1, 20))
    final = await chat_of(ws_url(other), user, session)
    assert len(final) == 40
    assert_coherent(final)
    assert {e["content"] for e in final[::2]} == {f"turn {i}" for i in range(20)}
    # each turn saw every earlier one (as window + summary), whichever gateway served it
    assert assert_ai_saw_exact_window(stand_in_ai, session, final, window=10) == 20
    folds = len(stand_in_ai.summaries_for(session))
    assert folds >= 1
    money = balance_of(stack, user)
    assert money["reserved_nanos"] == 0
    assert money["balance_nanos"] == START_NANOS - 20 * PROCESS_COST_NANOS - folds * SUMMARY_COST_NANOS
    other.stop()


async def forget(redis: Redis, *names: str) -> None:
    """What a FLUSHALL does to one user and session (every key naming them), without touching
    the Redis other tests share; tests/faults flushes a Redis of its own for real."""
    for name in names:
        async for key in redis.scan_iter(match=f"*{name}*"):
            await redis.delete(key)


async def test_redis_forgetting_the_session_between_turns_loses_nothing(
    stack: Stack, stand_in_ai: StandInAI, stand_in_gateway: ServiceProcess
) -> None:
    user = new_user(stack)
    redis = Redis.from_url(stack.infra.redis_url)
    try:
        async with connect(ws_url(stand_in_gateway)) as client:
            session = assert_ok(await client.chat(user, "NEW", "turn 0"), 3)["session_id"]
            for i in range(1, 9):
                before = [key async for key in redis.scan_iter(match=f"*{session}*")]
                assert before, "the turn left its session's context in Redis"
                await forget(redis, session, user)
                reply = assert_ok(await client.chat(user, session, f"turn {i}"), 3)
                assert reply["session_name"] == "turn 0"
    finally:
        await redis.aclose()
    final = await chat_of(ws_url(stand_in_gateway), user, session)
    assert len(final) == 18
    assert_coherent(final)
    assert assert_ai_saw_exact_window(stand_in_ai, session, final, window=10) == 9


async def test_ai_failure_undoes_the_turn(
    stack: Stack, stand_in_ai: StandInAI, stand_in_gateway: ServiceProcess
) -> None:
    user = new_user(stack)
    async with connect(ws_url(stand_in_gateway)) as client:
        assert_error(await client.chat(user, "NEW", "fail right away"), 6, 3, "Unable to Receive Response To Query")
        # the new session is not left behind, nothing was charged or kept reserved
        assert assert_ok(await client.request(1, user_id=user), 1)["session_info"] == []
        money = balance_of(stack, user)
        assert money["balance_nanos"] == START_NANOS and money["reserved_nanos"] == 0
        session = assert_ok(await client.chat(user, "NEW", "works"), 3)["session_id"]
        assert_error(await client.chat(user, session, "fail again"), 6, 3)
        # the session goes on as if the failed turn never happened
        assert_ok(await client.chat(user, session, "after"), 3)
    final = await chat_of(ws_url(stand_in_gateway), user, session)
    assert [e["content"] for e in final[::2]] == ["works", "after"]
    assert stand_in_ai.seen_for(session)[-1].history == final[:2]
    money = balance_of(stack, user)
    assert money["reserved_nanos"] == 0 and money["balance_nanos"] == START_NANOS - 2 * PROCESS_COST_NANOS


async def test_hang_up_mid_turn_keeps_the_turn(
    stack: Stack, stand_in_ai: StandInAI, stand_in_gateway: ServiceProcess
) -> None:
    user = new_user(stack)
    async with connect(ws_url(stand_in_gateway)) as client:
        session = assert_ok(await client.chat(user, "NEW", "hello"), 3)["session_id"]
        await client.send(3, user_id=user, session_id=session, model_id=8, message="slow:1.5 are you there?")
        await asyncio.sleep(0.5)  # the AI has it now
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        final = await chat_of(ws_url(stand_in_gateway), user, session)
        if len(final) == 4:
            break
        await asyncio.sleep(0.2)
    assert [e["content"] for e in final[::2]] == ["hello", "slow:1.5 are you there?"]
    assert_coherent(final)
    money = balance_of(stack, user)
    assert money["reserved_nanos"] == 0 and money["balance_nanos"] == START_NANOS - 2 * PROCESS_COST_NANOS


async def test_failed_summary_is_folded_on_the_next_turn(
    stack: Stack, stand_in_ai: StandInAI, stand_in_gateway: ServiceProcess
) -> None:
    user = new_user(stack)
    async with connect(ws_url(stand_in_gateway)) as client:
        session = assert_ok(await client.chat(user, "NEW", "turn 1"), 3)["session_id"]
        for i in range(2, 12):
            assert_ok(await client.chat(user, session, f"turn {i}"), 3)
        assert len(stand_in_ai.summaries_for(session)) == 1  # after turn 6: entries 1-12
        stand_in_ai.fail_summaries = True
        try:
            assert_ok(await client.chat(user, session, "turn 12"), 3)  # its fold fails; the turn stands
            # the fold runs after the reply (still under the lock): wait until it has failed
            deadline = time.monotonic() + 10
            while session not in stand_in_ai.failed_summaries and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert session in stand_in_ai.failed_summaries
        finally:
            stand_in_ai.fail_summaries = False
        assert_ok(await client.chat(user, session, "turn 13"), 3)
    final = await chat_of(ws_url(stand_in_gateway), user, session)
    folds = stand_in_ai.summaries_for(session)
    # turn 13 folded, before calling the AI, what turn 12 could not (entries 13-24)
    assert [len(f["entries"]) for f in folds] == [12, 12]
    assert folds[1]["entries"] == final[12:24]
    assert folds[1]["previous"].splitlines() == [f"{e['role']}: {e['content']}" for e in final[:12]]
    # so turn 13 saw the exact window and a summary with no gap before it
    last = stand_in_ai.seen_for(session)[-1]
    assert last.message == "turn 13" and last.history == final[14:24]
    assert last.summary.splitlines() == [f"{e['role']}: {e['content']}" for e in final[:24]]
    money = balance_of(stack, user)
    assert money["balance_nanos"] == START_NANOS - 13 * PROCESS_COST_NANOS - 2 * SUMMARY_COST_NANOS


async def test_busy_session_times_out_with_its_own_code(stack: Stack, stand_in_ai: StandInAI) -> None:
    gateway = start_gateway(stack, stand_in_ai.port, TURN_LOCK_SECONDS="1")
    user = new_user(stack)
    async with connect(ws_url(gateway)) as first, connect(ws_url(gateway)) as second:
        session = assert_ok(await first.chat(user, "NEW", "hello"), 3)["session_id"]
        await first.send(3, user_id=user, session_id=session, model_id=8, message="slow:3 hold the session")
        # the AI has the slow turn: it holds the session's lock (taken before the AI is called)
        for _ in range(500):
            if len(stand_in_ai.seen_for(session)) == 2:
                break
            await asyncio.sleep(0.02)
        assert len(stand_in_ai.seen_for(session)) == 2, stand_in_ai.seen_for(session)
        # the lock is held (its lease renewed) while the turn runs; this one waits its 1 s and gives up
        assert_error(await second.chat(user, session, "me too"), 107, 3, "Session is busy")
        assert assert_ok(await first.recv(), 3)["message"] == "reply to: slow:3 hold the session"
    final = await chat_of(ws_url(gateway), user, session)
    assert [e["content"] for e in final[::2]] == ["hello", "slow:3 hold the session"]
    money = balance_of(stack, user)
    assert money["reserved_nanos"] == 0 and money["balance_nanos"] == START_NANOS - 2 * PROCESS_COST_NANOS
    gateway.stop()
