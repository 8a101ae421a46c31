"""CPU the sessions process spends per call, read from /proc/PID/stat (utime + stime).

    .venv/bin/python bench/sessions_calls.py [--appends 2000] [--port 9201] [--pg-port 9200]

Starts its own PostgreSQL (throwaway, fsync off) and one sessions process, creates a few
sessions and drives ``--appends`` turn appends (2 entries each, with ``expected_entry_count`` and
a ``charge``: a service that does not know those fields ignores them), then the same number of
context reads, session reads and summary updates, one call at a time over a keep-alive
connection. Prints the sessions process's CPU milliseconds per call of each kind; the client's
own CPU is not counted. Not a test: the figures depend on the machine.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from devstack.servers import PostgresServer, ServiceProcess  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_ms(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) * 1000 / TICKS


async def drive(base: str, token: str, pid: int, appends: int, sessions: int) -> None:
    user = str(uuid.uuid4())
    async with httpx.AsyncClient(base_url=base, headers={"X-Service-Token": token}, timeout=30) as http:
        ids = []
        for n in range(sessions):
            reply = await http.post("/v1/sessions", json={"user_id": user, "name": f"s{n}", "model_name": "m"})
            reply.raise_for_status()
            ids.append(reply.json()["session_id"])
        counts = {sid: 0 for sid in ids}
        # warm-up: imports, prepared statements, pool connections
        for sid in ids:
            for _ in range(5):
                await append(http, user, sid, counts)
                await http.get(f"/v1/sessions/{sid}/context", params={"user_id": user, "window": 10})

        async def measure(name: str, calls: int, call: Callable[[str, int], Awaitable[object]]) -> None:
            before, started = cpu_ms(pid), time.perf_counter()
            for i in range(calls):
                await call(ids[i % len(ids)], i)
            cpu, wall = cpu_ms(pid) - before, time.perf_counter() - started
            print(f"{name:<16} {calls:>6} calls  {cpu / calls:7.3f} ms CPU/call  {wall / calls * 1000:7.3f} ms wall/call")

        async def do_append(sid: str, _: int) -> None:
            await append(http, user, sid, counts)

        async def do_context(sid: str, _: int) -> None:
            (await http.get(f"/v1/sessions/{sid}/context", params={"user_id": user, "window": 10})).raise_for_status()

        async def do_get(sid: str, _: int) -> None:
            (await http.get(f"/v1/sessions/{sid}", params={"user_id": user})).raise_for_status()

        async def do_summary(sid: str, i: int) -> None:
            (await http.put(f"/v1/sessions/{sid}/summary", json={
                "user_id": user, "summary": f"summary {i}", "summarized_upto": min(counts[sid], 10 + i),
                "turn_id": str(uuid.uuid4()), "charge": {"cost_nanos": 1000},
            })).raise_for_status()

        await measure("append", appends, do_append)
        await measure("context", appends, do_context)
        await measure("get", appends, do_get)
        await measure("summary", appends // 2, do_summary)


async def append(http: httpx.AsyncClient, user: str, sid: str, counts: dict[str, int]) -> None:
    turn = str(uuid.uuid4())
    reply = await http.post(f"/v1/sessions/{sid}/turns", json={
        "user_id": user, "turn_id": turn, "expected_entry_count": counts[sid],
        "entries": [{"role": "user", "content": "what is the weather like " * 4},
                    {"role": "assistant", "content": "sunny with a chance of tests " * 8}],
        "charge": {"cost_nanos": 12345, "reservation_id": str(uuid.uuid4()), "model_name": "gpt-4"},
    })
    if reply.status_code != 201:
        raise RuntimeError(f"append failed: {reply.status_code} {reply.text}")
    counts[sid] = reply.json()["entry_count"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--appends", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--port", type=int, default=9201)
    parser.add_argument("--pg-port", type=int, default=9200)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-sessions-"))
    work.chmod(0o755)
    postgres = PostgresServer("postgres", args.pg_port, work / "pg", durable=False).start()
    service = None
    try:
        postgres.create_database("bench")
        token = secrets.token_urlsafe(16)
        env = {
            "SERVICE_TOKEN": token,
            "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{args.pg_port}/bench",
            "SESSIONS_PORT": str(args.port),
            "SESSIONS_HOST": "127.0.0.1",
            "LOG_LEVEL": "WARNING",
        }
        service = ServiceProcess("sessions", args.port, work / "run" / "sessions", module="chat_sessions", env=env)
        service.start()
        assert service.process is not None
        asyncio.run(drive(service.url, token, service.process.pid, args.appends, args.sessions))
    finally:
        if service is not None:
            service.stop()
        postgres.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
