"""Issue 11: no frame, header or signal takes a socket or a process down.

A raw WebSocket client (bytes on a TCP stream, so frames can be anything a hostile client
sends: binary frames of broken UTF-8, text frames that are not UTF-8, requests pipelined without
waiting) drives the gateways; every numbered item of the issue has a test that fails on the old
code.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import signal
import socket
import struct
import time
import urllib.request
import uuid
from typing import Any

import httpx
import psutil
import pytest

from devstack.servers import ServiceProcess, free_port
from devstack.stack import Stack

from .conftest import (
    MODEL,
    LogWatch,
    connect,
    hs_token,
    jwt_env,
    new_user,
    refused,
    sessions_of,
    start_gateway,
    stop_gateway,
    upload,
    upload_fields,
    ws_url,
)

TEXT, BINARY, CLOSE = 0x1, 0x2, 0x8


# --------------------------------------------------------------------------------------------
# a raw client


class RawSocket:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, path: str = "/ws", headers: dict[str, str] | None = None) -> "RawSocket":
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**22)
        key = base64.b64encode(os.urandom(16)).decode()
        head = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n")
        for name, value in (headers or {}).items():
            head += f"{name}: {value}\r\n"
        writer.write((head + "\r\n").encode())
        status = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert status.startswith(b"HTTP/1.1 101"), status[:200]
        return cls(reader, writer)

    @staticmethod
    def frame(payload: bytes, opcode: int) -> bytes:
        # a zero mask (RFC 6455 allows any): the payload goes out as it is, at no cost
        length = len(payload)
        if length < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
        elif length < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
        return head + b"\0\0\0\0" + payload

    def send(self, payload: bytes, opcode: int = TEXT) -> None:
        self.writer.write(self.frame(payload, opcode))

    async def recv(self, timeout: float = 30.0) -> tuple[int, bytes]:
        async def read() -> tuple[int, bytes]:
            first, second = await self.reader.readexactly(2)
            length = second & 0x7F
            if length == 126:
                length = struct.unpack("!H", await self.reader.readexactly(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", await self.reader.readexactly(8))[0]
            return first & 0x0F, await self.reader.readexactly(length)

        return await asyncio.wait_for(read(), timeout)

    async def reply(self, timeout: float = 30.0) -> dict[str, Any]:
        opcode, payload = await self.recv(timeout)
        assert opcode == TEXT, (opcode, payload[:200])
        return json.loads(payload)

    async def close_code(self, timeout: float = 10.0) -> int | None:
        while True:
            try:
                opcode, payload = await self.recv(timeout)
            except asyncio.IncompleteReadError:
                return None
            if opcode == CLOSE:
                return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None

    def close(self) -> None:
        self.writer.close()


def _assert_answer(reply: dict[str, Any]) -> None:
    assert ("error" in reply and isinstance(reply.get("code"), int)) or "data" in reply, reply


async def _works(sock: RawSocket, user: str) -> None:
    sock.send(json.dumps({"type": 5, "data": {"user_id": user}}).encode())
    reply = await sock.reply()
    assert "error" not in reply and reply["type"] == 5, reply


# --------------------------------------------------------------------------------------------
# 10,000 hostile frames


FIELDS = {
    0: ["user_id"], 1: ["user_id"], 2: ["user_id", "session_id"], 4: ["user_id", "session_id"],
    5: ["user_id"], 6: ["user_id"],
    3: ["user_id", "session_id", "model_name", "model_id", "message", "session_prompt", "file_name"],
}
BAD_BYTES = [b"\xff", b"caf\xe9", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80", b"\x80", b"\xe2\x82"]


def _values(rng: random.Random) -> list[bytes]:
    """JSON values (as bytes) a hostile client puts in a field."""
    depth = rng.choice([3, 40, 200, 3000])
    return [
        b"null", b"1", b"-1", b"1e400", b"1.5", b"true", b"[]", b"{}", b'""', b'" "',
        b'"\\u0000"', b'"a\\u0000b"', b'"\\ud800"', b'"\\udc00x"', b'"\\ud83d"',
        b'"' + b"A" * rng.choice([129, 300, 5000, 40_000]) + b'"',
        b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth,
        b'"' + rng.choice(BAD_BYTES) + b'"', b'"ok' + rng.choice(BAD_BYTES) + b'ok"',
        b'"\x01\x1b[31m"', b'"../../etc/passwd"', b'"' + uuid.uuid4().hex.encode() + b'.png"',
        b'"/' + uuid.uuid4().hex.encode() + b'.png"', b'"NEW"', str(rng.getrandbits(80)).encode(),
        b'"' + bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 12))) + b'"',
    ]


def _base(type_: int) -> dict[str, bytes]:
    # a user id that no handler sends on (not a UUID): the frames cost no downstream call
    data = {"user_id": b'"hostile-user"'}
    if type_ in (2, 3, 4):
        data["session_id"] = json.dumps(str(uuid.uuid4())).encode()
    if type_ == 3:
        data.update(model_name=json.dumps(MODEL).encode(), message=b'"hi"')
    return data


def _frame(type_: Any, data: dict[str, bytes] | bytes) -> bytes:
    if isinstance(data, bytes):
        body = data
    else:
        body = b"{" + b",".join(json.dumps(k).encode() + b":" + v for k, v in data.items()) + b"}"
    return b'{"type":' + (type_ if isinstance(type_, bytes) else str(type_).encode()) + b',"data":' + body + b"}"


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def hostile_frames(count: int, seed: int = 11) -> list[tuple[bytes, int]]:
    rng = random.Random(seed)
    frames: list[tuple[bytes, int]] = []
    # hand-written: the envelope itself
    for raw in [b"", b" ", b"null", b"[]", b"{}", b'"x"', b"{", b'{"type":', b'{"type":"3"}', b'{"type":null}',
                b'{"type":1.5,"data":{}}', b'{"type":99,"data":{}}', b'{"type":-1}', b'{"type":2e400}',
                b'{"type":6,"data":null}', b'{"type":6,"data":[]}', b'{"type":6,"data":"x"}', b"\x00",
                b'{"type":6,"data":{"user_id":"\xff"}}', b'{"type":6,"data":{"user_id":"caf\xe9"}}',
                b'{"type":6,"data":{"user_id":"\xed\xa0\x80"}}', b"[" * 5000 + b"]" * 5000,
                b'{"type":6,"data":' + b"[" * 5000 + b"]" * 5000 + b"}", b'{"type":6' + b" " * 100_000 + b"}"]:
        frames.append((raw, BINARY))
        if _is_utf8(raw):  # a text frame of broken UTF-8 is closed (1007): tested on its own
            frames.append((raw, TEXT))
    while len(frames) < count:
        type_ = rng.choice(list(FIELDS))
        data = _base(type_)
        field = rng.choice(FIELDS[type_])
        action = rng.random()
        if action < 0.15:
            data.pop(field, None)
        else:
            data[field] = rng.choice(_values(rng))
        if rng.random() < 0.05:
            raw = _frame(rng.choice([b"null", b'"6"', b"[6]", b"7", str(type_).encode()]), data)
            frames.append((raw, TEXT if _is_utf8(raw) else BINARY))
            continue
        raw = _frame(type_, data)
        frames.append((raw, rng.choice([TEXT, BINARY]) if _is_utf8(raw) else BINARY))
    return frames


async def test_ten_thousand_hostile_frames_are_all_answered(system: Stack) -> None:
    watch = LogWatch(system).start()
    user = new_user(system)
    frames = hostile_frames(10_000)
    assert len(frames) >= 10_000
    sock = await RawSocket.open(system.services["gateway"].port)
    answers: list[dict[str, Any]] = []

    async def reader() -> None:
        for _ in range(len(frames)):
            try:
                opcode, payload = await sock.recv(60)
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                raise AssertionError(f"socket lost after {len(answers)} answers: {exc!r}\n"
                                     f"{system.services['gateway'].log_tail(15)}") from None
            assert opcode == TEXT, (opcode, payload[:100], len(answers))
            answers.append(json.loads(payload))

    reading = asyncio.create_task(reader())
    try:
        for at, (raw, opcode) in enumerate(frames):
            sock.send(raw, opcode)
            if at % 200 == 0:
                await sock.writer.drain()
        await sock.writer.drain()
    except ConnectionError:
        pass  # the reader says what happened
    await asyncio.wait_for(reading, 120)
    for reply in answers:
        _assert_answer(reply)
    codes = {reply.get("code") for reply in answers}
    assert 14 not in codes, "a hostile frame got Internal Server Error"
    assert {0, 100, 101, 102, 103, 105}.issubset(codes), codes
    await _works(sock, user)
    sock.close()
    watch.assert_clean()


async def test_text_frames_that_are_not_utf8_close_with_1007_and_log_no_traceback(system: Stack) -> None:
    watch = LogWatch(system).start()
    for bad in BAD_BYTES[:4]:
        sock = await RawSocket.open(system.services["gateway"].port)
        sock.send(b'{"type":6,"data":{"user_id":"' + bad + b'"}}', TEXT)
        assert await sock.close_code() == 1007
        sock.close()
    await asyncio.sleep(0.3)
    watch.assert_clean()


async def test_binary_frames_of_broken_utf8_get_code_0_and_the_socket_stays(system: Stack) -> None:
    user = new_user(system)
    sock = await RawSocket.open(system.services["gateway"].port)
    for bad in (b"\xff", b"caf\xe9", b"\xed\xa0\x80"):
        sock.send(b'{"type":6,"data":{"user_id":"' + bad + b'"}}', BINARY)
        reply = await sock.reply()
        assert reply == {"error": "JSON Parsing Error", "code": 0, "type": None}, reply
    await _works(sock, user)
    sock.close()


# --------------------------------------------------------------------------------------------
# file names, model names, internal text


async def _uploaded(system: Stack, user: str) -> tuple[str, str]:
    async with httpx.AsyncClient(base_url=system.gateway_url, timeout=30) as http:
        response = await upload(http, upload_fields(user), "note.txt", b"hello file")
    assert response.status_code == 202, response.text
    data = response.json()["data"]
    return data["fileName"], data["sessionId"]


async def test_file_names_never_issued_are_refused(system: Stack) -> None:
    user = new_user(system)
    name, session = await _uploaded(system, user)
    async with connect(system.ws_url) as client:
        for spelled in (f"/{name}", f"//{name}", f"{name}/", f"{name}\n", name.upper()):
            reply = await client.chat(session, "about the file", user_id=user, file_name=spelled)
            assert reply.get("code") == 104, (spelled, reply)
    # and the files service itself answers for its own names only
    files = system.url("files")
    for path in (f"/v1/files/%2F{name}", f"/v1/files//{name}", f"/v1/files/{name}/", f"/v1/files/{name}%0A"):
        request = urllib.request.Request(f"{files}{path}?user_id={user}", headers={"x-service-token": system.service_token})
        try:
            urllib.request.urlopen(request, timeout=10)
            status = 200
        except urllib.error.HTTPError as exc:
            status = exc.code
        assert status == 404, (path, status)


async def test_upload_model_name_is_checked_and_internal_text_stays_inside(system: Stack) -> None:
    user = new_user(system)
    before = sessions_of(system, user)
    async with httpx.AsyncClient(base_url=system.gateway_url, timeout=30) as http:
        for model, status in (("m" * 300, 400), ("no-such-model", 403), ("m" * 199, 403)):
            fields = {**upload_fields(user), "model_name": model}
            response = await upload(http, fields, "note.txt", b"hello")
            assert response.status_code == status, (model[:20], response.text)
            message = response.json()["message"]
            assert "/v1/" not in message and "Validation failed" not in message, message
    assert sessions_of(system, user) == before


# --------------------------------------------------------------------------------------------
# gateways of our own


@pytest.fixture(scope="module")
def strict_gateway(system: Stack) -> Any:
    process = start_gateway(system, "gw-strict", jwt_env(
        HTTP_HEADER_TIMEOUT_SECONDS="1", SHUTDOWN_GRACE_SECONDS="3", RATE_LIMIT_REQUESTS="5",
        RATE_LIMIT_WINDOW_SECONDS="60", MAX_SOCKETS_PER_USER="0", METRICS_ALLOW_FROM="none"))
    yield process
    stop_gateway(system, process)


async def test_token_times_must_be_numbers(strict_gateway: ServiceProcess) -> None:
    user = str(uuid.uuid4())
    url = ws_url(strict_gateway)
    for claim, value in (("exp", str(int(time.time()) + 600)), ("exp", "never"), ("nbf", "0"), ("iat", "now"),
                         ("exp", True)):
        overrides: dict[str, Any] = {claim: value}
        code, reason = await refused(url, token=hs_token(user, **overrides))
        assert code == 1008, (claim, value, code, reason)


def _raw_exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        reply = b""
        try:
            while chunk := sock.recv(65536):
                reply += chunk
        except (ConnectionResetError, TimeoutError, socket.timeout):
            pass
    return reply


def _upgrade(path: str = "/ws", extra: str = "") -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\nSec-WebSocket-Version: 13\r\n"
            f"{extra}\r\n").encode()


async def test_oversized_handshakes_are_answered(strict_gateway: ServiceProcess) -> None:
    port = strict_gateway.port
    reply = await asyncio.to_thread(_raw_exchange, port, _upgrade(extra=f"X-Big: {'a' * 9000}\r\n"))
    assert reply.startswith(b"HTTP/1.1 431"), reply[:200]
    reply = await asyncio.to_thread(_raw_exchange, port, _upgrade(path="/ws?" + "q" * 9000))
    assert reply.startswith((b"HTTP/1.1 414", b"HTTP/1.1 431")), reply[:200]
    reply = await asyncio.to_thread(_raw_exchange, port, _upgrade(extra=f"X-Big: {'a' * 40000}\r\n"))
    assert reply.startswith((b"HTTP/1.1 431", b"HTTP/1.1 400")), reply[:200]


async def test_silent_and_half_sent_heads_are_cut_off(strict_gateway: ServiceProcess) -> None:
    port = strict_gateway.port
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        assert sock.recv(100) == b""  # nothing sent: closed after the header timeout
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 408")
    assert time.monotonic() - started < 8


async def test_readiness_metrics_and_schema_say_nothing_to_the_public(system: Stack, strict_gateway: ServiceProcess) -> None:
    async with httpx.AsyncClient(base_url=strict_gateway.url, timeout=10) as http:
        for path in ("/metrics", "/schema", "/schema/openapi.json"):
            assert (await http.get(path)).status_code == 404, path
    async with httpx.AsyncClient(base_url=system.gateway_url, timeout=10) as http:
        assert (await http.get("/metrics", headers={"x-forwarded-for": "203.0.113.7"})).status_code == 404
        assert (await http.get("/schema", headers={"x-forwarded-for": "203.0.113.7"})).status_code == 404
    # started, not awaited ready: it never will be
    broken = system.start_service("gateway", port=free_port(), key=f"gw-noredis-{uuid.uuid4().hex[:6]}",
                                  env={"REDIS_URL": "redis://127.0.0.1:9398/0"})
    try:
        async with httpx.AsyncClient(base_url=broken.url, timeout=10) as http:
            response = await http.get("/ready")
        assert response.status_code == 503
        assert response.json()["checks"]["redis"] == "failed", response.text
        assert "Error" not in response.text and "9398" not in response.text, response.text
    finally:
        stop_gateway(system, broken)


async def test_forwarded_for_does_not_pick_the_rate_limit_subject(system: Stack) -> None:
    process = start_gateway(system, "gw-xff", {"RATE_LIMIT_REQUESTS": "5", "RATE_LIMIT_WINDOW_SECONDS": "60"})
    codes = []
    try:
        async with httpx.AsyncClient(base_url=process.url, timeout=10) as http:
            for i in range(8):
                response = await http.get(f"/uploads/{uuid.uuid4().hex}.png",
                                          headers={"x-forwarded-for": f"198.51.100.{i}"})
                codes.append(response.status_code)
    finally:
        stop_gateway(system, process)
    assert 429 in codes, codes


async def test_internal_services_check_the_token_before_routing(system: Stack) -> None:
    for service in ("sessions", "files", "billing"):
        async with httpx.AsyncClient(base_url=system.url(service), timeout=10) as http:
            assert (await http.get("/no/such/route")).status_code == 401
            assert (await http.delete("/health")).status_code in (401, 405)
            assert (await http.patch("/v1/sessions")).status_code == 401
            token = {"x-service-token": system.service_token}
            assert (await http.get("/no/such/route", headers=token)).status_code == 404


async def test_content_length_with_transfer_encoding_is_refused(system: Stack) -> None:
    port = system.services["gateway"].port
    request = (b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n"
               b"Content-Type: multipart/form-data; boundary=b\r\n\r\n0\r\n\r\n")
    reply = await asyncio.to_thread(_raw_exchange, port, request)
    assert reply.startswith(b"HTTP/1.1 400"), reply[:200]


# --------------------------------------------------------------------------------------------
# shutdown and memory


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _open_sockets(pid: int, port: int) -> int:
    """How many accepted sockets on ``port`` the process still holds open."""
    return sum(1 for c in psutil.Process(pid).net_connections("tcp")
               if c.laddr and c.laddr.port == port and c.status != psutil.CONN_LISTEN)


async def _settled_rss(pid: int, port: int, sockets: int, timeout: float = 30.0) -> int:
    """The process's RSS once it holds exactly ``sockets`` accepted sockets on ``port`` and its
    RSS has stopped moving (unchanged by more than 64 KiB over three samples 0.2 s apart)."""
    deadline = time.monotonic() + timeout
    while _open_sockets(pid, port) != sockets:
        assert time.monotonic() < deadline, f"{_open_sockets(pid, port)} sockets open, expected {sockets}"
        await asyncio.sleep(0.05)
    samples = [_rss_kib(pid)]
    while len(samples) < 3 or max(samples[-3:]) - min(samples[-3:]) > 64:
        assert time.monotonic() < deadline, f"RSS did not settle: {samples}"
        await asyncio.sleep(0.2)
        samples.append(_rss_kib(pid))
    return samples[-1]


async def test_sigterm_with_hung_and_half_open_connections_exits_0(system: Stack) -> None:
    grace = 3
    process = start_gateway(system, "gw-term", {"SHUTDOWN_GRACE_SECONDS": str(grace)})
    port = process.port
    held = []
    try:
        for _ in range(5):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(_upgrade(extra=f"X-Big: {'a' * 9000}\r\n")[:-2])  # hung mid-handshake
            held.append(sock)
        for head in (b"", b"GET /health HTTP/1.1\r\nHost: x\r\n", _upgrade()[:40]):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(head)
            held.append(sock)
        live = await RawSocket.open(port)
        await asyncio.sleep(0.5)
        started = time.monotonic()
        assert process.process is not None
        process.process.send_signal(signal.SIGTERM)
        status = await asyncio.to_thread(process.process.wait, grace + 10)
        assert status == 0, process.log_tail(40)
        assert time.monotonic() - started <= grace + 5
        live.close()
    finally:
        for sock in held:
            sock.close()
        stop_gateway(system, process)
    assert "Traceback" not in process.log_path.read_text(errors="replace")


async def test_idle_sockets_are_cheap_and_their_memory_is_reused(system: Stack) -> None:
    count = 2000
    process = start_gateway(system, "gw-mem", {"MAX_SOCKETS_PER_USER": "0"})
    pid = process.pid
    assert pid is not None
    port = process.port

    async def open_all() -> list[RawSocket]:
        opened: list[RawSocket] = []
        for _start in range(0, count, 100):
            opened += await asyncio.gather(*(RawSocket.open(port, headers={
                "Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"}) for _ in range(100)))
        return opened

    def close_all(sockets: list[RawSocket]) -> None:
        for sock in sockets:
            sock.close()

    try:
        warm = await open_all()  # first round: imports, caches, pools reach their size
        close_all(warm)
        # each reading waits until the gateway holds exactly the sockets open at that point
        # and its memory has stopped moving
        base = await _settled_rss(pid, port, 0)
        first = await open_all()
        held = await _settled_rss(pid, port, count)
        per_socket = (held - base) / count
        close_all(first)
        after_first = await _settled_rss(pid, port, 0)
        second = await open_all()
        await _settled_rss(pid, port, count)
        close_all(second)
        after_second = await _settled_rss(pid, port, 0)
    finally:
        stop_gateway(system, process)
    assert per_socket <= 20, f"{per_socket:.1f} KiB per idle socket"
    assert after_second <= after_first * 1.10, (base, held, after_first, after_second)
