"""The internal HTTP client: one pooled aiohttp session per downstream service, JSON via msgspec
(typed replies decoded straight from bytes), the service token, request and turn ids and trace
context carried in headers, one explicit retry policy per call, and error replies turned back
into the :mod:`chat_common.errors` exception they stand for.

Retries
-------
Every call runs under exactly one :class:`RetryPolicy`; nothing in here retries on top of it,
and a caller that loops over a call should pass :data:`NONE` to it (one layer decides).

* :data:`IDEMPOTENT` (the default, as before): up to 4 tries with backoff for connection
  failures, a connection cut after sending, and 502/503/504 answers. Only for calls that are
  safe to repeat: reads, deletes, writes that carry an idempotency key or a turn id.
* :data:`SEND_ONCE`: retries only what never reached the server (connection refused, connect
  timeout); the server sees the request at most once.
* :data:`NONE`: never repeats anything.

**A call that is not safe to repeat must pass** ``retry=NONE`` (or ``SEND_ONCE``).
``retries=n`` (the older spelling) means ``n`` repeats of any kind (``retries=0`` is ``NONE``).

Failure kinds
-------------
* connection refused / connect timeout (nothing was sent): :class:`ServiceUnavailableError`;
  always safe to retry.
* a read timeout, or the connection reset/closed after the request went out, or a reply cut
  short: :class:`OutcomeUnknownError` (a ServiceUnavailableError): the call may have been
  applied; look it up (turn id, idempotency key) before compensating. Timeouts are never
  retried (a slow server is not helped by more load).
* an error reply: the mapped AppError (``error_class_for``); a 5xx never maps to a 4xx class.

A streamed request body (``content=`` an async iterable) is sent as it is produced, never
buffered, and never retried (it can be read only once).

Below the policy, aiohttp itself resends a GET, PUT or DELETE once when a pooled keep-alive
connection turns out to have been closed by the server (RFC 9112 9.3.1.1); idle connections
are dropped after ``KEEPALIVE_SECONDS``, before uvicorn's 5 s, so that race is rare.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any

import aiohttp
import msgspec
from aiohttp.client_exceptions import ConnectionTimeoutError

from chat_common.app import REQUEST_ID_HEADER, SERVICE_TOKEN_HEADER, TURN_ID_HEADER
from chat_common.errors import (
    AppError,
    OutcomeUnknownError,
    ServiceUnavailableError,
    UpstreamError,
    error_class_for,
)
from chat_common.logging import request_id_var, turn_id_var
from chat_common.tracing import inject_context

# Below uvicorn's default keep-alive (5 s): the client drops an idle connection before the
# server closes it, so a request is not written into a connection the server is closing.
KEEPALIVE_SECONDS = 4.0

# Nothing was sent: the request never reached the server.
_UNSENT = (aiohttp.ClientConnectorError, ConnectionTimeoutError)
# Sent (or maybe sent), no complete answer: reset, server closed, reply cut short.
_AFTER_SEND = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often one call may be tried.

    ``attempts``: tries in all for an answer in ``statuses`` and (when ``after_send``) for a
    connection cut after the request went out. ``unsent_attempts``: tries in all when the
    request never left (connection refused, connect timeout), which is always safe.
    """

    attempts: int = 1
    statuses: frozenset[int] = frozenset()
    after_send: bool = False
    unsent_attempts: int = 1
    backoff: float = 0.05  # seconds before the 2nd try, doubling after

    def delay(self, tried: int) -> float:
        return self.backoff * 2.0 ** (tried - 1)


IDEMPOTENT = RetryPolicy(
    attempts=4, statuses=frozenset({502, 503, 504}), after_send=True, unsent_attempts=4
)
SEND_ONCE = RetryPolicy(attempts=1, unsent_attempts=4)
NONE = RetryPolicy(attempts=1, unsent_attempts=1)

_encoder = msgspec.json.Encoder()
_any_decoder = msgspec.json.Decoder()
_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}


def _decoder(reply_type: Any) -> msgspec.json.Decoder[Any]:
    try:
        return _decoders[reply_type]
    except KeyError:
        decoder = _decoders[reply_type] = msgspec.json.Decoder(reply_type)
        return decoder
    except TypeError:  # unhashable type expression
        return msgspec.json.Decoder(reply_type)


def _query(params: Mapping[str, Any] | None) -> list[tuple[str, str]] | dict[str, str] | None:
    """Query parameters as httpx spelled them: None dropped, bools lower-case, lists repeated."""
    if not params:
        return None
    out: dict[str, str] = {}
    multi: list[tuple[str, str]] | None = None
    for key, value in params.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            multi = multi if multi is not None else []
            multi.extend((key, _param(v)) for v in value if v is not None)
        else:
            out[key] = _param(value)
    if multi is None:
        return out or None
    return [*out.items(), *multi]


def _param(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class StreamResponse:
    """What ``async with client.stream(...) as response`` yields: the httpx-like subset the
    callers use (``status_code``, ``headers``, ``aiter_raw``/``aiter_bytes``, ``aread``)."""

    __slots__ = ("_response",)

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    @property
    def status_code(self) -> int:
        return self._response.status

    @property
    def headers(self) -> Mapping[str, str]:  # case-insensitive
        return self._response.headers

    @property
    def is_success(self) -> bool:
        return 200 <= self._response.status < 300

    async def aiter_raw(self, chunk_size: int | None = None) -> AsyncIterator[bytes]:
        """The body as it arrives (not decompressed)."""
        try:
            if chunk_size:
                async for chunk in self._response.content.iter_chunked(chunk_size):
                    yield chunk
            else:
                async for chunk in self._response.content.iter_any():
                    yield chunk
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise OutcomeUnknownError(f"download cut short: {type(exc).__name__}") from exc

    aiter_bytes = aiter_raw

    async def aread(self) -> bytes:
        return await self._response.read()


class _StreamContext:
    def __init__(self, client: ServiceClient, method: str, path: str, kwargs: dict[str, Any]) -> None:
        self._client = client
        self._method = method
        self._path = path
        self._kwargs = kwargs
        self._response: aiohttp.ClientResponse | None = None

    async def __aenter__(self) -> StreamResponse:
        client = self._client
        kwargs = self._kwargs
        body, headers = client._body_and_headers(kwargs.get("json"), kwargs.get("content"), kwargs.get("headers"))
        timeout = kwargs.get("timeout")
        extra: dict[str, Any] = {"timeout": client._read_timeout(timeout)} if timeout else {}
        try:
            self._response = await client._session().request(
                self._method,
                client.base_url + self._path,
                data=body,
                params=_query(kwargs.get("params")),
                headers=headers,
                auto_decompress=False,
                **extra,
            )
        except _UNSENT as exc:
            raise ServiceUnavailableError(f"{client.name} service unreachable: {type(exc).__name__}") from exc
        except (asyncio.TimeoutError, *_AFTER_SEND) as exc:
            raise OutcomeUnknownError(f"{client.name} service gave no answer: {type(exc).__name__}") from exc
        return StreamResponse(self._response)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        response, self._response = self._response, None
        if response is not None:
            if exc_type is None and response.content.is_eof():
                response.release()  # fully read: the connection goes back to the pool
            else:
                response.close()


def correlation_headers() -> dict[str, str]:
    """What ties a call to the request and turn it is made for: their ids (when set) and the
    trace context, lower-case, so the same dict serves as HTTP headers and as gRPC metadata."""
    headers: dict[str, str] = {}
    if request_id := request_id_var.get():
        headers[REQUEST_ID_HEADER] = request_id
    if turn_id := turn_id_var.get():
        headers[TURN_ID_HEADER] = turn_id
    inject_context(headers)
    return headers


class ServiceClient:
    """One client per downstream service, shared by all requests of a process; its aiohttp
    session (a keep-alive pool of up to ``max_connections``) is made on first use inside the
    running loop, and made again if used from another loop."""

    def __init__(
        self,
        name: str,
        base_url: str,
        service_token: str,
        *,
        timeout: float = 10.0,
        retries: int = 3,
        retry: RetryPolicy | None = None,
        max_connections: int = 200,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.retry = retry if retry is not None else _from_retries(IDEMPOTENT, retries)
        self._token = service_token
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=timeout, sock_connect=min(timeout, 3.0), sock_read=timeout
        )
        self._max_connections = max_connections
        self._http: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _read_timeout(self, seconds: float) -> aiohttp.ClientTimeout:
        base = self._timeout
        return aiohttp.ClientTimeout(
            total=None, connect=base.connect, sock_connect=base.sock_connect, sock_read=seconds
        )

    def _session(self) -> aiohttp.ClientSession:
        http = self._http
        loop = asyncio.get_running_loop()
        if http is None or http.closed or self._loop is not loop:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections,
                limit_per_host=0,
                keepalive_timeout=KEEPALIVE_SECONDS,
                ttl_dns_cache=300,
            )
            http = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                headers={SERVICE_TOKEN_HEADER: self._token},
                cookie_jar=aiohttp.DummyCookieJar(),
                raise_for_status=False,
            )
            self._http, self._loop = http, loop
        return http

    async def aclose(self) -> None:
        http, self._http = self._http, None
        if http is not None and not http.closed:
            try:
                await http.close()
            except RuntimeError:  # made in a loop that is gone
                pass

    def _headers(self, extra: Mapping[str, str] | None) -> dict[str, str]:
        headers = correlation_headers()
        if extra:
            headers.update(extra)
        return headers

    def _body_and_headers(
        self, json: Any, content: Any, extra: Mapping[str, str] | None
    ) -> tuple[Any, dict[str, str]]:
        headers = self._headers(extra)
        if json is not None:
            headers["content-type"] = "application/json"
            return _encoder.encode(json), headers
        return content, headers  # raw bytes or a stream go as application/octet-stream

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        content: bytes | AsyncIterable[bytes] | None = None,
        retries: int | None = None,
        retry: RetryPolicy | None = None,
        type: Any = None,
    ) -> Any:
        """Send a request and decode the reply; raise the mapped AppError on an error reply.

        ``json``: a dict, list or msgspec Struct. ``type``: decode the JSON reply straight into
        this type (a Struct, ``list[Struct]``...). ``retry``: the policy for this call
        (default: the client's); ``retries=n`` is ``n`` repeats of any kind."""
        body, all_headers = self._body_and_headers(json, content, headers)
        policy = retry if retry is not None else (self.retry if retries is None else _from_retries(self.retry, retries))
        if body is not None and not isinstance(body, (bytes, bytearray, memoryview)):
            policy = NONE  # a stream can be read only once
        url = self.base_url + path
        query = _query(params)
        http = self._session()
        tried = 0
        while True:
            tried += 1
            try:
                async with http.request(method, url, data=body, params=query, headers=all_headers) as response:
                    status = response.status
                    payload = await response.read()
                    content_type = response.headers.get("content-type", "")
            except _UNSENT as exc:
                if tried < policy.unsent_attempts:
                    await asyncio.sleep(policy.delay(tried))
                    continue
                raise ServiceUnavailableError(f"{self.name} service unreachable: {type_name(exc)}") from exc
            except asyncio.TimeoutError as exc:
                raise OutcomeUnknownError(f"{self.name} service timed out") from exc
            except _AFTER_SEND as exc:
                if policy.after_send and tried < policy.attempts:
                    await asyncio.sleep(policy.delay(tried))
                    continue
                raise OutcomeUnknownError(f"{self.name} service gave no answer: {type_name(exc)}") from exc
            if status in policy.statuses and tried < policy.attempts:
                await asyncio.sleep(policy.delay(tried))
                continue
            return self._decode(status, content_type, payload, type)

    def _decode(self, status: int, content_type: str, payload: bytes, reply_type: Any) -> Any:
        if 200 <= status < 300:
            if status == 204 or not payload:
                return None
            if reply_type is not None:
                try:
                    return _decoder(reply_type).decode(payload)
                except msgspec.DecodeError as exc:  # ValidationError included
                    raise UpstreamError(f"{self.name} service sent a reply that does not fit: {exc}") from exc
            if content_type.startswith("application/json"):
                return _any_decoder.decode(payload)
            return payload
        raise self._error(status, payload)

    def _error(self, status: int, payload: bytes) -> AppError:
        code, message, details = "", f"{self.name} service answered {status}", None
        try:
            decoded = _any_decoder.decode(payload)
            error = decoded.get("error") if isinstance(decoded, dict) else None
            if isinstance(error, dict):
                code = str(error.get("code", ""))
                message = str(error.get("message", message))
                details = error.get("details")
        except (msgspec.DecodeError, UnicodeDecodeError):
            pass
        cls = error_class_for(code, status)
        if status >= 500 and cls.status_code < 500:
            cls = UpstreamError
        return cls(message, details=details)

    async def get(self, path: str, **kwargs: Any) -> Any:
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, **kwargs: Any) -> Any:
        return await self.request("POST", path, **kwargs)

    async def put(self, path: str, **kwargs: Any) -> Any:
        return await self.request("PUT", path, **kwargs)

    async def delete(self, path: str, **kwargs: Any) -> Any:
        return await self.request("DELETE", path, **kwargs)

    def stream(self, method: str, path: str, **kwargs: Any) -> _StreamContext:
        """A raw streaming request, sent once: ``async with client.stream(...) as response``
        (``params=``, ``headers=``, ``json=``, ``content=``, ``timeout=`` seconds per read).
        Entering raises ServiceUnavailableError / OutcomeUnknownError when no answer came;
        any status is handed back as it is."""
        unknown = set(kwargs) - {"params", "headers", "json", "content", "timeout"}
        if unknown:
            raise TypeError(f"stream() got unexpected arguments {sorted(unknown)}")
        return _StreamContext(self, method, path, kwargs)

    async def ping(self) -> None:
        try:
            async with self._session().get(
                self.base_url + "/health", timeout=aiohttp.ClientTimeout(total=2.0)
            ) as response:
                status = response.status
                await response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise ServiceUnavailableError(f"{self.name} health check failed: {type_name(exc)}") from exc
        if status != 200:
            raise ServiceUnavailableError(f"{self.name} health answered {status}")


def _from_retries(base: RetryPolicy, retries: int) -> RetryPolicy:
    """``retries=n``: n repeats of every kind ``base`` repeats."""
    attempts = 1 + max(0, retries)
    return replace(base, attempts=attempts, unsent_attempts=attempts)


def type_name(exc: BaseException) -> str:
    return exc.__class__.__name__
