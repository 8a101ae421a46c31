"""What an entry's search vector is made from (migration 0009): the entry's words in order, each
distinct word kept at its first ``USES_KEPT`` uses. PostgreSQL's parser costs about 0.1 us per
character and a long reply repeats itself, so this is most of a turn's database CPU saved,
while every word stays findable and how often it occurs (up to the cap) still ranks."""
from __future__ import annotations

# ts_rank grows with a word's frequency by a logarithm: past three uses it hardly moves.
USES_KEPT = 3
SEARCHED_ROLES = frozenset({"user", "assistant"})


def searchable_words(content: str) -> str:
    uses: dict[str, int] = {}
    kept: list[str] = []
    for word in content.split():
        seen = uses.get(word, 0)
        if seen < USES_KEPT:
            uses[word] = seen + 1
            kept.append(word)
    return " ".join(kept)
