"""Any server speaking OpenAI's chat-completions API: OpenAI itself, vLLM, llama.cpp's server,
Ollama's ``/v1``. Tokens and so the cost come from the ``usage`` the server reports."""
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


class OpenAICompatProvider:
    name = "openai_compat"

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        base_url: str = "https://api.openai.com/v1",
        api_key: str = "",
        fetch_timeout: float = 10.0,
        image_max_bytes: int = 20 * 1024 * 1024,
    ) -> None:
        self._client = client
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._api_key = api_key
        self._fetch_timeout = fetch_timeout
        self._image_max_bytes = image_max_bytes

    async def chat(self, call: ChatCall, timeout: float) -> Completion:
        return await self._complete(
            call.model, await self._messages(call, timeout), timeout, max_tokens=call.max_output_tokens
        )

    async def _messages(self, call: ChatCall, timeout: float) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if system := system_text(call.prompt, call.summary):
            messages.append({"role": "system", "content": system})
        messages.extend(history_messages(call.history))
        messages.append(await self._user_message(call, timeout))
        return messages

    async def stream(self, call: ChatCall, timeout: float) -> AsyncGenerator[Piece, None]:
        """The API's streaming mode (server-sent events), asking for the usage report that comes
        in a last chunk without choices."""
        messages = await self._messages(call, timeout)
        body: dict[str, Any] = {
            "model": call.model, "messages": messages, "stream": True, "stream_options": {"include_usage": True},
        }
        if call.max_output_tokens is not None:
            body["max_tokens"] = call.max_output_tokens
        lines = post_lines(self._client, "openai", self._url, body, timeout=timeout, headers=self._headers())
        try:
            async for line in lines:
                if not line.startswith("data:"):
                    continue  # comments, event names, ids
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                data = parse_json_line("openai", payload)
                if isinstance(data.get("error"), dict):
                    raise AIError(grpc.StatusCode.UNAVAILABLE, f"openai stream failed: {str(data['error'].get('message'))[:300]}")
                raw_usage = data.get("usage")
                usage: dict[str, Any] = raw_usage if isinstance(raw_usage, dict) else {}
                delta = ""
                choices = data.get("choices")
                if isinstance(choices, list) and choices and isinstance(choices[0], dict):
                    part = choices[0].get("delta")
                    if isinstance(part, dict):
                        delta = _content_text(part.get("content"))
                if delta or usage:
                    yield Piece(delta, token_count(usage.get("prompt_tokens")), token_count(usage.get("completion_tokens")))
        finally:
            await lines.aclose()

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    async def summarize(self, call: SummaryCall, timeout: float) -> Completion:
        return await self._complete(call.model, summary_messages(call), timeout)

    async def _user_message(self, call: ChatCall, timeout: float) -> dict[str, Any]:
        attachments = await prepare_attachments(
            self._client, call.files, timeout=min(self._fetch_timeout, timeout), max_image_bytes=self._image_max_bytes
        )
        text = f"{call.message}\n\n{attachments.text}" if attachments.text else call.message
        if not attachments.images:
            return {"role": "user", "content": text}
        parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
        for mime, data in attachments.images:
            data_url = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
            parts.append({"type": "image_url", "image_url": {"url": data_url}})
        return {"role": "user", "content": parts}

    async def _complete(
        self, model: str, messages: list[dict[str, Any]], timeout: float, *, max_tokens: int | None = None
    ) -> Completion:
        headers = self._headers()
        body: dict[str, Any] = {"model": model, "messages": messages}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens  # the turn's balance-aware cap (ChatCall.max_output_tokens)
        data = await post_json(self._client, "openai", self._url, body, timeout=timeout, headers=headers)
        try:
            message = data["choices"][0]["message"]
        except (KeyError, IndexError, TypeError):
            raise AIError(grpc.StatusCode.UNAVAILABLE, "openai answered without choices[0].message") from None
        raw_usage = data.get("usage")
        usage: dict[str, Any] = raw_usage if isinstance(raw_usage, dict) else {}
        return Completion(
            _content_text(message.get("content") if isinstance(message, dict) else None),
            token_count(usage.get("prompt_tokens")),
            token_count(usage.get("completion_tokens")),
        )


def _content_text(content: object) -> str:
    """``content`` is a string, or (some servers) a list of typed parts, or null (a refusal)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part.get("text", "") for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""
