"""Security tests against the real system (the session-wide ``system`` stack, AUTH_MODE=none)
plus gateways of their own, started per module with other settings (jwt mode, tight limits)
on the same services and Redis, and stopped again at the module's end."""
from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Origin, Subprotocol

from devstack.servers import ServiceProcess, free_port
from devstack.stack import Stack, wait_ready

RECV_TIMEOUT = 30.0
HS_SECRET = "s" * 16 + "-security-tests-hs256-secret-" + "k" * 16  # 61 bytes: above the RFC minimum
ISSUER = "https://auth.test.example"
AUDIENCE = "chat-backend"
BROWSER_ORIGIN = "http://app.test.example"
MODEL = "llama3.1:8b"


# --------------------------------------------------------------------------------------------
# tokens


def now() -> int:
    return int(time.time())


def claims(sub: str, /, **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": now(), "exp": now() + 600}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def hs_token(sub: str, /, secret: str = HS_SECRET, alg: str = "HS256", **overrides: Any) -> str:
    return jwt.encode(claims(sub, **overrides), secret, algorithm=alg)


def unsigned_token(sub: str, /, **overrides: Any) -> str:
    """``alg: none``, built by hand: PyJWT's encoder rightly makes this hard."""
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims(sub, **overrides))}."


@dataclass
class KeyPair:
    private: Any
    kid: str
    alg: str

    @property
    def public_pem(self) -> str:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()

    def token(self, sub: str, /, *, kid: str | None = "", **overrides: Any) -> str:
        headers = {"kid": self.kid if kid == "" else kid} if kid is not None else None
        return jwt.encode(claims(sub, **overrides), self.private, algorithm=self.alg, headers=headers)

    def jwk(self) -> dict[str, Any]:
        algorithm = jwt.algorithms.RSAAlgorithm if self.alg.startswith("RS") else jwt.algorithms.ECAlgorithm
        data = json.loads(algorithm.to_jwk(self.private.public_key()))
        data.update({"kid": self.kid, "alg": self.alg, "use": "sig"})
        return data


def rsa_pair(kid: str = "rsa-1") -> KeyPair:
    return KeyPair(rsa.generate_private_key(public_exponent=65537, key_size=2048), kid, "RS256")


def ec_pair(kid: str = "ec-1") -> KeyPair:
    return KeyPair(ec.generate_private_key(ec.SECP256R1()), kid, "ES256")


class JWKSServer:
    """A JWKS endpoint on a free port; counts its fetches so caching can be seen."""

    def __init__(self, keys: list[KeyPair]) -> None:
        self.keys = list(keys)
        self.fetches = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                owner.fetches += 1
                body = json.dumps({"keys": [k.jwk() for k in owner.keys]}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/.well-known/jwks.json"

    def start(self) -> "JWKSServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------------------------
# gateways of our own


def start_gateway(system: Stack, key: str, env: dict[str, str]) -> ServiceProcess:
    process = system.start_service("gateway", port=free_port(), key=f"{key}-{uuid.uuid4().hex[:6]}", env=env)
    wait_ready(process.url, 60)
    return process


def stop_gateway(system: Stack, process: ServiceProcess) -> None:
    process.stop()
    system.services.pop(process.name, None)


def jwt_env(**extra: str) -> dict[str, str]:
    env = {
        "AUTH_MODE": "jwt",
        "JWT_SECRET": HS_SECRET,
        "JWT_ALGORITHMS": "HS256",
        "JWT_ISSUER": ISSUER,
        "JWT_AUDIENCE": AUDIENCE,
        "JWT_LEEWAY_SECONDS": "5",
        "ALLOWED_ORIGINS": BROWSER_ORIGIN,
    }
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def jwt_gateway(system: Stack) -> Iterator[ServiceProcess]:
    """HS256, issuer and audience checked, 5 s leeway, one allowed browser origin."""
    process = start_gateway(system, "gw-jwt", jwt_env())
    yield process
    stop_gateway(system, process)


def ws_url(process: ServiceProcess, query: str = "") -> str:
    return f"ws://127.0.0.1:{process.port}/ws" + (f"?{query}" if query else "")


# --------------------------------------------------------------------------------------------
# a WebSocket client


class Client:
    def __init__(self, socket: Any) -> None:
        self.socket = socket

    @property
    def subprotocol(self) -> str | None:
        return self.socket.subprotocol

    async def send(self, type_: Any, **data: Any) -> None:
        await self.socket.send(json.dumps({"type": type_, "data": data}))

    async def send_raw(self, text: str | bytes) -> None:
        await self.socket.send(text)

    async def recv(self, timeout: float = RECV_TIMEOUT) -> dict[str, Any]:
        return json.loads(await asyncio.wait_for(self.socket.recv(), timeout))

    async def request(self, type_: Any, **data: Any) -> dict[str, Any]:
        await self.send(type_, **data)
        return await self.recv()

    async def chat(self, session_id: str, message: str, **extra: Any) -> dict[str, Any]:
        data = {"session_id": session_id, "model_name": MODEL, "message": message, "session_prompt": "be brief",
                "file_name": ""}
        data.update(extra)
        return await self.request(3, **{k: v for k, v in data.items() if v is not None})

    async def closed_with(self, timeout: float = 10.0) -> tuple[int | None, str]:
        """Wait for the server to close; the close code and reason it sent."""
        try:
            while True:
                await asyncio.wait_for(self.socket.recv(), timeout)
        except ConnectionClosed as exc:
            return (exc.rcvd.code if exc.rcvd else None), (exc.rcvd.reason if exc.rcvd else "")

    async def close(self) -> None:
        await self.socket.close()


class connect:
    """``async with connect(url, token=..., origin=...) as client``"""

    def __init__(self, url: str, *, headers: dict[str, str] | None = None, subprotocols: list[str] | None = None,
                 origin: str | None = None, token: str | None = None) -> None:
        self.url = url
        self.headers = dict(headers or {})
        if token is not None:
            self.headers["Authorization"] = f"Bearer {token}"
        self.subprotocols = subprotocols
        self.origin = origin

    async def __aenter__(self) -> Client:
        self._socket = await websockets.connect(
            self.url, max_size=None, open_timeout=10, additional_headers=self.headers,
            subprotocols=None if self.subprotocols is None else [Subprotocol(p) for p in self.subprotocols],
            origin=None if self.origin is None else Origin(self.origin), ping_interval=None,
        )
        return Client(self._socket)

    async def __aexit__(self, *exc: object) -> None:
        await self._socket.close()


async def refused(url: str, **kwargs: Any) -> tuple[int | None, str]:
    """How the gateway refuses a socket: ("http", status) before the handshake, else the
    close code and reason right after it. Fails the test if the socket is served instead."""
    try:
        async with connect(url, **kwargs) as client:
            try:
                await client.send(6)
                reply = await client.recv(timeout=10)
            except ConnectionClosed as exc:
                return (exc.rcvd.code if exc.rcvd else None), (exc.rcvd.reason if exc.rcvd else "")
            raise AssertionError(f"the socket was served: {reply}")
    except InvalidStatus as exc:
        return exc.response.status_code, "http"


def assert_ok(reply: dict[str, Any], type_: int) -> dict[str, Any]:
    assert "error" not in reply, reply
    assert reply["type"] == type_, reply
    return reply["data"]


def assert_error(reply: dict[str, Any], code: int, type_: int | None = None) -> str:
    assert "data" not in reply, reply
    assert reply.get("code") == code, reply
    if type_ is not None:
        assert reply.get("type") == type_, reply
    assert isinstance(reply.get("error"), str) and reply["error"], reply
    return reply["error"]


# --------------------------------------------------------------------------------------------
# the system, seen from outside


def new_user(system: Stack, balance: float = 5.0) -> str:
    return system.create_user(f"sec-{uuid.uuid4().hex[:6]}", [4, 5, 8], balance)


def internal_get(system: Stack, service: str, path: str, **params: str) -> Any:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    request = urllib.request.Request(
        f"{system.url(service)}{path}" + (f"?{query}" if query else ""),
        headers={"x-service-token": system.service_token},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def entries_of(system: Stack, user_id: str, session_id: str) -> list[tuple[str, str]]:
    payload = internal_get(system, "sessions", f"/v1/sessions/{session_id}/entries", user_id=user_id)
    return [(e["role"], e["content"]) for e in payload["items"]]


def sessions_of(system: Stack, user_id: str) -> list[str]:
    payload = internal_get(system, "sessions", "/v1/sessions", user_id=user_id, limit="500")
    return [s["session_id"] for s in payload["items"]]


def files_of(system: Stack, user_id: str, session_id: str) -> list[str]:
    payload = internal_get(system, "files", f"/v1/sessions/{session_id}/files", user_id=user_id)
    return sorted(f["file_name"] for f in payload["items"])


def balance_nanos(system: Stack, user_id: str) -> int:
    return int(system.admin("GET", f"/v1/users/{user_id}/balance")["balance_nanos"])


# --------------------------------------------------------------------------------------------
# multipart, the way browsers send it


BOUNDARY = "----SecurityTestBoundary0123456789"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


def form(fields: dict[str, str], filename: str | None, data: bytes) -> bytes:
    out = b""
    for name, value in fields.items():
        out += f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n".encode()
        out += value.encode("utf-8", errors="surrogatepass") + b"\r\n"
    if filename is not None:
        out += (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"".encode()
                + filename.encode("utf-8", errors="surrogatepass")
                + b"\"\r\nContent-Type: application/octet-stream\r\n\r\n" + data + b"\r\n")
    return out + f"--{BOUNDARY}--\r\n".encode()


def upload_fields(user_id: str | None, session_id: str = "NEW") -> dict[str, str]:
    fields = {"session_id": session_id, "model_name": MODEL, "session_prompt": "be brief"}
    if user_id is not None:
        fields = {"user_id": user_id, **fields}
    return fields


async def upload(client: httpx.AsyncClient, fields: dict[str, str], filename: str | None, data: bytes,
                 token: str | None = None, **headers: str) -> httpx.Response:
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return await client.post("/upload", content=form(fields, filename, data),
                             headers={"content-type": MULTIPART, **headers})


def failure(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    payload = response.json()
    assert payload["data"] is None and payload["message"], payload
    return payload["message"]


# --------------------------------------------------------------------------------------------
# logs


@dataclass
class LogWatch:
    """Where every process log of the stack stood; what was written since."""

    system: Stack
    offsets: dict[Path, int] = field(default_factory=dict)

    def start(self) -> "LogWatch":
        for process in self.system.services.values():
            path = process.log_path
            self.offsets[path] = path.stat().st_size if path.exists() else 0
        return self

    def written(self) -> dict[str, str]:
        out = {}
        for process in list(self.system.services.values()):
            path = process.log_path
            if not path.exists():
                continue
            with open(path, "rb") as log:
                log.seek(self.offsets.get(path, 0))
                out[process.name] = log.read().decode(errors="replace")
        return out

    def assert_clean(self) -> None:
        for name, text in self.written().items():
            bad = [line for line in text.splitlines()
                   if "Traceback" in line or '"exc":' in line or '"level": "error"' in line
                   or '"level": "critical"' in line]
            assert not bad, f"{name} logged errors or tracebacks:\n" + "\n".join(line[:1500] for line in bad[:20])
            assert "Traceback" not in text, f"{name} logged a traceback:\n{text[-4000:]}"


@pytest.fixture(scope="module")
def log_watch(system: Stack) -> LogWatch:
    return LogWatch(system).start()


def http_status(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> int:
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
