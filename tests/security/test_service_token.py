"""Internal services answer only callers holding the shared SERVICE_TOKEN: sessions, files and
billing each refuse every API path without it or with a wrong one (401), while /health stays
open for probes."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from typing import Any, cast

import pytest

from devstack.stack import Stack

from .conftest import http_status, new_user

# One read and one write per service, each of a real resource, so a 401 is the token's doing
# and not a missing route's.
CALLS = {
    "sessions": [("GET", "/v1/sessions?user_id={user}"), ("POST", "/v1/sessions")],
    "files": [("GET", "/v1/sessions/{session}/files?user_id={user}"), ("POST", "/v1/sweep")],
    "billing": [("GET", "/v1/users/{user}/balance"), ("POST", "/v1/users/{user}/credit")],
}
WRONG_TOKENS = [
    None,
    "",
    "wrong-token",
    "{real}x",  # a longer one that starts right
    "{real_prefix}",  # a prefix of the real one
    "{real_upper}",
]


def _call(url: str, method: str, token: str | None, body: dict | None = None) -> tuple[int, bytes]:
    headers = {"content-type": "application/json"}
    if token is not None:
        headers["x-service-token"] = token
    data = json.dumps(body).encode() if body is not None else (b"{}" if method == "POST" else None)
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.mark.parametrize("service", ["sessions", "files", "billing"])
def test_internal_service_refuses_calls_without_the_service_token(system: Stack, service: str) -> None:
    user = new_user(system)
    real = system.service_token
    before = system.admin("GET", f"/v1/users/{user}/balance")["balance_nanos"]
    for method, template in CALLS[service]:
        path = template.format(user=user, session=uuid.uuid4())
        url = f"{system.url(service)}{path}"
        for template_token in WRONG_TOKENS:
            token = None if template_token is None else template_token.format(
                real=real, real_prefix=real[:-1], real_upper=real.upper() if real.upper() != real else real + "A"
            )
            body = {"amount": 100, "idempotency_key": str(uuid.uuid4())} if path.endswith("/credit") else None
            status, payload = _call(url, method, token, body)
            assert status == 401, (service, method, path, token is None, status, payload[:200])
            assert json.loads(payload)["error"]["code"] == "unauthorized"
        # the same call with the token is served (so the 401 above was about the token)
        body = {"amount": 0.5, "idempotency_key": str(uuid.uuid4())} if path.endswith("/credit") else None
        if method == "POST" and service == "sessions":
            body = {"user_id": user, "name": "n", "model_name": "m", "prompt": ""}
        status, payload = _call(url, method, real, body)
        assert status < 300, (service, method, path, status, payload[:300])
    # the refused credits did not happen; the accepted one did, once
    after = system.admin("GET", f"/v1/users/{user}/balance")["balance_nanos"]
    assert after - before == (500_000_000 if service == "billing" else 0)
    for open_path in ("/health",):
        assert http_status(f"{system.url(service)}{open_path}") == 200


def test_the_gateway_itself_needs_no_service_token(system: Stack) -> None:
    """It is the public face: its own routes are guarded by user authentication instead."""
    assert http_status(f"{system.gateway_url}/health") == 200


def _raw_get(port: int, path: str) -> int:
    """A request line sent as written: clients normalise ``..`` away, an attacker does not."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        head = sock.recv(64).decode(errors="replace")
    return int(head.split()[1])


@pytest.mark.parametrize("service", ["sessions", "files", "billing"])
def test_dot_segments_after_an_open_path_reach_nothing(system: Stack, service: str) -> None:
    user = new_user(system)
    port = system.services[service].port
    for path in (f"/health/../v1/users/{user}/balance", f"/metrics/../v1/sessions?user_id={user}",
                 f"/ready/..%2Fv1/users/{user}"):
        assert _raw_get(port, path) in (401, 404), path
    assert _raw_get(port, "/health") == 200


async def test_open_paths_are_exact_not_prefixes() -> None:
    """A route that merely begins like an open path still needs the token."""
    import httpx
    from litestar import Litestar, get

    from chat_common.app import ServicePlugin

    @get(["/metrics-admin", "/healthcheck/deep", "/ready2"], sync_to_thread=False)
    def lookalike() -> str:
        return "internal"

    app = Litestar([lookalike], plugins=[ServicePlugin(name="probe", service_token="the-token")])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=cast(Any, app)), base_url="http://probe") as client:  # litestar types ASGI scopes as TypedDicts, httpx as MutableMappings
        for path in ("/metrics-admin", "/healthcheck/deep", "/ready2"):
            assert (await client.get(path)).status_code == 401, path
            assert (await client.get(path, headers={"x-service-token": "the-token"})).status_code == 200, path
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200
