"""SIGTERM in the middle of a turn: the gateway stops taking sockets, lets the turn finish (stored
and charged once), sends the reply, then closes the socket with 1001 "going away"."""
from __future__ import annotations

import asyncio
import signal
import time

import pytest
import websockets

from devstack.stack import Stack

from .conftest import StandInAI, assert_ok, connect, new_user, start_gateway, ws_url


async def test_sigterm_mid_turn_finishes_the_turn_then_goes_away(stack: Stack, stand_in_ai: StandInAI) -> None:
    gateway = start_gateway(stack, stand_in_ai.port, SHUTDOWN_GRACE_SECONDS="15")
    user = new_user(stack)
    process = gateway.process
    assert process is not None
    try:
        async with connect(ws_url(gateway)) as client:
            await client.send(3, user_id=user, session_id="NEW", model_name="llama3.1:8b",
                              message="slow:2 please finish me", session_prompt="", file_name="")
            await asyncio.sleep(0.7)  # the turn is now waiting on the AI
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            with pytest.raises((OSError, websockets.exceptions.InvalidHandshake, asyncio.TimeoutError)):
                async with connect(ws_url(gateway)):
                    pass
            reply = assert_ok(await client.recv(timeout=15), 3)
            assert reply["message"] == "reply to: slow:2 please finish me"
            with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
                await client.recv(timeout=15)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        started = time.monotonic()
        process.wait(20)
        # uvicorn re-raises the captured SIGTERM once its shutdown is complete
        assert process.returncode in (0, -signal.SIGTERM), gateway.log_tail()
        assert "Application shutdown complete" in gateway.log_tail()
        assert time.monotonic() - started < 20
    finally:
        gateway.stop()
        print(gateway.log_tail(60))  # shown by pytest only when the test fails

    async with connect(stack.ws_url) as client:
        sessions = assert_ok(await client.request(1, user_id=user), 1)["session_info"]
        assert len(sessions) == 1
        chats = assert_ok(await client.request(2, user_id=user, session_id=sessions[0]["session_id"]), 2)
        assert '"please finish me"' not in chats["chat"] and "slow:2 please finish me" in chats["chat"]
    ledger = stack.admin("GET", f"/v1/users/{user}/ledger?limit=50")["items"]
    assert [row["kind"] for row in ledger].count("settle") == 1
    assert [row["kind"] for row in ledger].count("release") == 0
