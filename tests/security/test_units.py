"""The pieces on their own: log redaction, origin matching, the user a request acts for, and the
Redis limiters against a real Redis."""
from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from typing import Any

import pytest
from redis.asyncio import Redis

from chat_common.logging import redact
from chat_gateway.auth import canonical_user_id, effective_user_id, origin_allowed
from chat_gateway.settings import GatewaySettings
from chat_gateway.ws.limits import RateLimiter, SocketSlots, Verdict
from chat_gateway.ws.protocol import ProtocolError

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLWJ5dGVz"


@pytest.mark.parametrize(
    "line, secret",
    [
        ('127.0.0.1:1 - "WebSocket /ws?token=abc.def.ghi" [accepted]', "abc.def.ghi"),
        ('127.0.0.1:1 - "WebSocket /ws?x=1&token=opaque-value-123" 403', "opaque-value-123"),
        ("GET /uploads/f.png?access_token=zzzzzzzzzz", "zzzzzzzzzz"),
        ("Authorization: Bearer abcdefghijklmnop", "abcdefghijklmnop"),
        ("Sec-WebSocket-Protocol: bearer, abcdefghijklmnopqrstuvwxyz", "abcdefghijklmnopqrstuvwxyz"),
        (f"something went wrong with {JWT} here", JWT),
    ],
)
def test_redact(line: str, secret: str) -> None:
    cleaned = redact(line)
    assert secret not in cleaned
    assert "redacted" in cleaned


def test_redact_leaves_ordinary_lines_alone() -> None:
    for line in ("socket closed: rate limit exceeded", "billing refused: token bucket", "user_id=42&limit=5"):
        assert redact(line) == line


def _settings(**changes: Any) -> GatewaySettings:
    return replace(GatewaySettings.from_env(), **changes)


def test_origin_allowed() -> None:
    settings = _settings(allowed_origins=("https://chat.example.com", "http://localhost:5173/"))
    assert origin_allowed(None, settings)
    assert origin_allowed("https://chat.example.com", settings)
    assert origin_allowed("HTTPS://CHAT.EXAMPLE.COM", settings)
    assert origin_allowed("http://localhost:5173", settings)
    for hostile in ("https://chat.example.com.evil.com", "https://evil.com", "null", "", "http://chat.example.com",
                    "https://chat.example.com:444"):
        assert not origin_allowed(hostile, settings), hostile
    assert not origin_allowed("https://chat.example.com", _settings(allowed_origins=()))
    assert origin_allowed("https://anything.example", _settings(allowed_origins=("*",)))


def test_the_user_a_request_acts_for() -> None:
    user = str(uuid.uuid4())
    assert effective_user_id(None, user.upper()) == user
    assert effective_user_id(user, None) == user
    assert effective_user_id(user, user.upper()) == user
    assert effective_user_id(None, "not-a-uuid") == "not-a-uuid"
    with pytest.raises(ProtocolError) as refused:
        effective_user_id(user, str(uuid.uuid4()))
    assert refused.value.code == 106
    with pytest.raises(ProtocolError) as missing:
        effective_user_id(None, None)
    assert missing.value.code == 101
    assert canonical_user_id(user.replace("-", "")) == user


async def test_rate_limiter_counts_and_expires(redis_server) -> None:
    redis = Redis.from_url(redis_server.url())
    try:
        limiter = RateLimiter(redis, limit=3, window_seconds=60)
        subject = f"user:{uuid.uuid4()}"
        verdicts = [await limiter.hit(subject) for _ in range(7)]
        assert verdicts == [Verdict.OK] * 3 + [Verdict.LIMITED] * 3 + [Verdict.ABUSIVE]
        # the subject's window began with its first request and expires by Redis's clock
        assert 0 < await redis.ttl(f"rl:req:{subject}") <= 60
        # a counter left without an expiry (however it got there) is given one on the next hit
        stuck = f"user:{uuid.uuid4()}"
        await redis.set(f"rl:req:{stuck}", 1)
        assert await limiter.hit(stuck) is Verdict.OK
        assert 0 < await redis.ttl(f"rl:req:{stuck}") <= 60
        assert await limiter.hit(f"user:{uuid.uuid4()}") is Verdict.OK
        assert await RateLimiter(redis, limit=0, window_seconds=60).hit(subject) is Verdict.OK
    finally:
        await redis.aclose()


async def test_socket_slots_lapse_without_heartbeats(redis_server) -> None:
    redis = Redis.from_url(redis_server.url())
    try:
        slots = SocketSlots(redis, limit=2, slot_seconds=1.0)
        subject = f"user:{uuid.uuid4()}"
        first, second, third = slots.hold(subject), slots.hold(subject), slots.hold(subject)
        assert await first.__aenter__() and await second.__aenter__()
        assert not await third.__aenter__()
        await second.__aexit__(None, None, None)
        assert await third.__aenter__()
        # a holder that stops beating (a crashed gateway) loses its slot after slot_seconds
        for holder in (first, third):
            assert holder._heartbeat is not None
            holder._heartbeat.cancel()
        await asyncio.sleep(1.3)
        fourth, fifth = slots.hold(subject), slots.hold(subject)
        assert await fourth.__aenter__() and await fifth.__aenter__()
        for holder in (fourth, fifth):
            await holder.__aexit__(None, None, None)
        assert await redis.zcard(f"rl:sockets:{subject}") == 0
    finally:
        await redis.aclose()


async def test_limits_open_when_redis_is_down() -> None:
    redis = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    try:
        assert await RateLimiter(redis, limit=1, window_seconds=60).hit("user:x") is Verdict.OK
        slot = SocketSlots(redis, limit=1, slot_seconds=3).hold("user:x")
        assert await slot.__aenter__()
        await slot.__aexit__(None, None, None)
    finally:
        await redis.aclose()
