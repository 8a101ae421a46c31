"""Limits: frame size (1009), requests per user per window (108, then 1008), sockets per user
(1013), shared by every gateway replica on the same Redis; allowed origins for the handshake
and CORS for the upload."""
from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Iterator

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from devstack.servers import ServiceProcess
from devstack.stack import Stack

from .conftest import (
    BROWSER_ORIGIN,
    assert_error,
    assert_ok,
    connect,
    hs_token,
    jwt_env,
    new_user,
    refused,
    start_gateway,
    stop_gateway,
    ws_url,
)

RATE = 10
WINDOW = 3600  # longer than any test: a user's window, begun by its first request, outlives it
SOCKETS = 3
SLOT_SECONDS = 3
FRAME = 4096


def tight_env(**extra: str) -> dict[str, str]:
    return jwt_env(
        RATE_LIMIT_REQUESTS=str(RATE),
        RATE_LIMIT_WINDOW_SECONDS=str(WINDOW),
        MAX_SOCKETS_PER_USER=str(SOCKETS),
        SOCKET_SLOT_SECONDS=str(SLOT_SECONDS),
        MAX_FRAME_BYTES=str(FRAME),
        **extra,
    )


@pytest.fixture(scope="module")
def replicas(system: Stack) -> Iterator[list[ServiceProcess]]:
    """Two gateways with the same tight limits on the same Redis."""
    processes = [start_gateway(system, f"gw-tight-{i}", tight_env()) for i in range(2)]
    yield processes
    for process in processes:
        stop_gateway(system, process)


# ------------------------------------------------------------------------------------ frames


async def test_an_oversized_frame_closes_with_1009(system: Stack, replicas: list[ServiceProcess]) -> None:
    user = new_user(system)
    async with connect(ws_url(replicas[0]), token=hs_token(user)) as client:
        # just under the limit is served
        filler = "x" * (FRAME - 200)
        assert_error(await client.request(2, session_id="bad", pad=filler), 103, 2)
        await client.send_raw(json.dumps({"type": 6, "data": {"pad": "x" * (FRAME + 1)}}))
        code, _ = await client.closed_with()
        assert code == 1009


async def test_the_shared_gateway_closes_a_megabyte_frame_with_1009(system: Stack) -> None:
    async with connect(system.ws_url) as client:
        await client.send_raw(json.dumps({"type": 0, "data": {"user_id": "a" * 1_000_000}}))
        code, _ = await client.closed_with()
        assert code == 1009


async def test_a_multibyte_frame_is_measured_in_bytes(system: Stack, replicas: list[ServiceProcess]) -> None:
    user = new_user(system)
    async with connect(ws_url(replicas[0]), token=hs_token(user)) as client:
        # fewer characters than the limit, more bytes than it
        await client.send_raw(json.dumps({"type": 6, "data": {"pad": "é" * (FRAME // 2 + 10)}}, ensure_ascii=False))
        code, _ = await client.closed_with()
        assert code == 1009


# ------------------------------------------------------------------------------------ rate


async def test_a_flood_gets_108_then_the_socket_is_closed(system: Stack, replicas: list[ServiceProcess]) -> None:
    user = new_user(system)
    async with connect(ws_url(replicas[0]), token=hs_token(user)) as client:
        for _ in range(RATE):
            await client.send(6)
        replies = [await client.recv() for _ in range(RATE)]
        assert all(r.get("type") == 6 and "data" in r for r in replies), replies
        # past the limit: an error reply per request, the socket stays
        for _ in range(RATE):
            await client.send(6)
        for _ in range(RATE):
            message = assert_error(await client.recv(), 108, 6)
            assert f"at most {RATE} requests per {WINDOW} seconds" in message
        # past twice the limit the socket is closed; an unreadable frame counts like any other
        await client.send_raw("{not json")
        code, reason = await client.closed_with()
        assert (code, reason) == (1008, "rate limit exceeded")


async def test_the_rate_limit_is_shared_by_replicas_and_sockets(system: Stack, replicas: list[ServiceProcess]) -> None:
    user = new_user(system)
    token = hs_token(user)
    async with connect(ws_url(replicas[0]), token=token) as first, connect(ws_url(replicas[1]), token=token) as second:
        for _ in range(6):
            assert_ok(await first.request(6), 6)
        for _ in range(4):
            assert_ok(await second.request(6), 6)
        assert_error(await second.request(6), 108, 6)
        assert_error(await first.request(0), 108, 0)
    # another user is not affected
    other = new_user(system)
    async with connect(ws_url(replicas[1]), token=hs_token(other)) as client:
        assert_ok(await client.request(6), 6)


# ------------------------------------------------------------------------------------ sockets


async def _serves(client) -> bool:
    try:
        reply = await client.request(6)
    except ConnectionClosed:
        return False
    return "data" in reply


async def test_too_many_sockets_for_one_user_is_1013(system: Stack, replicas: list[ServiceProcess]) -> None:
    user = new_user(system)
    token = hs_token(user)
    a, b = replicas
    opened = []
    try:
        # two on one replica, one on the other: the limit counts them together
        for process in (a, a, b):
            client = await connect(ws_url(process), token=token).__aenter__()
            opened.append(client)
            assert await _serves(client)
        for process in (a, b):
            code, reason = await refused(ws_url(process), token=token)
            assert code == 1013, (code, reason)
            assert "too many sockets" in reason
        # held past the slot's lifetime: heartbeats keep the slots, the limit still holds
        await asyncio.sleep(SLOT_SECONDS * 1.7)
        code, _ = await refused(ws_url(b), token=token)
        assert code == 1013
        # another user is not affected
        other = new_user(system)
        async with connect(ws_url(a), token=hs_token(other)) as client:
            assert await _serves(client)
        # closing one frees its slot at once
        await opened.pop().close()
        await asyncio.sleep(0.3)
        async with connect(ws_url(b), token=token) as client:
            assert await _serves(client)
    finally:
        for client in opened:
            await client.close()


async def test_a_crashed_gateway_does_not_keep_its_slots(system: Stack) -> None:
    doomed = start_gateway(system, "gw-doomed", tight_env())
    survivor = start_gateway(system, "gw-survivor", tight_env())
    user = new_user(system)
    token = hs_token(user)
    held = []
    try:
        for _ in range(SOCKETS):
            client = await connect(ws_url(doomed), token=token).__aenter__()
            held.append(client)
            assert await _serves(client)
        code, _ = await refused(ws_url(survivor), token=token)
        assert code == 1013
        doomed.kill()  # SIGKILL: no cleanup runs
        code, _ = await refused(ws_url(survivor), token=token)
        assert code == 1013, "the slots are still there right after the crash"
        await asyncio.sleep(SLOT_SECONDS + 1)
        async with connect(ws_url(survivor), token=token) as client:
            assert await _serves(client)
    finally:
        for client in held:
            with contextlib.suppress(Exception):
                await client.close()
        stop_gateway(system, doomed)
        stop_gateway(system, survivor)


async def test_none_mode_limits_sockets_per_address(system: Stack) -> None:
    """Unauthenticated, the client address stands for the user (its own Redis database here,
    so the other tests' sockets from 127.0.0.1 do not count)."""
    redis_url = system.infra.redis_url.rsplit("/", 1)[0] + "/7"
    process = start_gateway(system, "gw-none-tight", {
        "AUTH_MODE": "none", "REDIS_URL": redis_url, "MAX_SOCKETS_PER_USER": "2", "RATE_LIMIT_REQUESTS": "5",
        "RATE_LIMIT_WINDOW_SECONDS": str(WINDOW),
    })
    user = new_user(system)
    try:
        async with connect(ws_url(process)) as one, connect(ws_url(process)) as two:
            assert_ok(await one.request(6, user_id=user), 6)
            code, _ = await refused(ws_url(process))
            assert code == 1013
            # and requests: another user_id in each frame does not escape the address's limit
            for _ in range(4):
                assert_ok(await two.request(6, user_id=new_user(system)), 6)
            assert_error(await two.request(6, user_id=str(uuid.uuid4())), 108, 6)
    finally:
        stop_gateway(system, process)


# ------------------------------------------------------------------------------------ origins


async def test_origins(system: Stack, replicas: list[ServiceProcess]) -> None:
    user = new_user(system)
    token = hs_token(user)
    process = replicas[0]
    async with connect(ws_url(process), token=token, origin=BROWSER_ORIGIN) as client:
        assert_ok(await client.request(6), 6)
    async with connect(ws_url(process), token=token) as client:  # no Origin: not a browser
        assert_ok(await client.request(6), 6)
    for origin in ("http://evil.example", "http://app.test.example.evil.example", "null", BROWSER_ORIGIN + ":8080"):
        code, text = await refused(ws_url(process), token=token, origin=origin)
        assert (code, text) == (403, "http"), origin


async def test_cors_preflight_for_upload_and_download(system: Stack, replicas: list[ServiceProcess]) -> None:
    async with httpx.AsyncClient(base_url=replicas[0].url, timeout=30) as http:
        ok = await http.options("/upload", headers={
            "Origin": BROWSER_ORIGIN, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        })
        assert ok.status_code in (200, 204), ok.text
        assert ok.headers["access-control-allow-origin"] == BROWSER_ORIGIN
        assert "authorization" in ok.headers["access-control-allow-headers"].lower()
        assert "POST" in ok.headers["access-control-allow-methods"]
        assert ok.headers.get("access-control-allow-credentials") in (None, "false")
        download = await http.options(f"/uploads/{'0' * 32}.png", headers={
            "Origin": BROWSER_ORIGIN, "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization"})
        assert download.status_code in (200, 204)
        evil = await http.options("/upload", headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        assert evil.headers.get("access-control-allow-origin") is None
        assert evil.status_code >= 400
        # the shared gateway runs AUTH_MODE=none: permissive, as the original UI needs
    async with httpx.AsyncClient(base_url=system.gateway_url, timeout=30) as http:
        ok = await http.options("/upload", headers={"Origin": "http://localhost:5173",
                                                     "Access-Control-Request-Method": "POST"})
        assert ok.status_code in (200, 204)


async def test_uploads_and_downloads_draw_on_the_same_budget(system: Stack, replicas: list[ServiceProcess]) -> None:
    from .conftest import failure, upload, upload_fields

    user = new_user(system)
    token = hs_token(user)
    async with connect(ws_url(replicas[0]), token=token) as client:
        for _ in range(RATE - 2):
            assert_ok(await client.request(6), 6)
        async with httpx.AsyncClient(base_url=replicas[1].url, timeout=30) as http:
            stored = await upload(http, upload_fields(None), "a.txt", b"budget", token=token)
            assert stored.status_code == 202, stored.text
            name = stored.json()["data"]["fileName"]
            auth = {"Authorization": f"Bearer {token}"}
            assert (await http.get(f"/uploads/{name}", headers=auth)).content == b"budget"
            response = await http.get(f"/uploads/{name}", headers=auth)
            assert "Rate limit exceeded" in failure(response, 429)
            assert response.headers["retry-after"] == str(WINDOW)
            failure(await upload(http, upload_fields(None), "a.txt", b"again", token=token), 429)
        assert_error(await client.request(6), 108, 6)
