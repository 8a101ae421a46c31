"""What every provider shares: the call and result types, the error type that carries its gRPC
status, parsing of the chat JSON the gateway sends, and the progressive-summary prompt."""
from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

# Beyond this many attachments a request is refused: each one may be fetched (up to the size
# cap), and only the gateway, which attaches at most one file per turn, calls this service.
MAX_FILES_PER_CALL = 16


class AIError(Exception):
    """A failure with the gRPC status it is answered with.

    ``expected`` failures (bad input, a provider saying no) are logged as one line without a
    traceback; they say nothing about a bug in this service.
    """

    def __init__(self, code: grpc.StatusCode, message: str, *, expected: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.expected = expected


def invalid_argument(message: str) -> AIError:
    return AIError(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclass(frozen=True)
class ChatEntry:
    role: str
    content: str


@dataclass(frozen=True)
class ChatCall:
    model: str
    message: str
    prompt: str = ""
    summary: str = ""
    history: tuple[ChatEntry, ...] = ()
    files: tuple[str, ...] = ()
    # At most this many output tokens (the request's max_output_tokens); None: no limit of ours.
    max_output_tokens: int | None = None


@dataclass(frozen=True)
class SummaryCall:
    model: str
    previous_summary: str = ""
    entries: tuple[ChatEntry, ...] = ()


@dataclass(frozen=True)
class Completion:
    text: str
    # As reported by the provider; 0 when it reports nothing (the call is then not billed).
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass(frozen=True)
class Piece:
    """One streamed delta. Token counts are cumulative for the call so far; 0 when the provider
    has not reported them (yet): most report usage only at the end."""

    delta: str
    input_tokens: int = 0
    output_tokens: int = 0


class Provider(Protocol):
    name: str

    def stream(self, call: ChatCall, timeout: float) -> AsyncGenerator[Piece, None]:
        """Answer ``call`` delta by delta; closing the iterator stops the upstream request."""
        ...

    async def chat(self, call: ChatCall, timeout: float) -> Completion:
        """Answer ``call`` within ``timeout`` seconds or raise :class:`AIError`."""
        ...

    async def summarize(self, call: SummaryCall, timeout: float) -> Completion:
        """Fold ``call.entries`` into ``call.previous_summary`` or raise :class:`AIError`."""
        ...


def parse_entries(raw: str, field_name: str) -> tuple[ChatEntry, ...]:
    """A JSON array of ``{role, content}`` objects; "" and ``null`` mean no entries.

    Extra keys are ignored (the sessions service may add ids or timestamps).
    """
    if raw.strip() == "":
        return ()
    try:
        value: Any = json.loads(raw)
    except ValueError as exc:
        raise invalid_argument(f"{field_name} is not valid JSON: {exc}") from None
    if value is None:
        return ()
    if not isinstance(value, list):
        raise invalid_argument(f"{field_name} must be a JSON array of {{role, content}} objects")
    entries: list[ChatEntry] = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise invalid_argument(f"{field_name}[{index}] must be an object with role and content")
        role, content = item.get("role"), item.get("content", "")
        if content is None:
            content = ""
        if not isinstance(role, str) or not role.strip():
            raise invalid_argument(f"{field_name}[{index}].role must be a non-empty string")
        if not isinstance(content, str):
            raise invalid_argument(f"{field_name}[{index}].content must be a string")
        entries.append(ChatEntry(role.strip(), content))
    return tuple(entries)


def count_tokens(*texts: str) -> int:
    """Whitespace-separated words: the offline provider's deterministic stand-in for tokens."""
    return sum(len(text.split()) for text in texts)


def one_line(text: str, limit: int, ellipsis: str = "") -> str:
    """The first ``limit`` characters of ``text`` with line breaks turned into spaces."""
    cut = text[:limit]
    flat = cut.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
    return flat + (ellipsis if len(text) > limit else "")


def system_text(prompt: str, summary: str) -> str:
    """The system message: the session prompt, then the running summary of older turns."""
    parts = []
    if prompt.strip():
        parts.append(prompt.strip())
    if summary.strip():
        parts.append("Summary of the earlier conversation:\n" + summary.strip())
    return "\n\n".join(parts)


def history_messages(history: tuple[ChatEntry, ...]) -> list[dict[str, str]]:
    """History in chat-completions form. ``file`` entries (a stored file name placed after the
    turn that carried it) are not a role the APIs know, so they become a short user note."""
    messages: list[dict[str, str]] = []
    for entry in history:
        if entry.role in ("user", "assistant", "system"):
            messages.append({"role": entry.role, "content": entry.content})
        elif entry.role == "file":
            messages.append({"role": "user", "content": f"[attached file: {entry.content}]"})
        else:
            messages.append({"role": "user", "content": f"{entry.role}: {entry.content}"})
    return messages


SUMMARY_INSTRUCTIONS = (
    "You maintain the running summary of a conversation between a user and an AI assistant. "
    "Progressively summarize the new lines of conversation, adding onto the current summary, "
    "and return the new summary. Keep names, facts, decisions, numbers and open questions; "
    "drop pleasantries. Write in the language of the conversation. Reply with the summary only."
)


def summary_messages(call: SummaryCall) -> list[dict[str, str]]:
    lines = "\n".join(f"{entry.role}: {entry.content}" for entry in call.entries) or "(none)"
    previous = call.previous_summary.strip() or "(none)"
    return [
        {"role": "system", "content": SUMMARY_INSTRUCTIONS},
        {
            "role": "user",
            "content": f"Current summary:\n{previous}\n\nNew lines of conversation:\n{lines}\n\nNew summary:",
        },
    ]
