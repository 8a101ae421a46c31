"""The offline provider on its own: deterministic, and its reply shows everything the turn
carried, including the size and sha256 of each file it fetched over HTTP."""
from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from chat_ai.providers.base import ChatCall, ChatEntry, SummaryCall
from chat_ai.providers.offline import SUMMARY_MAX_CHARS, OfflineProvider
from devstack.servers import free_port

from .ai_helpers import Reply, StandIn


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


HISTORY = (
    ChatEntry("user", "What is the capital of France?"),
    ChatEntry("assistant", "Paris is the capital of France, and it has been for a very long time indeed."),
)


async def test_reply_states_every_input(client: httpx.AsyncClient) -> None:
    provider = OfflineProvider(client)
    call = ChatCall(
        model="gpt-4", message="And of Italy?", prompt="You are a geography tutor.",
        summary="The user studies European capitals.", history=HISTORY,
    )
    completion = await provider.chat(call, timeout=5)
    assert completion.text.splitlines() == [
        "Echo: And of Italy?",
        "Prompt: You are a geography tutor.",
        "History: 2 entries; last: assistant: Paris is the capital of France, and it has been for a very l",
        "Summary: The user studies European capitals.",
        "Files: (none)",
        "Model: gpt-4",
    ]
    # Words of prompt (5) + summary (5) + history (6 + 16) + message (3).
    assert completion.input_tokens == 35
    assert completion.output_tokens == len(completion.text.split())


async def test_empty_inputs_are_named(client: httpx.AsyncClient) -> None:
    completion = await OfflineProvider(client).chat(ChatCall(model="m", message="hi"), timeout=5)
    assert "Prompt: (none)" in completion.text.splitlines()
    assert "History: 0 entries" in completion.text.splitlines()
    assert "Summary: (none)" in completion.text.splitlines()


async def test_same_input_same_output_and_different_input_different_output(client: httpx.AsyncClient) -> None:
    provider = OfflineProvider(client)
    call = ChatCall(model="m", message="hello", prompt="p", summary="s", history=HISTORY)
    first = await provider.chat(call, timeout=5)
    assert await provider.chat(call, timeout=5) == first
    other = await provider.chat(ChatCall(model="m", message="hello", prompt="p", summary="s"), timeout=5)
    assert other.text != first.text


async def test_files_are_fetched_and_hashed(
    client: httpx.AsyncClient, file_host: Callable[[dict[str, Reply]], StandIn]
) -> None:
    content = bytes(range(256)) * 1000
    host = file_host({"/uploads/data.bin": Reply(200, content)})
    missing = f"{host.url}/uploads/gone.txt"
    provider = OfflineProvider(client)
    completion = await provider.chat(
        ChatCall(model="m", message="look", files=(f"{host.url}/uploads/data.bin", missing)), timeout=5
    )
    lines = completion.text.splitlines()
    assert "Files: 2" in lines
    assert f"- {host.url}/uploads/data.bin: fetched {len(content)} bytes sha256 {hashlib.sha256(content).hexdigest()}" in lines
    assert f"- {missing}: unreachable (HTTP 404)" in lines
    # Fetched concurrently, so in either order; each exactly once.
    assert sorted((r.method, r.path) for r in host.requests) == [("GET", "/uploads/data.bin"), ("GET", "/uploads/gone.txt")]


async def test_unreachable_and_oversized_files(
    client: httpx.AsyncClient, file_host: Callable[[dict[str, Reply]], StandIn]
) -> None:
    host = file_host({"/big": Reply(200, b"x" * 2048), "/slow": Reply(200, b"late", delay=2)})
    closed = f"http://127.0.0.1:{free_port()}/nothing-listens"
    provider = OfflineProvider(client, fetch_timeout=0.5, fetch_max_bytes=1024)
    completion = await provider.chat(
        ChatCall(model="m", message="x", files=(f"{host.url}/big", f"{host.url}/slow", closed, "ftp://host/file")),
        timeout=5,
    )
    lines = completion.text.splitlines()
    assert f"- {host.url}/big: unreachable (larger than 1024 bytes)" in lines
    assert f"- {host.url}/slow: unreachable (timed out after 0.5s)" in lines
    assert any(line.startswith(f"- {closed}: unreachable (ConnectError") for line in lines), lines
    assert "- ftp://host/file: unreachable (not an http(s) URL)" in lines


async def test_summarize_folds_entries_after_the_previous_summary(client: httpx.AsyncClient) -> None:
    provider = OfflineProvider(client)
    long_answer = "word " * 100
    completion = await provider.summarize(
        SummaryCall(
            model="m", previous_summary="user: earlier question\nassistant: earlier answer",
            entries=(ChatEntry("user", "second\nquestion"), ChatEntry("assistant", long_answer)),
        ),
        timeout=5,
    )
    assert completion.text.splitlines() == [
        "user: earlier question",
        "assistant: earlier answer",
        "user: second question",
        "assistant: " + long_answer[:200] + "…",
    ]
    assert completion.input_tokens == 6 + 2 + 100
    again = await provider.summarize(
        SummaryCall(model="m", previous_summary="user: earlier question\nassistant: earlier answer",
                    entries=(ChatEntry("user", "second\nquestion"), ChatEntry("assistant", long_answer))),
        timeout=5,
    )
    assert again == completion


async def test_summary_stays_bounded_and_keeps_the_newest_entries(client: httpx.AsyncClient) -> None:
    provider = OfflineProvider(client)
    summary = ""
    for turn in range(300):
        completion = await provider.summarize(
            SummaryCall(model="m", previous_summary=summary,
                        entries=(ChatEntry("user", f"question {turn}"), ChatEntry("assistant", f"answer {turn}"))),
            timeout=5,
        )
        summary = completion.text
    assert len(summary) <= SUMMARY_MAX_CHARS
    lines = summary.splitlines()
    assert lines[0] == "(earlier conversation omitted)"
    assert lines.count("(earlier conversation omitted)") == 1
    assert lines[-2:] == ["user: question 299", "assistant: answer 299"]
    assert "user: question 0" not in lines
