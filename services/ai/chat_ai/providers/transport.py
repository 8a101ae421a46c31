"""HTTP shared by the providers: calling a model API with its failures mapped to gRPC statuses,
and fetching the files a turn carries (streamed, hashed, size-capped)."""
from __future__ import annotations

import asyncio
import hashlib
import json
import mimetypes
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import grpc
import httpx

from chat_ai.providers.base import AIError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp")


def _provider_message(response: httpx.Response) -> str:
    """The provider's own words for a failure: OpenAI's ``{"error": {"message"}}``, Ollama's
    ``{"error": "..."}``, else the start of the body."""
    text = response.text
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    message: object = None
    if isinstance(body, dict):
        error = body.get("error")
        message = error.get("message") if isinstance(error, dict) else error
        message = message or body.get("message") or body.get("detail")
    if not isinstance(message, str) or not message:
        message = text.strip() or response.reason_phrase
    return message[:300]


def status_error(provider: str, response: httpx.Response) -> AIError:
    status = response.status_code
    detail = f"{provider} answered HTTP {status}: {_provider_message(response)}"
    if status == 401:
        code = grpc.StatusCode.UNAUTHENTICATED
    elif status == 403:
        code = grpc.StatusCode.PERMISSION_DENIED
    elif status == 429:
        code = grpc.StatusCode.RESOURCE_EXHAUSTED
    elif status == 404:
        # Ollama: model not pulled; OpenAI: unknown model or wrong base URL.
        code = grpc.StatusCode.NOT_FOUND
    elif status == 408:
        code = grpc.StatusCode.DEADLINE_EXCEEDED
    elif status in (400, 413, 422):
        # The provider judged the request itself (context too long, bad image, ...).
        code = grpc.StatusCode.INVALID_ARGUMENT
    elif status < 500:
        code = grpc.StatusCode.FAILED_PRECONDITION
    else:
        code = grpc.StatusCode.UNAVAILABLE
    return AIError(code, detail)


async def post_json(
    client: httpx.AsyncClient,
    provider: str,
    url: str,
    body: dict[str, Any],
    *,
    timeout: float,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    try:
        # httpx's timeout bounds each read, not the whole call; a server trickling bytes must
        # not hold a turn past its deadline.
        async with asyncio.timeout(timeout):
            response = await client.post(url, json=body, headers=headers, timeout=timeout)
    except (TimeoutError, httpx.TimeoutException):
        raise AIError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{provider} did not answer within {timeout:g}s") from None
    except httpx.TransportError as exc:
        raise AIError(
            grpc.StatusCode.UNAVAILABLE, f"{provider} unreachable at {url}: {type(exc).__name__}: {exc}"
        ) from None
    if response.status_code >= 400:
        raise status_error(provider, response)
    try:
        data = response.json()
    except ValueError:
        data = None
    if not isinstance(data, dict):
        # Whatever answered is not the model API (a proxy's HTML page, say): a bad gateway.
        raise AIError(grpc.StatusCode.UNAVAILABLE, f"{provider} answered with something that is not a JSON object")
    return data


async def post_lines(
    client: httpx.AsyncClient,
    provider: str,
    url: str,
    body: dict[str, Any],
    *,
    timeout: float,
    headers: dict[str, str] | None = None,
) -> AsyncGenerator[str, None]:
    """POST ``body`` and yield the answer's non-empty lines as they arrive (server-sent events,
    NDJSON). Closing the generator (a cancelled call) closes the upstream connection. The whole
    call is bounded by ``timeout``, as :func:`post_json`."""
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        async with client.stream("POST", url, json=body, headers=headers, timeout=timeout) as response:
            if response.status_code >= 400:
                await response.aread()
                raise status_error(provider, response)
            lines = response.aiter_lines().__aiter__()
            while True:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    raise TimeoutError
                try:
                    async with asyncio.timeout(remaining):
                        line = await lines.__anext__()
                except StopAsyncIteration:
                    return
                if line.strip():
                    yield line
    except (TimeoutError, httpx.TimeoutException):
        raise AIError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{provider} did not answer within {timeout:g}s") from None
    except httpx.TransportError as exc:
        raise AIError(
            grpc.StatusCode.UNAVAILABLE, f"{provider} unreachable at {url}: {type(exc).__name__}: {exc}"
        ) from None


def parse_json_line(provider: str, text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise AIError(grpc.StatusCode.UNAVAILABLE, f"{provider} streamed something that is not a JSON object")
    return data


def token_count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


@dataclass(frozen=True)
class FetchedFile:
    url: str
    size: int = 0
    sha256: str = ""
    content_type: str = ""
    data: bytes | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error

    def describe(self) -> str:
        if self.error:
            return f"{self.url}: unreachable ({self.error})"
        return f"{self.url}: fetched {self.size} bytes sha256 {self.sha256}"


async def fetch_file(
    client: httpx.AsyncClient, url: str, *, timeout: float, max_bytes: int, keep_bytes: bool = False
) -> FetchedFile:
    """GET ``url`` streaming, hashing as it goes; never raises, a failure is in ``error``."""
    if urlsplit(url).scheme not in ("http", "https"):
        return FetchedFile(url, error="not an http(s) URL")
    digest = hashlib.sha256()
    size = 0
    chunks: list[bytes] = []
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("GET", url, timeout=timeout, follow_redirects=True) as response:
                if response.status_code >= 400:
                    return FetchedFile(url, error=f"HTTP {response.status_code}")
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > max_bytes:
                    return FetchedFile(url, error=f"larger than {max_bytes} bytes")
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > max_bytes:
                        return FetchedFile(url, error=f"larger than {max_bytes} bytes")
                    digest.update(chunk)
                    if keep_bytes:
                        chunks.append(chunk)
                content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    except (TimeoutError, httpx.TimeoutException):
        return FetchedFile(url, error=f"timed out after {timeout:g}s")
    except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError) as exc:
        return FetchedFile(url, error=f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    return FetchedFile(
        url, size=size, sha256=digest.hexdigest(), content_type=content_type,
        data=b"".join(chunks) if keep_bytes else None,
    )


def looks_like_image(url: str) -> bool:
    return urlsplit(url).path.lower().endswith(IMAGE_SUFFIXES)


@dataclass(frozen=True)
class Attachments:
    """A turn's files as a model sees them: every URL named in the text, images also inline."""

    text: str
    images: tuple[tuple[str, bytes], ...]  # (mime type, bytes)


async def prepare_attachments(
    client: httpx.AsyncClient, urls: tuple[str, ...], *, timeout: float, max_image_bytes: int
) -> Attachments:
    """Images are fetched here and sent inline because the URLs the gateway hands out are
    usually reachable from this service only, not from a hosted model API."""
    if not urls:
        return Attachments("", ())
    image_urls = [url for url in urls if looks_like_image(url)]
    fetched = await asyncio.gather(*(
        fetch_file(client, url, timeout=timeout, max_bytes=max_image_bytes, keep_bytes=True)
        for url in image_urls
    ))
    by_url = dict(zip(image_urls, fetched, strict=True))
    lines = []
    images: list[tuple[str, bytes]] = []
    for url in urls:
        result = by_url.get(url)
        if result is None:
            lines.append(f"- {url}")
        elif result.ok and result.data is not None:
            mime = result.content_type if result.content_type.startswith("image/") else (
                mimetypes.guess_type(urlsplit(url).path)[0] or "image/png"
            )
            images.append((mime, result.data))
            lines.append(f"- {url} (image, attached)")
        else:
            lines.append(f"- {url} (image could not be fetched: {result.error})")
    return Attachments("Attached files:\n" + "\n".join(lines), tuple(images))
