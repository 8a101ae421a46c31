"""Ollama's native API (``POST /api/chat``; streamed as NDJSON for ``ProcessStream``). Tokens come from ``prompt_eval_count``
and ``eval_count``."""
from __future__ import annotations

import base64
from collections.abc import AsyncGenerator
from typing import Any

import grpc
import httpx

from chat_ai.providers.base import (
    AIError,
    ChatCall,
    Completion,
    Piece,
    SummaryCall,
    history_messages,
    summary_messages,
    system_text,
)
from chat_ai.providers.transport import (
    parse_json_line,
    post_json,
    post_lines,
    prepare_attachments,
    token_count,
)


class OllamaProvider:
    name = "ollama"

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        base_url: str = "http://127.0.0.1:11434",
        fetch_timeout: float = 10.0,
        image_max_bytes: int = 20 * 1024 * 1024,
    ) -> None:
        self._client = client
        self._url = base_url.rstrip("/") + "/api/chat"
        self._fetch_timeout = fetch_timeout
        self._image_max_bytes = image_max_bytes

    async def chat(self, call: ChatCall, timeout: float) -> Completion:
        return await self._complete(
            call.model, await self._messages(call, timeout), timeout, num_predict=call.max_output_tokens
        )

    async def stream(self, call: ChatCall, timeout: float) -> AsyncGenerator[Piece, None]:
        """``"stream": true``: one JSON object per line, the last with ``done`` and the counts."""
        body: dict[str, Any] = {"model": call.model, "messages": await self._messages(call, timeout), "stream": True}
        if call.max_output_tokens is not None:
            body["options"] = {"num_predict": call.max_output_tokens}
        lines = post_lines(self._client, "ollama", self._url, body, timeout=timeout)
        try:
            async for line in lines:
                data = parse_json_line("ollama", line)
                if isinstance(data.get("error"), str):
                    raise AIError(grpc.StatusCode.UNAVAILABLE, f"ollama stream failed: {data['error'][:300]}")
                message = data.get("message")
                delta = message.get("content") if isinstance(message, dict) else None
                delta = delta if isinstance(delta, str) else ""
                if data.get("done"):
                    yield Piece(delta, token_count(data.get("prompt_eval_count")), token_count(data.get("eval_count")))
                    break
                if delta:
                    yield Piece(delta)
        finally:
            await lines.aclose()

    async def _messages(self, call: ChatCall, timeout: float) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if system := system_text(call.prompt, call.summary):
            messages.append({"role": "system", "content": system})
        messages.extend(history_messages(call.history))
        attachments = await prepare_attachments(
            self._client, call.files, timeout=min(self._fetch_timeout, timeout), max_image_bytes=self._image_max_bytes
        )
        user: dict[str, Any] = {
            "role": "user",
            "content": f"{call.message}\n\n{attachments.text}" if attachments.text else call.message,
        }
        if attachments.images:
            user["images"] = [base64.b64encode(data).decode("ascii") for _, data in attachments.images]
        messages.append(user)
        return messages

    async def summarize(self, call: SummaryCall, timeout: float) -> Completion:
        return await self._complete(call.model, summary_messages(call), timeout)

    async def _complete(
        self, model: str, messages: list[dict[str, Any]], timeout: float, *, num_predict: int | None = None
    ) -> Completion:
        body: dict[str, Any] = {"model": model, "messages": messages, "stream": False}
        if num_predict is not None:
            body["options"] = {"num_predict": num_predict}  # the turn's balance-aware cap
        data = await post_json(self._client, "ollama", self._url, body, timeout=timeout)
        message = data.get("message")
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise AIError(grpc.StatusCode.UNAVAILABLE, "ollama answered without message.content")
        return Completion(
            message["content"], token_count(data.get("prompt_eval_count")), token_count(data.get("eval_count"))
        )
