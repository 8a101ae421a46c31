"""The name a new session gets from its first message (docs/protocol.md, "A chat turn (type 3)")."""
from __future__ import annotations

MAX_NAME_CHARS = 20


def session_name(message: str, limit: int = MAX_NAME_CHARS) -> str:
    """The message cut to at most ``limit`` characters, at the last space inside the first
    ``limit`` when there is one, else simply the first ``limit`` characters.

    Whitespace runs (newlines, tabs) collapse to one space first so a name is one line. Lengths
    are in characters (code points), not bytes, so a multi-byte message is never split inside a
    character. The original crashed on a message without a space; here that is the plain cut.
    """
    text = " ".join(message.split())
    if not text:
        raise ValueError("a session name needs a non-blank message")
    if len(text) <= limit:
        return text
    head = text[:limit]
    cut = head.rfind(" ")
    # text has no leading space, so a found space is past index 0 and the name is never empty
    return head[:cut] if cut > 0 else head
