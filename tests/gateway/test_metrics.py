"""/metrics on every service moves with real work: turns, AI calls, ledger rows, uploads."""
from __future__ import annotations

import urllib.request
import uuid

import httpx
from prometheus_client.parser import text_string_to_metric_families

from devstack.stack import Stack

from .conftest import assert_ok, connect, new_user


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        text = response.read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_turn_ledger_and_upload_metrics_move(stack: Stack) -> None:
    gateway, billing, files = stack.gateway_url, stack.url("billing"), stack.url("files")
    before = {name: scrape(url) for name, url in (("gateway", gateway), ("billing", billing), ("files", files))}
    user = new_user(stack)
    async with connect(stack.ws_url) as client:
        first = assert_ok(await client.chat(user, "NEW", "counting turns for metrics"), 3)
        assert_ok(await client.chat(user, first["session_id"], "and a second one"), 3)
        refused = await client.chat(str(uuid.uuid4()), "NEW", "nobody")
        assert refused["code"] == 3
    async with httpx.AsyncClient() as http:
        reply = await http.post(f"{gateway}/upload", data={"user_id": user, "session_id": "NEW",
                                                           "model_name": "llama3.1:8b", "session_prompt": ""},
                                files={"file": ("note.txt", b"twelve bytes", "text/plain")})
        assert reply.status_code == 202, reply.text
    after = {name: scrape(url) for name, url in (("gateway", gateway), ("billing", billing), ("files", files))}

    def moved(service: str, name: str, **labels: str) -> float:
        return value(after[service], name, **labels) - value(before[service], name, **labels)

    assert moved("gateway", "chat_turns_total", outcome="ok") == 2
    assert moved("gateway", "chat_errors_total", code="3") >= 1
    assert moved("gateway", "chat_turn_seconds_count") >= 3
    assert moved("gateway", "chat_ai_seconds_count", rpc="process") == 2
    assert moved("billing", "billing_ledger_operations_total", kind="reserve") >= 2
    assert moved("billing", "billing_ledger_operations_total", kind="settle") >= 2
    assert moved("billing", "billing_ledger_operations_total", kind="credit") >= 1  # the new user's balance
    assert moved("files", "files_uploaded_bytes_total") == len(b"twelve bytes")
    assert "chat_open_sockets" in {name for name, _ in after["gateway"]}
