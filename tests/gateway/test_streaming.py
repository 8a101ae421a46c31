"""Streamed turns (docs/protocol.md, "Extensions" (streamed turns)) over real sockets: two gateway processes on one Redis,
in front of the real AI service with OFFLINE_STREAM_DELAY_MS (so a turn takes seconds), and the
recording stand-in AI that implements only Process (the fallback)."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import redis

from chat_common.aiproto import ai_service_pb2 as pb
from devstack.servers import ServiceProcess, free_port
from devstack.stack import Stack

from .conftest import (
    PROCESS_COST_NANOS,
    Client,
    StandInAI,
    assert_error,
    assert_ok,
    balance_of,
    connect,
    new_user,
    start_gateway,
    ws_url,
)

DELAY_MS = 40
TURN_NOT_FOUND = 120
# the offline reply echoes the message: this many words make a turn of a few seconds
LONG = " ".join(f"word{i}" for i in range(60))


@pytest.fixture(scope="module")
def slow_ai(stack: Stack) -> Iterator[ServiceProcess]:
    port = free_port()
    key = f"ai-slow-{uuid.uuid4().hex[:6]}"
    env = {**stack.base_env(), "AI_SERVER_PORT": str(port), "OFFLINE_STREAM_DELAY_MS": str(DELAY_MS)}
    process = ServiceProcess(key, port, stack.data_dir / "run" / key, module="chat_ai", env=env, health_path=None)
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def gw_a(stack: Stack, slow_ai: ServiceProcess) -> Iterator[ServiceProcess]:
    process = start_gateway(stack, slow_ai.port)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def gw_b(stack: Stack, slow_ai: ServiceProcess) -> Iterator[ServiceProcess]:
    process = start_gateway(stack, slow_ai.port)
    yield process
    process.stop()


async def start_stream(client: Client, user: str, session: str, message: str, **extra: Any) -> dict[str, Any]:
    """Sends a streamed type 3; returns its seq-0 frame's data."""
    await client.send(3, user_id=user, session_id=session, model_name="llama3.1:8b", message=message,
                      session_prompt="be brief", file_name="", stream=True, **extra)
    first = await client.recv()
    return assert_ok(first, 7)


async def read_to_end(client: Client, *, expect_type: int = 3) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Type 7 data frames until the final reply (returned as the whole frame)."""
    deltas: list[dict[str, Any]] = []
    while True:
        frame = await client.recv()
        if frame.get("type") == 7:
            deltas.append(frame["data"])
            continue
        return deltas, frame


def text_of(deltas: list[dict[str, Any]]) -> str:
    return "".join(d["delta"] for d in deltas)


async def stored_chat(url: str, user: str, session: str) -> list[dict[str, str]]:
    async with connect(url) as c:
        return json.loads(assert_ok(await c.request(2, user_id=user, session_id=session), 2)["chat"])


async def test_frame_sequence_gapless_and_equal_to_the_stored_entry(stack: Stack, gw_a: ServiceProcess) -> None:
    user = new_user(stack)
    async with connect(ws_url(gw_a)) as client:
        head = await start_stream(client, user, "NEW", "hello streaming world")
        assert head["seq"] == 0 and head["delta"] == ""
        uuid.UUID(head["turn_id"]), uuid.UUID(head["session_id"])
        assert head["session_name"] == "hello streaming"
        deltas, final = await read_to_end(client)
    reply = assert_ok(final, 3)
    assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
    assert len(deltas) > 5 and all(d["turn_id"] == head["turn_id"] for d in deltas)
    assert reply["finish_reason"] == "stop" and reply["turn_id"] == head["turn_id"]
    assert reply["session_id"] == head["session_id"] and reply["session_name"] == head["session_name"]
    assert reply["message"] == text_of(deltas)
    assert reply["message"].startswith("Echo: hello streaming world")
    chat = await stored_chat(ws_url(gw_a), user, head["session_id"])
    assert chat == [{"role": "user", "content": "hello streaming world"}, {"role": "assistant", "content": reply["message"]}]


async def test_a_plain_turn_is_unchanged(stack: Stack, gw_a: ServiceProcess) -> None:
    user = new_user(stack)
    async with connect(ws_url(gw_a)) as client:
        reply = await client.chat(user, "NEW", "no streaming here")
    assert reply["type"] == 3 and set(reply["data"]) == {"user_id", "session_id", "session_name", "message"}


async def test_pipelined_requests_are_answered_during_a_stream(stack: Stack, gw_a: ServiceProcess) -> None:
    user = new_user(stack)
    async with connect(ws_url(gw_a)) as client:
        await start_stream(client, user, "NEW", LONG)
        await client.send(1, user_id=user)
        await client.send(6, user_id=user)
        deltas, seen_types = 0, []
        while True:
            frame = await client.recv()
            if frame.get("type") == 7:
                deltas += 1
                continue
            seen_types.append(frame["type"])
            if frame["type"] == 3:
                break
    assert seen_types[:2] in ([1, 6], [6, 1]) and seen_types[2] == 3
    assert deltas > 50


async def test_resume_mid_stream_through_another_gateway_and_several_followers(
    stack: Stack, gw_a: ServiceProcess, gw_b: ServiceProcess
) -> None:
    user = new_user(stack)
    async with connect(ws_url(gw_a)) as starter, connect(ws_url(gw_b)) as other, connect(ws_url(gw_a)) as third:
        head = await start_stream(starter, user, "NEW", LONG)
        early = [assert_ok(await starter.recv(), 7) for _ in range(5)]
        k = early[-1]["seq"]
        await other.send(8, user_id=user, turn_id=head["turn_id"], after_seq=k)
        await third.send(8, user_id=user, turn_id=head["turn_id"], after_seq=0)
        (rest, final), (resumed, final_b), (all_c, final_c) = await asyncio.gather(
            read_to_end(starter), read_to_end(other), read_to_end(third)
        )
    message = assert_ok(final, 3)["message"]
    assert final == final_b == final_c
    assert [d["seq"] for d in resumed] == list(range(k + 1, k + 1 + len(resumed)))
    assert text_of(early) + text_of(resumed) == message
    assert text_of(early + rest) == text_of(all_c) == message
    assert [d["seq"] for d in all_c] == list(range(1, len(all_c) + 1))


async def test_resume_after_the_end_on_another_socket(stack: Stack, gw_a: ServiceProcess, gw_b: ServiceProcess) -> None:
    user = new_user(stack)
    async with connect(ws_url(gw_a)) as client:
        head = await start_stream(client, user, "NEW", "short one")
        deltas, final = await read_to_end(client)
    async with connect(ws_url(gw_b)) as later:
        await later.send(8, user_id=user, turn_id=head["turn_id"], after_seq=0)
        again, final_again = await read_to_end(later)
        await later.send(8, user_id=user, turn_id=head["turn_id"], after_seq=len(deltas))
        none, final_last = await read_to_end(later)
    assert again == deltas and final_again == final and none == [] and final_last == final


async def test_unknown_foreign_and_malformed_turn_ids_get_the_same_error(
    stack: Stack, gw_a: ServiceProcess, gw_b: ServiceProcess
) -> None:
    owner, stranger = new_user(stack), new_user(stack)
    async with connect(ws_url(gw_a)) as client:
        head = await start_stream(client, owner, "NEW", "mine alone")
        await read_to_end(client)
    replies = []
    async with connect(ws_url(gw_b)) as other:
        for turn_id, user in ((head["turn_id"], stranger), (str(uuid.uuid4()), owner), ("not-a-turn", owner)):
            replies.append(await other.request(8, user_id=user, turn_id=turn_id, after_seq=0))
            replies.append(await other.request(9, user_id=user, turn_id=turn_id))
    for reply, type_ in zip(replies, [8, 9] * 3, strict=True):
        assert_error(reply, TURN_NOT_FOUND, type_)
    assert len({r["error"] for r in replies}) == 1


async def test_refused_turns_send_no_type_7(stack: Stack, gw_a: ServiceProcess) -> None:
    poor = new_user(stack, balance=0.0)
    unentitled = new_user(stack, models=[4])
    async with connect(ws_url(gw_a)) as client:
        for user, code in ((poor, 15), (unentitled, 7)):
            await client.send(3, user_id=user, session_id="NEW", model_name="llama3.1:8b", message="hi",
                              session_prompt="", file_name="", stream=True)
            assert_error(await client.recv(), code, 3)
        assert_error(await client.request(3, user_id=poor, session_id="NEW", model_name="llama3.1:8b",
                                          message="hi", stream=True, on_disconnect="later"), 103, 3)
        # type 7 is the server's only: a client sending it hears "Unknown Message"
        assert_error(await client.request(7, user_id=poor, turn_id=str(uuid.uuid4())), 1, 7)


async def full_turn_cost(stack: Stack, url: str, message: str) -> int:
    user = new_user(stack)
    before = balance_of(stack, user)["balance_nanos"]
    async with connect(url) as client:
        assert_ok(await client.chat(user, "NEW", message), 3)
    return before - balance_of(stack, user)["balance_nanos"]


async def test_cancel_stores_the_prefix_and_charges_less_than_the_full_turn(
    stack: Stack, gw_a: ServiceProcess, gw_b: ServiceProcess
) -> None:
    full = await full_turn_cost(stack, ws_url(gw_a), LONG)
    for canceller_url in (ws_url(gw_a), ws_url(gw_b)):  # the same socket's gateway, then another replica
        user = new_user(stack)
        before = balance_of(stack, user)["balance_nanos"]
        async with connect(ws_url(gw_a)) as client, connect(canceller_url) as canceller:
            head = await start_stream(client, user, "NEW", LONG)
            early = [assert_ok(await client.recv(), 7) for _ in range(5)]
            cancelled = assert_ok(await canceller.request(9, user_id=user, turn_id=head["turn_id"]), 9)
            assert cancelled == {"turn_id": head["turn_id"], "status": "cancelled"}
            rest, final = await read_to_end(client)
            again = assert_ok(await canceller.request(9, user_id=user, turn_id=head["turn_id"]), 9)
            assert again["status"] == "cancelled"
        reply = assert_ok(final, 3)
        assert reply["finish_reason"] == "cancelled"
        assert reply["message"] == text_of(early + rest) and 0 < len(reply["message"])
        assert len(early + rest) < 60
        chat = await stored_chat(ws_url(gw_a), user, head["session_id"])
        assert chat[-1] == {"role": "assistant", "content": reply["message"]}
        money = balance_of(stack, user)
        charged = before - money["balance_nanos"]
        assert money["reserved_nanos"] == 0
        assert 0 < charged < full, (charged, full)


async def test_cancel_of_a_finished_turn_says_finished(stack: Stack, gw_a: ServiceProcess) -> None:
    user = new_user(stack)
    async with connect(ws_url(gw_a)) as client:
        head = await start_stream(client, user, "NEW", "quick")
        await read_to_end(client)
        assert assert_ok(await client.request(9, user_id=user, turn_id=head["turn_id"]), 9)["status"] == "finished"


async def test_disconnect_continue_runs_to_the_end(stack: Stack, gw_a: ServiceProcess, gw_b: ServiceProcess) -> None:
    user = new_user(stack)
    async with connect(ws_url(gw_a)) as client:
        head = await start_stream(client, user, "NEW", LONG)
        await client.recv()
    async with connect(ws_url(gw_b)) as other:
        await other.send(8, user_id=user, turn_id=head["turn_id"], after_seq=0)
        deltas, final = await read_to_end(other)
    reply = assert_ok(final, 3)
    assert reply["finish_reason"] == "stop" and reply["message"] == text_of(deltas)
    assert len(deltas) > 60
    chat = await stored_chat(ws_url(gw_b), user, head["session_id"])
    assert chat[-1]["content"] == reply["message"]


async def test_disconnect_cancel_cancels(stack: Stack, gw_a: ServiceProcess, gw_b: ServiceProcess) -> None:
    user = new_user(stack)
    async with connect(ws_url(gw_a)) as client:
        head = await start_stream(client, user, "NEW", LONG, on_disconnect="cancel")
        for _ in range(3):
            await client.recv()
    async with connect(ws_url(gw_b)) as other:
        await other.send(8, user_id=user, turn_id=head["turn_id"], after_seq=0)
        deltas, final = await read_to_end(other)
    reply = assert_ok(final, 3)
    assert reply["finish_reason"] == "cancelled" and reply["message"] == text_of(deltas)
    assert 3 <= len(deltas) < 60
    chat = await stored_chat(ws_url(gw_b), user, head["session_id"])
    assert chat[-1] == {"role": "assistant", "content": reply["message"]}
    assert balance_of(stack, user)["reserved_nanos"] == 0


async def test_fallback_to_process_sends_the_reply_as_one_delta(stack: Stack, stand_in_gateway: ServiceProcess) -> None:
    user = new_user(stack)
    async with connect(ws_url(stand_in_gateway)) as client:
        head = await start_stream(client, user, "NEW", "old service")
        deltas, final = await read_to_end(client)
    reply = assert_ok(final, 3)
    assert [(d["seq"], d["delta"]) for d in deltas] == [(1, "reply to: old service")]
    assert reply["message"] == "reply to: old service" and reply["finish_reason"] == "stop"
    assert reply["turn_id"] == head["turn_id"]


async def test_retention_expiry_gives_the_unknown_turn_error(stack: Stack, slow_ai: ServiceProcess) -> None:
    gateway = start_gateway(stack, slow_ai.port, STREAM_RETENTION_SECONDS="1")
    try:
        user = new_user(stack)
        async with connect(ws_url(gateway)) as client:
            head = await start_stream(client, user, "NEW", "soon forgotten")
            await read_to_end(client)
            await client.send(8, user_id=user, turn_id=head["turn_id"], after_seq=0)
            _, final = await read_to_end(client)
            assert_ok(final, 3)
            await asyncio.sleep(1.5)
            expired = await client.request(8, user_id=user, turn_id=head["turn_id"], after_seq=0)
            unknown = await client.request(8, user_id=user, turn_id=str(uuid.uuid4()), after_seq=0)
        assert_error(expired, TURN_NOT_FOUND, 8)
        assert expired == unknown
    finally:
        gateway.stop()


async def test_followers_hear_an_error_when_the_streaming_gateway_is_killed(
    stack: Stack, slow_ai: ServiceProcess, gw_b: ServiceProcess
) -> None:
    doomed = start_gateway(stack, slow_ai.port)
    user = new_user(stack)
    before = balance_of(stack, user)["balance_nanos"]
    try:
        async with connect(ws_url(doomed)) as client, connect(ws_url(gw_b)) as follower:
            head = await start_stream(client, user, "NEW", LONG + " " + LONG)
            await client.recv()
            await follower.send(8, user_id=user, turn_id=head["turn_id"], after_seq=0)
            assert_ok(await follower.recv(), 7)
            doomed.kill()
            loop = asyncio.get_running_loop()
            started = loop.time()
            # Followers give up once the turn's live lease (docs: ``turnstream:{id}:live``) is
            # gone. It lapses by itself, LIVE_MS (10 s) after the dead gateway's last renewal:
            # check that it is such a lease, then let it lapse now instead of waiting that out.
            with redis.Redis.from_url(stack.infra.redis_url) as store:
                live = f"turnstream:{{{head['turn_id']}}}:live"
                lease = store.pttl(live)
                assert 0 < lease <= 10_000, lease
                store.pexpire(live, 200)
            while True:
                frame = await follower.recv(timeout=20)
                if frame.get("type") != 7:
                    break
            waited = loop.time() - started
        assert_error(frame, 121, 8)
        assert waited < 15, waited
    finally:
        doomed.stop()
    # never charged more than was produced (here: nothing was stored; its hold lapses)
    money = balance_of(stack, user)
    assert money["balance_nanos"] + money["reserved_nanos"] == before


async def test_cancel_before_any_text_stores_and_charges_nothing(stack: Stack) -> None:
    port = free_port()
    key = f"ai-glacial-{uuid.uuid4().hex[:6]}"
    env = {**stack.base_env(), "AI_SERVER_PORT": str(port), "OFFLINE_STREAM_DELAY_MS": "3000"}
    ai = ServiceProcess(key, port, stack.data_dir / "run" / key, module="chat_ai", env=env, health_path=None)
    ai.start()
    gateway = start_gateway(stack, port)
    try:
        user = new_user(stack)
        before = balance_of(stack, user)
        async with connect(ws_url(gateway)) as client:
            head = await start_stream(client, user, "NEW", "never answered")
            await client.send(9, user_id=user, turn_id=head["turn_id"])
            frames: dict[int, dict[str, Any]] = {}
            while len(frames) < 2:  # the two replies may come in either order
                frame = await client.recv()
                assert frame.get("type") in (3, 9), frame  # no delta
                frames[frame["type"]] = frame
            deltas: list[Any] = []
            cancelled, final = assert_ok(frames[9], 9), frames[3]
            sessions = assert_ok(await client.request(1, user_id=user), 1)["session_info"]
        assert cancelled["status"] == "cancelled"
        reply = assert_ok(final, 3)
        assert deltas == [] and reply["message"] == "" and reply["finish_reason"] == "cancelled"
        assert not sessions  # nothing stored: the new session went with the turn
        after = balance_of(stack, user)
        assert after["balance_nanos"] == before["balance_nanos"] and after["reserved_nanos"] == 0
    finally:
        gateway.stop()
        ai.stop()


class StreamingStandIn(StandInAI):
    """The recording stand-in with a ProcessStream: five deltas, no usage until the last chunk;
    a message starting with ``break`` fails the call after two deltas."""

    def ProcessStream(self, request: pb.Request, context: grpc.ServicerContext) -> Iterator[pb.StreamChunk]:
        for i in range(5):
            if request.chat_message.startswith("break") and i == 2:
                context.abort(grpc.StatusCode.UNAVAILABLE, "the model died")
            time.sleep(0.02)
            yield pb.StreamChunk(delta=f"part{i} ")
        yield pb.StreamChunk(done=True, cost_nanos=PROCESS_COST_NANOS)


@pytest.fixture(scope="module")
def streaming_stand_in(stack: Stack) -> Iterator[ServiceProcess]:
    ai = StreamingStandIn().start()
    gateway = start_gateway(stack, ai.port)
    yield gateway
    gateway.stop()
    ai.stop()


async def test_the_cost_the_ai_reports_is_charged_exactly(stack: Stack, streaming_stand_in: ServiceProcess) -> None:
    user = new_user(stack)
    before = balance_of(stack, user)["balance_nanos"]
    async with connect(ws_url(streaming_stand_in)) as client:
        await start_stream(client, user, "NEW", "count me")
        deltas, final = await read_to_end(client)
    assert [d["delta"] for d in deltas] == [f"part{i} " for i in range(5)]
    assert assert_ok(final, 3)["message"] == "part0 part1 part2 part3 part4 "
    money = balance_of(stack, user)
    assert money["balance_nanos"] == before - PROCESS_COST_NANOS and money["reserved_nanos"] == 0


async def test_an_ai_failure_midway_stores_and_charges_what_was_produced(
    stack: Stack, streaming_stand_in: ServiceProcess
) -> None:
    user = new_user(stack)
    before = balance_of(stack, user)["balance_nanos"]
    async with connect(ws_url(streaming_stand_in)) as client:
        head = await start_stream(client, user, "NEW", "break please")
        deltas, final = await read_to_end(client)
        chat = json.loads(assert_ok(await client.request(2, user_id=user, session_id=head["session_id"]), 2)["chat"])
    reply = assert_ok(final, 3)
    assert reply["finish_reason"] == "error" and reply["message"] == "part0 part1 " == text_of(deltas)
    assert chat == [{"role": "user", "content": "break please"}, {"role": "assistant", "content": "part0 part1 "}]
    money = balance_of(stack, user)
    charged = before - money["balance_nanos"]
    # nothing reported: counted by the gateway (input estimate + the text produced), not the hold
    assert 0 < charged < 100_000 and money["reserved_nanos"] == 0
