"""The internal client against real local servers: typed replies, error mapping, the retry
policies, outcome-unknown failures, streamed upload bodies and streamed downloads, headers."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace

import msgspec
import pytest
from aiohttp import web

from chat_common import tracing
from chat_common.client import IDEMPOTENT, NONE, SEND_ONCE, ServiceClient
from chat_common.errors import (
    InsufficientBalanceError,
    NotFoundError,
    OutcomeUnknownError,
    PayloadTooLargeError,
    ServiceUnavailableError,
    UpstreamError,
)
from chat_common.logging import request_id_var, turn_id_var
from devstack.servers import free_port

FAST = replace(IDEMPOTENT, backoff=0.0)


class Item(msgspec.Struct):
    id: str
    n: int


class Probe:
    """An aiohttp server in the test's loop; counts hits per path and sees chunks arrive."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.headers: dict[str, str] = {}
        self.chunks: list[bytes] = []
        self.chunk_seen = asyncio.Event()

    def count(self, request: web.Request) -> None:
        self.hits[request.path] = self.hits.get(request.path, 0) + 1

    async def item(self, request: web.Request) -> web.Response:
        return web.json_response({"id": request.match_info["id"], "n": 3})

    async def items(self, request: web.Request) -> web.Response:
        return web.json_response([{"id": "a", "n": 1}, {"id": "b", "n": 2}])

    async def echo(self, request: web.Request) -> web.Response:
        self.headers = dict(request.headers)
        return web.json_response({"body": await request.json(), "query": dict(request.query)})

    async def error(self, request: web.Request) -> web.Response:
        status = int(request.match_info["status"])
        code = request.query.get("code")
        if code is None:
            return web.Response(status=status, text="<html>bad gateway</html>", content_type="text/html")
        return web.json_response({"error": {"code": code, "message": f"said {code}"}}, status=status)

    async def busy(self, request: web.Request) -> web.Response:
        self.count(request)
        await request.read()
        return web.json_response({"error": {"code": "unavailable", "message": "busy"}}, status=503)

    async def flaky(self, request: web.Request) -> web.Response:
        self.count(request)
        if self.hits[request.path] < 3:
            return web.Response(status=502)
        return web.json_response({"ok": True})

    async def slow(self, request: web.Request) -> web.Response:
        self.count(request)
        await asyncio.sleep(1.0)  # well past the client's 0.3 s
        return web.json_response({})

    async def upload(self, request: web.Request) -> web.Response:
        size = 0
        async for chunk in request.content.iter_any():
            self.chunks.append(chunk)
            self.chunk_seen.set()
            size += len(chunk)
        return web.json_response({"size": size, "type": request.headers.get("content-type")}, status=201)

    async def refuse_upload(self, request: web.Request) -> web.Response:
        self.count(request)
        await request.content.readany()  # the first chunk, then an answer before the rest
        return web.json_response({"error": {"code": "payload_too_large", "message": "too big"}}, status=413)

    async def download(self, request: web.Request) -> web.StreamResponse:
        if request.query.get("user_id") != "u1":
            return web.json_response({"error": {"code": "not_found", "message": "no"}}, status=404)
        response = web.StreamResponse(headers={"x-file-original-name": "a%20b.txt", "content-type": "text/plain"})
        response.content_length = 3 * 1024
        await response.prepare(request)
        for part in (b"a", b"b", b"c"):
            await response.write(part * 1024)
        await response.write_eof()
        return response

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/items/{id}", self.item)
        app.router.add_get("/items", self.items)
        app.router.add_post("/echo", self.echo)
        app.router.add_get("/error/{status}", self.error)
        app.router.add_post("/busy", self.busy)
        app.router.add_get("/busy", self.busy)
        app.router.add_get("/flaky", self.flaky)
        app.router.add_post("/slow", self.slow)
        app.router.add_post("/upload", self.upload)
        app.router.add_post("/refuse-upload", self.refuse_upload)
        app.router.add_get("/download", self.download)
        app.router.add_get("/health", self.health)
        return app


@pytest.fixture
async def probe() -> AsyncIterator[tuple[Probe, ServiceClient]]:
    state = Probe()
    runner = web.AppRunner(state.app())
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    client = ServiceClient("probe", f"http://127.0.0.1:{port}", "s3cret", retry=FAST)
    try:
        yield state, client
    finally:
        await client.aclose()
        await runner.cleanup()


@contextlib.asynccontextmanager
async def hang_up_server() -> AsyncIterator[tuple[str, list[bytes]]]:
    """A server that reads the whole request and closes the connection without answering."""
    requests: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await reader.readexactly(length) if length else b""
        requests.append(head + body)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", requests
    finally:
        server.close()
        await server.wait_closed()


async def test_typed_replies_decode_into_structs(probe: tuple[Probe, ServiceClient]) -> None:
    _, client = probe
    item = await client.get("/items/x", type=Item)
    assert item == Item(id="x", n=3)
    assert await client.get("/items", type=list[Item]) == [Item("a", 1), Item("b", 2)]
    assert await client.get("/items/y") == {"id": "y", "n": 3}  # untyped: plain JSON
    with pytest.raises(UpstreamError, match="does not fit"):
        await client.get("/items", type=Item)


async def test_json_accepts_structs_and_params_are_spelled_as_before(probe: tuple[Probe, ServiceClient]) -> None:
    _, client = probe
    reply = await client.post(
        "/echo", json=Item("s", 1), params={"flag": True, "n": 2, "skip": None, "user_id": "u"}
    )
    assert reply == {"body": {"id": "s", "n": 1}, "query": {"flag": "true", "n": "2", "user_id": "u"}}
    assert (await client.post("/echo", json={"a": [1, 2]}))["body"] == {"a": [1, 2]}


async def test_error_replies_map_back(probe: tuple[Probe, ServiceClient]) -> None:
    _, client = probe
    with pytest.raises(NotFoundError, match="said not_found"):
        await client.get("/error/404", params={"code": "not_found"})
    with pytest.raises(InsufficientBalanceError):
        await client.get("/error/402", params={"code": "insufficient_balance"})
    with pytest.raises(UpstreamError):  # a 5xx never becomes a client error
        await client.get("/error/500", params={"code": "not_found"})
    with pytest.raises(UpstreamError, match="answered 502"):  # not JSON at all
        await client.get("/error/502", retry=NONE)


async def test_headers_carry_token_ids_and_trace_context(
    probe: tuple[Probe, ServiceClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    from opentelemetry import context, trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    state, client = probe
    monkeypatch.setattr(tracing, "_provider", object())  # tracing "on": inject_context propagates
    span = NonRecordingSpan(SpanContext(0x1234, 0x5678, is_remote=False, trace_flags=TraceFlags(1)))
    attached = context.attach(trace.set_span_in_context(span))
    request_token, turn_token = request_id_var.set("req-1"), turn_id_var.set("turn-1")
    try:
        await client.post("/echo", json={}, headers={"x-extra": "yes"})
    finally:
        request_id_var.reset(request_token)
        turn_id_var.reset(turn_token)
        context.detach(attached)
    headers = {k.lower(): v for k, v in state.headers.items()}
    assert headers["x-service-token"] == "s3cret"
    assert headers["x-request-id"] == "req-1" and headers["x-turn-id"] == "turn-1"
    assert headers["x-extra"] == "yes"
    assert headers["content-type"] == "application/json"
    assert headers["traceparent"].startswith("00-" + f"{0x1234:032x}")


async def test_idempotent_policy_retries_503_and_no_retry_policy_does_not(
    probe: tuple[Probe, ServiceClient],
) -> None:
    state, client = probe
    with pytest.raises(ServiceUnavailableError, match="busy"):
        await client.post("/busy", json={})
    assert state.hits["/busy"] == 4  # the client's default (IDEMPOTENT): 4 tries
    state.hits.clear()
    with pytest.raises(ServiceUnavailableError):
        await client.post("/busy", json={}, retry=NONE)
    assert state.hits["/busy"] == 1
    state.hits.clear()
    with pytest.raises(ServiceUnavailableError):
        await client.get("/busy", retry=SEND_ONCE)
    assert state.hits["/busy"] == 1
    state.hits.clear()
    with pytest.raises(ServiceUnavailableError):
        await client.get("/busy", retries=1)  # the older spelling: 1 repeat
    assert state.hits["/busy"] == 2
    assert await client.get("/flaky") == {"ok": True}  # two 502s ridden out
    assert state.hits["/flaky"] == 3


async def test_hang_up_after_the_request_is_outcome_unknown() -> None:
    async with hang_up_server() as (url, requests):
        client = ServiceClient("hangup", url, "t", retry=FAST)
        try:
            with pytest.raises(OutcomeUnknownError):
                await client.post("/v1/turns", json={"turn_id": "t1"}, retry=NONE)
            assert len(requests) == 1 and requests[0].endswith(b'{"turn_id":"t1"}')
            requests.clear()
            with pytest.raises(OutcomeUnknownError):  # safe to repeat: repeated, then unknown
                await client.post("/v1/turns", json={"turn_id": "t1"})
            assert len(requests) == 4
        finally:
            await client.aclose()


async def test_timeout_is_outcome_unknown_and_never_retried(probe: tuple[Probe, ServiceClient]) -> None:
    state, client = probe
    quick = ServiceClient("probe", client.base_url, "s3cret", timeout=0.3, retry=FAST)
    try:
        with pytest.raises(OutcomeUnknownError, match="timed out"):
            await quick.post("/slow", json={})
        assert state.hits["/slow"] == 1
    finally:
        await quick.aclose()


async def test_connection_refused_is_unavailable_not_unknown() -> None:
    client = ServiceClient("ghost", f"http://127.0.0.1:{free_port()}", "t", retry=replace(SEND_ONCE, backoff=0.0))
    try:
        with pytest.raises(ServiceUnavailableError, match="unreachable") as caught:
            await client.post("/anything", json={})
        assert not isinstance(caught.value, OutcomeUnknownError)
        with pytest.raises(ServiceUnavailableError):
            await client.ping()
        with pytest.raises(ServiceUnavailableError, match="unreachable"):
            async with client.stream("GET", "/download"):
                pass
    finally:
        await client.aclose()


async def test_streamed_upload_is_sent_as_produced(probe: tuple[Probe, ServiceClient]) -> None:
    state, client = probe

    async def body() -> AsyncIterator[bytes]:
        yield b"x" * 1000
        # The server must have the first chunk before the second one exists: a client that
        # gathered the body before sending would wait here forever.
        await asyncio.wait_for(state.chunk_seen.wait(), timeout=10)
        yield b"y" * 1000

    reply = await client.post("/upload", content=body(), params={"user_id": "u"})
    assert reply == {"size": 2000, "type": "application/octet-stream"}
    assert b"".join(state.chunks) == b"x" * 1000 + b"y" * 1000


async def test_streamed_upload_answered_early_is_the_error_and_not_retried(
    probe: tuple[Probe, ServiceClient],
) -> None:
    state, client = probe
    more = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"x" * 1000
        await more.wait()  # never set: the rest of the file would come much later
        yield b"y"

    with pytest.raises(PayloadTooLargeError, match="too big"):
        await asyncio.wait_for(client.post("/refuse-upload", content=body()), timeout=10)
    assert state.hits["/refuse-upload"] == 1


async def test_stream_download(probe: tuple[Probe, ServiceClient]) -> None:
    _, client = probe
    async with client.stream("GET", "/download", params={"user_id": "u1"}, timeout=5.0) as response:
        assert response.status_code == 200
        assert response.headers.get("content-length") == str(3 * 1024)
        assert response.headers.get("X-File-Original-Name") == "a%20b.txt"
        data = b"".join([chunk async for chunk in response.aiter_raw()])
    assert data == b"a" * 1024 + b"b" * 1024 + b"c" * 1024
    # entered and left by hand, as the gateway's download route does
    stream = client.stream("GET", "/download", params={"user_id": "nobody"})
    response = await stream.__aenter__()
    assert response.status_code == 404
    await stream.__aexit__(None, None, None)
    await client.ping()


def test_client_made_outside_a_loop_works_in_each_loop_it_meets() -> None:
    async def serve_and_call(client: ServiceClient) -> object:
        state = Probe()
        runner = web.AppRunner(state.app())
        await runner.setup()
        port = int(client.base_url.rsplit(":", 1)[1])
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            return await client.get("/items/z", type=Item)
        finally:
            await client.aclose()
            await runner.cleanup()

    client = ServiceClient("probe", f"http://127.0.0.1:{free_port()}", "t")
    assert asyncio.run(serve_and_call(client)) == Item("z", 3)
    assert asyncio.run(serve_and_call(client)) == Item("z", 3)
