"""CPU per internal HTTP call: the old httpx-based client against the aiohttp ServiceClient.

    python bench/internal_call.py [--calls 3000] [--concurrency 4] [--port 9310] [--loop uvloop]

Starts a small Litestar app under uvicorn (httptools + uvloop) in a subprocess, then sends
``--calls`` POSTs with a small JSON body (a turn-sized reserve request) from each client in
turn, ``--concurrency`` at a time, each reply decoded. For every run it prints the CPU
(utime + stime from /proc/PID/stat) the client process and the server process spent per
call, and the ratio old/new. ``--rounds`` alternates the two clients to even out drift.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

TICKS = os.sysconf("SC_CLK_TCK")
TOKEN = "bench-token"
BODY = {
    "user_id": "6f0e0a52-3c5e-4a8e-9d43-7d6a1c0de001",
    "model_id": 4,
    "turn_id": "0b9c3d0e-3a43-4b8f-9b7e-2f0d8a7c1e55",
    "idempotency_key": "reserve:0b9c3d0e-3a43-4b8f-9b7e-2f0d8a7c1e55",
    "estimated_tokens": 1200,
}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


# ---------------------------------------------------------------- the server (subprocess)


def serve(port: int) -> None:
    import uvicorn
    from litestar import Litestar, get, post

    @post("/v1/reservations", status_code=201, sync_to_thread=False)
    def reserve(data: dict[str, Any]) -> dict[str, Any]:
        return {"reservation_id": "r-1", "user_id": data["user_id"], "held_nanos": 1_000_000, "status": "held"}

    @get("/health", sync_to_thread=False)
    def health() -> str:
        return "ok"

    app = Litestar([reserve, health], debug=False)
    uvicorn.run(app, host="127.0.0.1", port=port, http="httptools", loop="uvloop",
                log_level="warning", access_log=False, log_config=None)


# ---------------------------------------------------------------- the old client, as it was


class HttpxClient:
    """The request path of chat_common.client before aiohttp (httpx, msgspec, same headers)."""

    def __init__(self, base_url: str, token: str) -> None:
        import httpx

        from chat_common.app import SERVICE_TOKEN_HEADER

        self._httpx = httpx
        self._http = httpx.AsyncClient(
            base_url=base_url, timeout=httpx.Timeout(10.0, connect=3.0), headers={SERVICE_TOKEN_HEADER: token},
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=200),
        )

    def _headers(self, extra: Mapping[str, str] | None) -> dict[str, str]:
        from chat_common.app import REQUEST_ID_HEADER, TURN_ID_HEADER
        from chat_common.logging import request_id_var, turn_id_var
        from chat_common.tracing import inject_context

        headers: dict[str, str] = {}
        if request_id := request_id_var.get():
            headers[REQUEST_ID_HEADER] = request_id
        if turn_id := turn_id_var.get():
            headers[TURN_ID_HEADER] = turn_id
        if extra:
            headers.update(extra)
        inject_context(headers)
        return headers

    async def post(self, path: str, *, json: Any) -> Any:
        import msgspec

        headers = self._headers(None)
        body = msgspec.json.encode(json)
        headers["content-type"] = "application/json"
        response = await self._http.request("POST", path, content=body, params={}, headers=headers)
        if response.is_success and response.headers.get("content-type", "").startswith("application/json"):
            return msgspec.json.decode(response.content)
        raise RuntimeError(f"answered {response.status_code}")

    async def aclose(self) -> None:
        await self._http.aclose()


# ---------------------------------------------------------------- the driver


async def drive(call: Callable[[], Awaitable[Any]], calls: int, concurrency: int) -> None:
    remaining = calls

    async def lane() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    await asyncio.gather(*(lane() for _ in range(concurrency)))


async def measure(name: str, make: Callable[[], Any], args: argparse.Namespace, server_pid: int,
                  results: dict[str, list[tuple[float, float]]]) -> None:
    from chat_common.logging import request_id_var, turn_id_var

    client = make()
    request_id_var.set("bench-request-0123456789abcdef")
    turn_id_var.set("0b9c3d0e-3a43-4b8f-9b7e-2f0d8a7c1e55")

    async def call() -> Any:
        return await client.post("/v1/reservations", json=BODY)

    try:
        await drive(call, 200, args.concurrency)  # warm up: connections, caches
        me = os.getpid()
        client_before, server_before, wall = cpu_seconds(me), cpu_seconds(server_pid), time.perf_counter()
        await drive(call, args.calls, args.concurrency)
        wall = time.perf_counter() - wall
        client_ms = (cpu_seconds(me) - client_before) * 1000 / args.calls
        server_ms = (cpu_seconds(server_pid) - server_before) * 1000 / args.calls
    finally:
        await client.aclose()
    results.setdefault(name, []).append((client_ms, server_ms))
    print(f"  {name:<22} client {client_ms:6.3f} ms/call   server {server_ms:6.3f} ms/call   "
          f"{args.calls / wall:7.0f} calls/s", flush=True)


async def bench(args: argparse.Namespace, server_pid: int, base_url: str) -> None:
    from chat_common.client import ServiceClient

    makers: dict[str, Callable[[], Any]] = {
        "old httpx client": lambda: HttpxClient(base_url, TOKEN),
        "new aiohttp client": lambda: ServiceClient("bench", base_url, TOKEN),
    }
    results: dict[str, list[tuple[float, float]]] = {}
    for _ in range(args.rounds):
        for name, make in makers.items():
            await measure(name, make, args, server_pid, results)
    (old_c, old_s), (new_c, new_s) = (
        tuple(sum(v) / len(v) for v in zip(*results[name], strict=True)) for name in makers
    )
    print(f"\nmean of {args.rounds} round(s), {args.calls} calls each, concurrency {args.concurrency}, "
          f"client loop {args.loop}:")
    print(f"  client CPU per call: old {old_c:.3f} ms, new {new_c:.3f} ms, old/new {old_c / new_c:.2f}x")
    print(f"  server CPU per call: old {old_s:.3f} ms, new {new_s:.3f} ms, old/new {old_s / new_s:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--port", type=int, default=9310)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop",
                        help="the client's event loop (the services run uvloop)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.port)
        return
    server = subprocess.Popen([sys.executable, __file__, "--serve", "--port", str(args.port)])
    base_url = f"http://127.0.0.1:{args.port}"
    try:
        import httpx

        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(base_url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the bench server did not start")
            time.sleep(0.1)
        if args.loop == "uvloop":
            import uvloop

            uvloop.run(bench(args, server.pid, base_url))
        else:
            asyncio.run(bench(args, server.pid, base_url))
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
