"""The session-name rule of docs/protocol.md, "A chat turn" (type 3, "NEW")."""
from __future__ import annotations

import pytest

from chat_gateway.chat.naming import session_name


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        # short messages are the name
        ("Hello there", "Hello there"),
        ("  padded  ", "padded"),
        # cut at the last space inside the first 20 characters
        ("What is the capital of France?", "What is the capital"),
        ("one two three four five six", "one two three four"),
        # no space in the first 20 characters: the original crashed; here the plain cut
        ("Supercalifragilisticexpialidocious", "Supercalifragilistic"),
        ("abcdefghijklmnopqrstuvwxyz and more", "abcdefghijklmnopqrst"),
        # exactly 20 characters: kept whole
        ("exactly twenty chars", "exactly twenty chars"),
        ("12345678901234567890", "12345678901234567890"),
        # a 21st character after 20 exact ones: the rule cuts at the last space inside 20
        ("exactly twenty chars!", "exactly twenty"),
        # characters, not bytes: 25 three-byte characters make a 20-character name
        ("漢" * 25, "漢" * 20),
        ("héllo wörld ünïcödé ëxträ", "héllo wörld ünïcödé"),
        ("😀" * 30, "😀" * 20),
        # newlines and tabs are whitespace: one line, single spaces
        ("first line\nsecond line here", "first line second"),
        ("tab\tseparated\twords that go on", "tab separated words"),
    ],
)
def test_session_name(message: str, expected: str) -> None:
    name = session_name(message)
    assert name == expected
    assert 0 < len(name) <= 20


@pytest.mark.parametrize("message", ["", "   ", "\n\t "])
def test_blank_message_has_no_name(message: str) -> None:
    with pytest.raises(ValueError):
        session_name(message)

