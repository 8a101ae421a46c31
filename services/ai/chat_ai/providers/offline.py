"""The offline provider: no model, no network except fetching the turn's files. Its reply states,
one fact per line, what the turn carried, so a test anywhere in the system can prove that the
prompt, history, summary, message and files reached the AI service. Same input, same output.
A call with ``max_output_tokens`` gets the first that many tokens (words) of that reply."""
from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator

import httpx

from chat_ai.providers.base import (
    ChatCall,
    Completion,
    Piece,
    SummaryCall,
    count_tokens,
    one_line,
)
from chat_ai.providers.transport import fetch_file

HISTORY_PREVIEW_CHARS = 60
SUMMARY_ENTRY_CHARS = 200
# The folded summary grows by one line per entry; past this it drops its oldest lines so a
# long-running session does not carry an ever larger summary into every turn.
SUMMARY_MAX_CHARS = 8000
_WORDS = re.compile(r"\S+\s*|\s+")
OMITTED_MARKER = "(earlier conversation omitted)"


class OfflineProvider:
    name = "offline"

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        fetch_timeout: float = 10.0,
        fetch_max_bytes: int = 50 * 1024 * 1024,
        stream_delay_ms: float = 0.0,
    ) -> None:
        self._stream_delay = max(0.0, stream_delay_ms) / 1000
        self._client = client
        self._fetch_timeout = fetch_timeout
        self._fetch_max_bytes = fetch_max_bytes

    async def chat(self, call: ChatCall, timeout: float) -> Completion:
        fetch_timeout = min(self._fetch_timeout, timeout)
        fetched = await asyncio.gather(*(
            fetch_file(self._client, url, timeout=fetch_timeout, max_bytes=self._fetch_max_bytes)
            for url in call.files
        ))
        lines = [
            f"Echo: {call.message}",
            f"Prompt: {call.prompt or '(none)'}",
            _history_line(call),
            f"Summary: {call.summary or '(none)'}",
        ]
        if fetched:
            lines.append(f"Files: {len(fetched)}")
            lines.extend(f"- {result.describe()}" for result in fetched)
        else:
            lines.append("Files: (none)")
        lines.append(f"Model: {call.model}")
        text = "\n".join(lines)
        if call.max_output_tokens is not None:
            text = first_tokens(text, call.max_output_tokens)
        input_tokens = count_tokens(
            call.prompt, call.summary, *(entry.content for entry in call.history), call.message, *call.files
        )
        return Completion(text, input_tokens, count_tokens(text))

    async def stream(self, call: ChatCall, timeout: float) -> AsyncGenerator[Piece, None]:
        """The same reply as :meth:`chat`, one word (with the whitespace after it) per delta,
        each after ``OFFLINE_STREAM_DELAY_MS``; usage is reported with every delta."""
        completion = await self.chat(call, timeout)
        produced = 0
        for word in _WORDS.findall(completion.text):
            if self._stream_delay:
                await asyncio.sleep(self._stream_delay)
            produced += count_tokens(word)
            yield Piece(word, completion.input_tokens, produced)

    async def summarize(self, call: SummaryCall, timeout: float) -> Completion:
        lines = call.previous_summary.strip().splitlines() if call.previous_summary.strip() else []
        lines.extend(
            f"{entry.role}: {one_line(entry.content, SUMMARY_ENTRY_CHARS, '…')}" for entry in call.entries
        )
        text = _cap(lines)
        input_tokens = count_tokens(call.previous_summary, *(entry.content for entry in call.entries))
        return Completion(text, input_tokens, count_tokens(text))


def first_tokens(text: str, limit: int) -> str:
    """``text`` cut after its first ``limit`` tokens (words, as :func:`count_tokens` counts
    them), with the whitespace that followed the last one dropped."""
    if count_tokens(text) <= limit:
        return text
    kept: list[str] = []
    seen = 0
    for piece in _WORDS.findall(text):
        seen += count_tokens(piece)
        if seen > limit:
            break
        kept.append(piece)
    return "".join(kept).rstrip()


def _history_line(call: ChatCall) -> str:
    count = len(call.history)
    if count == 0:
        return "History: 0 entries"
    last = call.history[-1]
    return f"History: {count} entries; last: {last.role}: {one_line(last.content, HISTORY_PREVIEW_CHARS)}"


def _cap(lines: list[str]) -> str:
    text = "\n".join(lines)
    if len(text) <= SUMMARY_MAX_CHARS:
        return text
    kept = [line for line in lines if line != OMITTED_MARKER]
    budget = SUMMARY_MAX_CHARS - len(OMITTED_MARKER) - 1
    while kept and len("\n".join(kept)) > budget:
        kept.pop(0)
    return "\n".join([OMITTED_MARKER, *kept])
