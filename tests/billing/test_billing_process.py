"""Billing as it is deployed: ``python -m chat_billing`` under uvicorn, real concurrent HTTP
clients, and the ``chat-admin`` CLI against it."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from chat_billing import cli
from chat_common.app import SERVICE_TOKEN_HEADER
from devstack.servers import ServiceProcess, free_port

from .conftest import assert_ledger_explains

LLAMA_1K_EACH_NANOS = 3_500_000


@pytest.fixture(scope="module")
def billing_env(fresh_database: str, service_token: str) -> dict[str, str]:
    return {
        "DATABASE_URL": fresh_database,
        "SERVICE_TOKEN": service_token,
        "BILLING_HOST": "127.0.0.1",
        "BILLING_PORT": str(free_port()),
        "RESERVATION_SWEEP_SECONDS": "1",
        "LOG_LEVEL": "INFO",
    }


@pytest.fixture(scope="module")
def billing_process(billing_env: dict[str, str], work_dir: Path) -> Iterator[ServiceProcess]:
    migrate = [sys.executable, "-m", "chat_billing", "migrate"]
    result = subprocess.run(migrate, env={**os.environ, **billing_env}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "migrations up to date" in result.stdout
    # The server migrates again on start (MIGRATE_ON_START defaults to true) and finds nothing to do.
    port = int(billing_env["BILLING_PORT"])
    server = ServiceProcess("billing", port, work_dir / f"billing-{port}", module="chat_billing", env=billing_env)
    server.start()
    yield server
    server.stop()
    log = server.log_path.read_text(errors="replace")
    assert "Traceback" not in log
    levels = [json.loads(line).get("level") for line in log.splitlines() if line.startswith("{")]
    assert "error" not in levels and "critical" not in levels


@pytest.fixture(scope="module")
async def http(billing_process: ServiceProcess, service_token: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=billing_process.url, headers={SERVICE_TOKEN_HEADER: service_token}, timeout=60
    ) as client:
        yield client


@pytest.fixture(scope="module")
async def http_pool(billing_process: ServiceProcess, service_token: str) -> AsyncIterator[list[httpx.AsyncClient]]:
    """200 connections in all. Spread over several clients because one httpx client's CPU cost
    per request grows with its pool size, and on a small machine that would be the bottleneck."""
    clients = [
        httpx.AsyncClient(
            base_url=billing_process.url, headers={SERVICE_TOKEN_HEADER: service_token}, timeout=60,
            limits=httpx.Limits(max_connections=25, max_keepalive_connections=25),
        )
        for _ in range(8)
    ]
    yield clients
    for client in clients:
        await client.aclose()


async def test_200_concurrent_reserve_settle_pairs_against_the_running_service(
    http: httpx.AsyncClient, http_pool: list[httpx.AsyncClient]
) -> None:
    initial = 500_000_000  # about 140 holds at once, and less than the total cost the pairs ask for
    created = await http.post("/v1/users", json={"username": "busy", "models": [8], "balance": 0.5})
    assert created.status_code == 201, created.text
    user_id = created.json()["user_id"]
    refused = 0

    async def pair(index: int) -> dict[str, Any] | None:
        nonlocal refused
        client = http_pool[index % len(http_pool)]
        reserved = await client.post(
            "/v1/reservations",
            json={"user_id": user_id, "model_id": 8, "input_tokens": 1000, "output_tokens": 1000,
                  "idempotency_key": f"reserve:{index}", "turn_id": f"turn-{index}"},
        )
        if reserved.status_code == 402:
            refused += 1
            return None
        assert reserved.status_code == 201, reserved.text
        cost = LLAMA_1K_EACH_NANOS * (index % 4) // 2  # 0, half, all, and one and a half times the hold
        settled = await client.post(
            f"/v1/reservations/{reserved.json()['reservation_id']}/settle",
            json={"cost_nanos": cost, "idempotency_key": f"settle:{index}", "user_id": user_id},
        )
        assert settled.status_code == 200, settled.text
        return settled.json()

    results = await asyncio.gather(*(pair(i) for i in range(200)))
    settled = [r for r in results if r is not None]
    assert len(settled) + refused == 200
    assert len(settled) > 100

    charged = sum(r["charged_nanos"] for r in settled)
    assert all(r["charged_nanos"] + r["shortfall_nanos"] == r["cost_nanos"] for r in settled)
    balance = (await http.get(f"/v1/users/{user_id}/balance")).json()
    assert balance["balance_nanos"] == initial - charged >= 0
    assert balance["reserved_nanos"] == 0

    page = (await http.get(f"/v1/users/{user_id}/ledger", params={"limit": 500})).json()
    assert page["total"] == len(page["items"]) == 1 + 2 * len(settled)
    rows = list(reversed(page["items"]))
    assert_ledger_explains(rows, balance["balance_nanos"])
    for row in rows:
        if row["kind"] == "settle" and row["shortfall_nanos"] > 0:
            assert row["balance_after_nanos"] == 0


async def test_settles_releases_and_the_sweep_racing_on_one_user(
    http: httpx.AsyncClient, http_pool: list[httpx.AsyncClient]
) -> None:
    """A third of the turns outlive their one-second reservation, so the sweep (every second
    here) releases them while other turns settle and release; late settles still charge."""
    created = await http.post("/v1/users", json={"username": "mixed", "models": [8], "balance": 1})
    user_id = created.json()["user_id"]

    async def turn(index: int) -> dict[str, Any]:
        client = http_pool[index % len(http_pool)]
        slow = index % 3 == 0
        reserved = await client.post(
            "/v1/reservations",
            json={"user_id": user_id, "model_id": 8, "input_tokens": 1000, "output_tokens": 1000,
                  "ttl_seconds": 1 if slow else 60, "idempotency_key": f"mixed-reserve:{index}"},
        )
        assert reserved.status_code == 201, reserved.text
        rid = reserved.json()["reservation_id"]
        if slow:
            await asyncio.sleep(1.0 + (index % 5) / 5)
        if index % 3 == 1:
            action, body = "release", {"idempotency_key": f"mixed-release:{index}", "user_id": user_id}
        else:
            action, body = "settle", {"cost_nanos": 2_000_000, "idempotency_key": f"mixed-settle:{index}"}
        reply = await client.post(f"/v1/reservations/{rid}/{action}", json=body)
        assert reply.status_code == 200, reply.text
        return reply.json()

    results = await asyncio.gather(*(turn(i) for i in range(90)))
    assert sum(1 for r in results if r["status"] == "released") == 30
    assert all(r["charged_nanos"] == 2_000_000 for r in results if r["status"] == "settled")
    balance = (await http.get(f"/v1/users/{user_id}/balance")).json()
    assert balance["balance_nanos"] == 1_000_000_000 - 60 * 2_000_000
    assert balance["reserved_nanos"] == 0
    page = (await http.get(f"/v1/users/{user_id}/ledger", params={"limit": 500})).json()
    rows = list(reversed(page["items"]))
    assert_ledger_explains(rows, balance["balance_nanos"])
    expired = [row for row in rows if row["kind"] == "release" and row["reason"] == "expired"]
    late = [row for row in rows if row["kind"] == "settle" and row["reason"]]
    assert len(expired) == len(late) > 0  # every slow turn the sweep released was settled later


async def test_one_idempotency_key_sent_concurrently_applies_once(http: httpx.AsyncClient) -> None:
    created = await http.post("/v1/users", json={"username": "racer", "models": [], "balance": 0})
    user_id = created.json()["user_id"]
    body = {"amount_nanos": 7_000, "idempotency_key": f"top-up:{uuid.uuid4()}"}
    replies = await asyncio.gather(*(http.post(f"/v1/users/{user_id}/credit", json=body) for _ in range(30)))
    assert {r.status_code for r in replies} == {200}
    assert len({r.content for r in replies}) == 1
    balance = (await http.get(f"/v1/users/{user_id}/balance")).json()
    assert balance["balance_nanos"] == 7_000
    assert (await http.get(f"/v1/users/{user_id}/ledger")).json()["total"] == 1


async def test_health_ready_and_the_token(billing_process: ServiceProcess, service_token: str) -> None:
    async with httpx.AsyncClient(base_url=billing_process.url) as anonymous:
        assert (await anonymous.get("/health")).status_code == 200
        ready = await anonymous.get("/ready")
        assert ready.status_code == 200
        assert ready.json()["checks"] == {"database": "ok"}
        assert (await anonymous.get("/v1/models")).status_code == 401
        wrong = await anonymous.get("/v1/models", headers={SERVICE_TOKEN_HEADER: service_token + "x"})
        assert wrong.status_code == 401
        assert wrong.json()["error"]["code"] == "unauthorized"


async def run_cli(
    args: list[str], billing_env: dict[str, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[int, Any]:
    """``main`` runs its own event loop, so it gets a thread of its own."""
    monkeypatch.setenv("SERVICE_TOKEN", billing_env["SERVICE_TOKEN"])
    monkeypatch.setenv("BILLING_URL", f"http://127.0.0.1:{billing_env['BILLING_PORT']}")
    capsys.readouterr()
    code = await asyncio.to_thread(cli.main, args)
    out, err = capsys.readouterr()
    return code, json.loads(out if code == 0 else err)


async def test_cli_entry_point_creates_the_demo_user(
    billing_process: ServiceProcess,
    billing_env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    demo_id = str(uuid.uuid4())
    args = ["create-user", "--username", "demo", "--models", "4,5,8", "--balance", "1", "--user-id", demo_id]
    env = {**os.environ, "SERVICE_TOKEN": billing_env["SERVICE_TOKEN"], "BILLING_URL": billing_process.url}
    result = subprocess.run(
        [sys.executable, "-m", "chat_billing.cli", *args], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    user = json.loads(result.stdout)
    assert (user["user_id"], user["models"], user["balance"]) == (demo_id, [4, 5, 8], 1.0)

    # Every start of a dev stack may run this again: the demo user is not topped up twice.
    code, again = await run_cli(args, billing_env, capsys, monkeypatch)
    assert code == 0 and again == user
    code, ledger = await run_cli(["ledger", "--user-id", demo_id], billing_env, capsys, monkeypatch)
    assert code == 0 and ledger["total"] == 1

    monkeypatch.setenv("SERVICE_TOKEN", "wrong")
    capsys.readouterr()
    assert await asyncio.to_thread(cli.main, ["models"]) == 1
    assert json.loads(capsys.readouterr().err)["error"]["code"] == "unauthorized"


async def test_cli_commands(
    billing_process: ServiceProcess,
    billing_env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def admin(*args: str) -> tuple[int, Any]:
        return await run_cli(list(args), billing_env, capsys, monkeypatch)

    code, user = await admin("create-user", "--username", "cli-user", "--models", "8", "--balance", "0.10")
    assert code == 0 and user["balance_nanos"] == 100_000_000
    user_id = user["user_id"]

    code, entry = await admin("top-up", "--user-id", user_id, "--amount", "0.000000001", "--reason", "one nano")
    assert code == 0
    assert (entry["kind"], entry["amount_nanos"], entry["balance_after_nanos"]) == ("credit", 1, 100_000_001)
    code, entry = await admin("debit", "--user-id", user_id, "--amount", "0.1")
    assert code == 0 and entry["balance_after_nanos"] == 1

    code, granted = await admin("grant", "--user-id", user_id, "--models", "4,6")
    assert code == 0 and granted["models"] == [4, 6, 8]
    code, revoked = await admin("revoke", "--user-id", user_id, "--models", "6")
    assert code == 0 and revoked["models"] == [4, 8]

    code, ledger = await admin("ledger", "--user-id", user_id, "--limit", "2")
    assert code == 0
    assert [row["kind"] for row in ledger["items"]] == ["debit", "credit"]
    assert (ledger["total"], ledger["limit"]) == (3, 2)
    code, balance = await admin("balance", "--user-id", user_id)
    assert code == 0 and balance["balance_nanos"] == 1

    code, model = await admin(
        "set-model", "--model-id", "77", "--name", "cli-model", "--provider", "ollama",
        "--context-length", "8192", "--input-price", "0.0001", "--output-price", "0.0002",
    )
    assert code == 0 and model["input_price_nanos_per_1k"] == 100_000
    code, catalogue = await admin("models")
    assert code == 0 and "cli-model" in [m["name"] for m in catalogue["models"]]

    code, error = await admin("debit", "--user-id", user_id, "--amount", "5")
    assert code == 1 and error["error"]["code"] == "insufficient_balance"
    code, error = await admin("user", "--user-id", str(uuid.uuid4()))
    assert code == 1 and error["error"]["code"] == "not_found"
