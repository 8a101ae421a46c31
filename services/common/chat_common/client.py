"""The internal HTTP client: JSON via msgspec, the service token, request and turn ids carried
in headers, retries for calls that are safe to repeat, and error replies turned back into the
:mod:`chat_common.errors` exception they stand for."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, Mapping
from typing import Any

import httpx
import msgspec

from chat_common.app import REQUEST_ID_HEADER, SERVICE_TOKEN_HEADER, TURN_ID_HEADER
from chat_common.errors import AppError, ServiceUnavailableError, UpstreamError, error_class_for
from chat_common.logging import request_id_var, turn_id_var
from chat_common.tracing import inject_context

logger = logging.getLogger(__name__)

_RETRYABLE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError)


class ServiceClient:
    """One client per downstream service, shared by all requests of a process.

    ``retries`` applies to every call: the internal APIs are built so that a call is safe to
    repeat (reads, deletes, and writes carrying an idempotency key).
    """

    def __init__(
        self,
        name: str,
        base_url: str,
        service_token: str,
        *,
        timeout: float = 10.0,
        retries: int = 3,
        max_connections: int = 200,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 3.0)),
            headers={SERVICE_TOKEN_HEADER: service_token},
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    def _headers(self, extra: Mapping[str, str] | None) -> dict[str, str]:
        headers: dict[str, str] = {}
        if request_id := request_id_var.get():
            headers[REQUEST_ID_HEADER] = request_id
        if turn_id := turn_id_var.get():
            headers[TURN_ID_HEADER] = turn_id
        if extra:
            headers.update(extra)
        inject_context(headers)
        return headers

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
    ) -> Any:
        """Send a request and decode the JSON reply; raise the mapped AppError on error."""
        body: bytes | AsyncIterable[bytes] | None = content
        all_headers = self._headers(headers)
        if json is not None:
            body = msgspec.json.encode(json)
            all_headers["content-type"] = "application/json"
        clean_params = {k: v for k, v in (params or {}).items() if v is not None}
        attempts = 1 + (self.retries if retries is None else retries)
        if body is not None and not isinstance(body, bytes):
            attempts = 1  # a stream can be read only once
        for attempt in range(attempts):
            try:
                response = await self._http.request(
                    method, path, content=body, params=clean_params, headers=all_headers
                )
            except _RETRYABLE as exc:
                if attempt + 1 >= attempts:
                    raise ServiceUnavailableError(f"{self.name} service unreachable: {type(exc).__name__}") from exc
                await asyncio.sleep(0.05 * 2**attempt)
                continue
            except httpx.TimeoutException as exc:
                raise ServiceUnavailableError(f"{self.name} service timed out") from exc
            if response.status_code in (502, 503, 504) and attempt + 1 < attempts:
                await asyncio.sleep(0.05 * 2**attempt)
                continue
            return self._decode(response)
        raise ServiceUnavailableError(f"{self.name} service unavailable")  # pragma: no cover

    def _decode(self, response: httpx.Response) -> Any:
        if response.status_code == 204 or not response.content:
            if response.is_success:
                return None
        if response.is_success:
            if response.headers.get("content-type", "").startswith("application/json"):
                return msgspec.json.decode(response.content)
            return response.content
        raise self._error(response)

    def _error(self, response: httpx.Response) -> AppError:
        code, message, details = "", f"{self.name} service answered {response.status_code}", None
        try:
            payload = msgspec.json.decode(response.content)
            error = payload.get("error") if isinstance(payload, dict) else None
            if isinstance(error, dict):
                code = str(error.get("code", ""))
                message = str(error.get("message", message))
                details = error.get("details")
        except msgspec.DecodeError:
            pass
        cls = error_class_for(code, response.status_code)
        if response.status_code >= 500 and cls.status_code < 500:
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

    def stream(self, method: str, path: str, **kwargs: Any) -> Any:
        """A raw streaming request (``async with client.stream(...) as response``)."""
        headers = self._headers(kwargs.pop("headers", None))
        return self._http.stream(method, path, headers=headers, **kwargs)

    async def ping(self) -> None:
        response = await self._http.get("/health", timeout=2.0)
        if response.status_code != 200:
            raise ServiceUnavailableError(f"{self.name} health answered {response.status_code}")
