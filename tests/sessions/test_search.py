"""GET /v1/search: full-text search over one user's entries (docs/protocol.md, "Extensions" (search)), on a
real PostgreSQL: findable in the append's transaction, stemmed, case-insensitive, owner-scoped,
ranked, never a query language."""
from __future__ import annotations

from typing import Any

from litestar.testing import AsyncTestClient

from chat_sessions.sessions.search import searchable_words

from .conftest import append_turn, create_session, new_id


async def search(client: AsyncTestClient, user_id: str, query: str, **params: Any) -> list[dict[str, Any]]:
    response = await client.get("/v1/search", params={"user_id": user_id, "query": query, **params})
    assert response.status_code == 200, response.text
    return response.json()["items"]


def turn(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


async def test_found_at_once_stemmed_and_case_insensitive(client: AsyncTestClient) -> None:
    user = new_id()
    session = await create_session(client, user, name="invoices")
    await append_turn(client, session["session_id"], user, entries=turn("Where is my PAYMENT?", "It was sent on Monday."))
    hits = await search(client, user, "payments")
    assert len(hits) == 1
    hit = hits[0]
    assert hit["session_id"] == session["session_id"] and hit["session_name"] == "invoices"
    assert hit["seq"] == 0 and hit["role"] == "user"
    assert "Where is my PAYMENT" in hit["snippet"] and "<" not in hit["snippet"]
    assert hit["created_at"]
    # the assistant's entry is searchable too, and both words of a query must occur
    assert [h["seq"] for h in await search(client, user, "monday SENT")] == [1]
    assert await search(client, user, "monday payment") == []


async def test_only_the_owner_and_not_file_entries(client: AsyncTestClient) -> None:
    owner, other = new_id(), new_id()
    session = await create_session(client, owner)
    await append_turn(
        client, session["session_id"], owner,
        entries=[{"role": "file", "content": "giraffe.png"}, *turn("a giraffe question", "a giraffe answer")],
    )
    hits = await search(client, owner, "giraffe")
    assert sorted(h["role"] for h in hits) == ["assistant", "user"]
    assert await search(client, other, "giraffe") == []


async def test_ranked_best_first_and_limited(client: AsyncTestClient) -> None:
    user = new_id()
    session = await create_session(client, user)
    await append_turn(client, session["session_id"], user, entries=turn("one zebra", "nothing here"))
    await append_turn(client, session["session_id"], user, entries=turn("zebra zebra zebra, zebras everywhere", "ok"))
    hits = await search(client, user, "zebra")
    assert [h["seq"] for h in hits] == [2, 0]
    assert len(await search(client, user, "zebra", limit=1)) == 1
    for bad in (0, 101, "x"):
        response = await client.get("/v1/search", params={"user_id": user, "query": "zebra", "limit": bad})
        assert response.status_code == 400, (bad, response.text)


async def test_deleted_session_never_matches(client: AsyncTestClient) -> None:
    user = new_id()
    session = await create_session(client, user)
    await append_turn(client, session["session_id"], user, entries=turn("walrus facts", "walruses are big"))
    assert len(await search(client, user, "walrus")) == 2
    response = await client.delete(f"/v1/sessions/{session['session_id']}", params={"user_id": user})
    assert response.status_code == 204
    assert await search(client, user, "walrus") == []


async def test_hostile_queries_are_plain_text(client: AsyncTestClient) -> None:
    user = new_id()
    session = await create_session(client, user)
    await append_turn(client, session["session_id"], user, entries=turn("drop the table of otters", "otters!"))
    for query in (
        "'", '"', "\"otters", "otters'", "!otters", "otters & | ! <-> :* ()", "(otters", "-otters", "otters OR",
        "'; DROP TABLE entries; --", "\\", "%", "otters:*", "<2>", "\x00otters", "ünïcödé 😀 ✓ 中文",
        "a" * 10_000, "otters " * 2_000, "the", "...", "\u202e\u200b",
    ):
        response = await client.get("/v1/search", params={"user_id": user, "query": query})
        assert response.status_code == 200, (query[:40], response.text)
        assert isinstance(response.json()["items"], list)
    # quotes and NUL are read as the words in them
    assert len(await search(client, user, '"otters"')) == 2
    assert len(await search(client, user, "otte\x00rs")) == 2
    assert len(await search(client, user, "'; DROP TABLE; --")) == 1  # the words "drop" and "table"
    assert len(await search(client, user, "otters")) == 2  # nothing was dropped


async def test_empty_query_is_refused(client: AsyncTestClient) -> None:
    user = new_id()
    for query in ("", "   ", "\x00"):
        response = await client.get("/v1/search", params={"user_id": user, "query": query})
        assert response.status_code == 400, response.text
        assert "query" in response.text
    response = await client.get("/v1/search", params={"user_id": "nope", "query": "x"})
    assert response.status_code == 400


def test_searchable_words_keep_every_word_and_its_first_uses() -> None:
    text = "the cat  sat\n" + "cat " * 10 + "on the mat, the end"
    assert searchable_words(text) == "the cat sat cat cat on the mat, the end"
    assert searchable_words("the " * 5 + "end") == "the the the end"
    assert searchable_words("") == "" and searchable_words(" \n\t ") == ""


async def test_every_word_of_a_long_repetitive_reply_is_found(client: AsyncTestClient) -> None:
    user = new_id()
    session = await create_session(client, user)
    # a word first used after thousands of repeated ones, and a word used once among them
    answer = "walrus tusk " * 3000 + "narwhal " + "walrus tusk " * 3000 + "beluga"
    await append_turn(client, session["session_id"], user, entries=turn("tell me about whales", answer))
    for word in ("narwhal", "beluga", "walruses", "tusk", "whales"):
        assert len(await search(client, user, word)) == 1, word
    assert [h["role"] for h in await search(client, user, "narwhal beluga walrus")] == ["assistant"]
    hit = (await search(client, user, "narwhal"))[0]
    assert "narwhal" in hit["snippet"]  # the snippet comes from the stored text, not the words
