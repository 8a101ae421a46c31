"""CPU the billing process spends per chat turn's billing calls (one reserve + one settle).

    python bench/billing_calls.py [--pairs 2000] [--concurrency 8] [--port-base 9150]

Starts its own PostgreSQL and ``python -m chat_billing`` (devstack, ports from --port-base),
creates one user per concurrent lane, then drives reserve + settle pairs shaped like the
gateway's (turn_id, idempotency_key, user_id) over HTTP. It prints the billing process's CPU
(utime + stime from /proc/PID/stat, so the client's own CPU is not counted) per pair, and
the same for a batch of already-settled turn charges (POST /v1/charges) when billing has it.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from devstack.servers import PostgresServer, ServiceProcess

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


async def run(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-billing-"))
    postgres = PostgresServer("postgres", args.port_base, work / "pg", durable=False).start()
    billing = None
    try:
        postgres.create_database("bench")
        token = "bench-token"
        env = {
            "DATABASE_URL": postgres.url("bench"),
            "SERVICE_TOKEN": token,
            "BILLING_HOST": "127.0.0.1",
            "BILLING_PORT": str(args.port_base + 1),
            "LOG_LEVEL": "WARNING",
        }
        subprocess.run([sys.executable, "-m", "chat_billing", "migrate"], env={**os.environ, **env}, check=True,
                       capture_output=True)
        billing = ServiceProcess("billing", args.port_base + 1, work / "billing", module="chat_billing", env=env)
        billing.start()
        assert billing.process is not None
        pid = billing.process.pid
        async with httpx.AsyncClient(
            base_url=billing.url, headers={"X-Service-Token": token}, timeout=60,
            limits=httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency),
        ) as http:
            users = []
            for index in range(args.concurrency):
                reply = await http.post("/v1/users", json={"username": f"bench-{index}", "models": [8],
                                                           "balance": 1000})
                reply.raise_for_status()
                users.append(reply.json()["user_id"])
            settled: list[dict] = []

            async def pair(user_id: str) -> None:
                turn = str(uuid.uuid4())
                reserved = await http.post("/v1/reservations", json={
                    "user_id": user_id, "model_id": 8, "input_tokens": 1000, "output_tokens": 500,
                    "turn_id": turn, "idempotency_key": f"reserve:{turn}", "ttl_seconds": 30,
                })
                reserved.raise_for_status()
                rid = reserved.json()["reservation_id"]
                done = await http.post(f"/v1/reservations/{rid}/settle", json={
                    "cost_nanos": 1_234_567, "idempotency_key": f"settle:{turn}", "user_id": user_id,
                    "turn_id": turn,
                })
                done.raise_for_status()
                settled.append({"user_id": user_id, "turn_id": turn, "reservation_id": rid})

            async def lane(user_id: str, count: int) -> None:
                for _ in range(count):
                    await pair(user_id)

            # warm up (imports, prepared statements, pools)
            await asyncio.gather(*(lane(u, 20) for u in users))
            per_lane = args.pairs // args.concurrency
            before, started = cpu_seconds(pid), time.perf_counter()
            await asyncio.gather(*(lane(u, per_lane) for u in users))
            cpu, wall = cpu_seconds(pid) - before, time.perf_counter() - started
            pairs = per_lane * args.concurrency
            print(f"reserve+settle pairs: {pairs}, concurrency {args.concurrency}")
            print(f"  billing CPU {cpu * 1000 / pairs:.2f} ms per pair; wall {wall:.1f} s "
                  f"({pairs / wall:.0f} pairs/s)")

            # The outbox worker's replay: every turn once more, already settled.
            probe = await http.post("/v1/charges", json={"items": []})
            if probe.status_code == 200:
                items = [{"key": f"turn:{s['turn_id']}", "kind": "turn", "user_id": s["user_id"],
                          "session_id": str(uuid.uuid4()), "turn_id": s["turn_id"], "cost_nanos": 1_234_567,
                          "reservation_id": s["reservation_id"]} for s in settled[-2000:]]
                # 40 items (~12 KB): chat_common.serve refuses a first read over 16 KiB as a too-large head.
                batches = [items[i:i + 40] for i in range(0, len(items), 40)]
                before = cpu_seconds(pid)
                for batch in batches:
                    reply = await http.post("/v1/charges", json={"items": batch})
                    reply.raise_for_status()
                    assert all(r["status"] == "already" for r in reply.json()["results"])
                cpu = cpu_seconds(pid) - before
                print(f"charges replay of {len(items)} settled turns in batches of 40: "
                      f"{cpu * 1000 / len(batches):.2f} ms CPU per batch, "
                      f"{cpu * 1e6 / len(items):.0f} us per item")
    finally:
        if billing is not None:
            billing.stop()
        postgres.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--port-base", type=int, default=9150)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
