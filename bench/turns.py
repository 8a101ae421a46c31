"""Chat turns per second through the whole system, next to a bare WebSocket echo, and the CPU
every process spent per turn.

    python bench/turns.py [--sockets 32] [--seconds 20] [--warmup 7]
    python bench/turns.py --ws-url ws://127.0.0.1:8000/ws --user-id <uuid>   # a running stack
        [--pid gateway=<pid> --pid postgres=<postmaster pid> ...]              # ... and its CPU

Without ``--ws-url`` it starts its own stack with devstack (PostgreSQL, Redis, S3 and the five
services as processes, the offline AI), one user per socket. Each socket sends full type-3 turns
back to back (first "NEW", then on its own session, so windows fill and summaries are folded),
without think time. Every socket first makes ``--warmup`` turns (default: enough to carry its
session past the context window, MAX_CHAT_HISTORY_CONTEXT), then all start the measured window
together: the figures describe the steady state, where every turn also folds a summary.

Over that window the CPU of every process of the stack is read from /proc/PID/stat (utime+stime
at the start and at the end; PostgreSQL is the postmaster plus all its backends, live ones by
their own counters and exited ones through the postmaster's cutime/cstime) and divided by the
turns completed in it. Then the same sockets drive a bare Litestar WebSocket echo under uvicorn
on this machine: the ceiling any WebSocket service here has, and the ratio shows what a turn costs.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import websockets

ECHO_APP = textwrap.dedent(
    """
    from litestar import Litestar, WebSocket, websocket

    @websocket("/ws")
    async def echo(socket: WebSocket) -> None:
        await socket.accept()
        while True:
            message = await socket.receive()
            if message["type"] == "websocket.disconnect":
                return
            await socket.send({"type": "websocket.send", "text": message.get("text") or ""})

    app = Litestar([echo])
    """
)


# makes the next request of one socket from the reply to its last (None at first)
FrameMaker = Callable[[object], str]


@dataclass
class Run:
    name: str
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    warmup_replies: int = 0
    warmup_errors: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds in the window

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000

    def row(self) -> str:
        return (
            f"{self.name:<22} {len(self.latencies):>8} {self.rate:>10.1f} "
            f"{self.percentile(50):>9.2f} {self.percentile(99):>9.2f} {self.errors:>7}"
        )

    def cpu_ms_per_reply(self, name: str) -> float:
        replies = len(self.latencies)
        return self.cpu.get(name, 0.0) * 1000 / replies if replies else float("nan")


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of each named process tree (own + reaped children + live descendants)."""
    from devstack.procs import CLK_TCK, parent_map, tree_cpu_ticks

    tree = parent_map()
    readings = {name: tree_cpu_ticks(pid, tree) / CLK_TCK for name, pid in pids.items()}
    own = os.times()
    readings["bench client"] = own.user + own.system
    return readings


async def drive(name: str, url: str, sockets: int, seconds: float, frames: list[FrameMaker], *,
                warmup: int = 0, pids: dict[str, int] | None = None) -> Run:
    """``sockets`` clients, each sending the next request as soon as the last was answered.

    ``frames[i]`` is the payload factory of socket ``i``: called with the previous reply (or None)
    it returns the next frame to send. Each socket first sends ``warmup`` requests (not measured);
    the measured window starts when every socket has finished its warm-up, and ends when the last
    request sent before the deadline is answered. The CPU of ``pids`` is read at both ends.
    """
    run = Run(name)
    deadline = 0.0
    ready = asyncio.Semaphore(0)

    async def client(make_frame: FrameMaker) -> None:
        async with websockets.connect(url, max_size=None, open_timeout=30) as socket:
            reply: object = None
            for _ in range(warmup):
                await socket.send(make_frame(reply))
                raw = await socket.recv()
                reply = json.loads(raw) if isinstance(raw, str) and raw.startswith("{") else raw
                run.warmup_replies += 1
                if isinstance(reply, dict) and "error" in reply:
                    run.warmup_errors += 1
                    run.first_error = run.first_error or f"warm-up: {reply}"
            ready.release()
            await start.wait()
            while time.perf_counter() < deadline:
                frame = make_frame(reply)
                sent = time.perf_counter()
                await socket.send(frame)
                raw = await socket.recv()
                run.latencies.append(time.perf_counter() - sent)
                reply = json.loads(raw) if isinstance(raw, str) and raw.startswith("{") else raw
                if isinstance(reply, dict) and "error" in reply:
                    run.errors += 1
                    run.first_error = run.first_error or str(reply)
                    run.latencies.pop()

    start = asyncio.Event()
    tasks = [asyncio.create_task(client(frames[i])) for i in range(sockets)]
    waiting = asyncio.gather(*(ready.acquire() for _ in range(sockets)))
    started: list[asyncio.Future[Any]] = [waiting, *tasks]
    done, _ = await asyncio.wait(started, return_when=asyncio.FIRST_COMPLETED)
    if waiting not in done:  # a client failed during connect or warm-up
        waiting.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ended in done:
            ended.result()
        raise RuntimeError("a client ended before its warm-up finished")
    await asyncio.sleep(0.2)  # let the last warm-up replies' after-work settle
    before = cpu_seconds(pids or {})
    began = time.perf_counter()
    deadline = began + seconds
    start.set()
    await asyncio.gather(*tasks)
    run.seconds = time.perf_counter() - began
    after = cpu_seconds(pids or {})
    run.cpu = {key: after[key] - before[key] for key in before if key in after}
    return run


def turn_frames(user_ids: list[str], model: str) -> list[FrameMaker]:
    def factory(user_id: str) -> FrameMaker:
        state: dict[str, Any] = {"session": "NEW", "n": 0}

        def make(reply: object) -> str:
            if isinstance(reply, dict) and "data" in reply:
                state["session"] = reply["data"]["session_id"]
            state["n"] += 1
            return json.dumps(
                {
                    "type": 3,
                    "data": {
                        "user_id": user_id,
                        "session_id": state["session"],
                        "model_name": model,
                        "message": f"benchmark question number {state['n']}: what changed since the last one?",
                        "session_prompt": "You are a benchmark.",
                        "file_name": "",
                    },
                }
            )

        return make

    return [factory(u) for u in user_ids]


def echo_frames(sockets: int) -> list[FrameMaker]:
    payload = json.dumps({"type": 6, "data": {"user_id": "00000000-0000-0000-0000-000000000000"}})
    return [lambda _reply: payload for _ in range(sockets)]


def start_echo(port: int, work: Path) -> subprocess.Popen:
    app_dir = work / "echo"
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "bench_echo.py").write_text(ECHO_APP)
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "bench_echo:app", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning", "--no-access-log"],
        cwd=app_dir, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    from devstack.servers import wait_for_port

    wait_for_port(port, 30, process)
    return process


# The order of the CPU table; "all but ai" sums every process of the stack except the AI service.
CPU_ORDER = ("gateway", "sessions", "billing", "files", "postgres", "redis", "s3")


def cpu_report(turns: Run, bare: Run | None, pids: dict[str, int]) -> list[str]:
    if not pids or not turns.latencies:
        return ["CPU per turn: measured for a stack this starts, or with --ws-url for the --pid processes given"]
    lines = [f"CPU ms per turn over the measured window ({len(turns.latencies)} turns, {turns.seconds:.1f} s; "
             "/proc/PID/stat utime+stime, PostgreSQL = postmaster + backends incl. exited ones)"]
    names = [n for n in CPU_ORDER if n in turns.cpu] + [n for n in turns.cpu if n not in CPU_ORDER
                                                        and n not in ("ai", "bench client")]
    for name in names:
        lines.append(f"  {name:<16} {turns.cpu_ms_per_reply(name):>8.2f}")
    stack_total = sum(turns.cpu[n] for n in names)
    per_turn = stack_total * 1000 / len(turns.latencies)
    lines.append(f"  {'all but ai':<16} {per_turn:>8.2f}   <- target <= 10 ms at 32 sockets")
    if "ai" in turns.cpu:
        lines.append(f"  {'ai':<16} {turns.cpu_ms_per_reply('ai'):>8.2f}")
        lines.append(f"  {'whole stack':<16} {(stack_total + turns.cpu['ai']) * 1000 / len(turns.latencies):>8.2f}")
    lines.append(f"  {'bench client':<16} {turns.cpu_ms_per_reply('bench client'):>8.2f}   (load generator, not in the sums)")
    if bare is not None and bare.latencies and "echo" in bare.cpu:
        lines.append(f"bare echo: {bare.cpu_ms_per_reply('echo'):.3f} ms CPU per echo in uvicorn "
                     f"(client {bare.cpu_ms_per_reply('bench client'):.3f} ms)")
    return lines


def default_warmup(window: int) -> int:
    """Turns that carry a session past a window of ``window`` entries (2 entries per turn), plus two."""
    return window // 2 + 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sockets", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=int, default=None,
                        help="turns per socket before the measured window (default: past the context window)")
    parser.add_argument("--model", default="llama3.1:8b")
    parser.add_argument("--ws-url", help="a running gateway; default: start a stack here")
    parser.add_argument("--user-id", action="append", default=[], help="with --ws-url: user(s) to chat as")
    parser.add_argument("--log-level", default="WARNING", help="LOG_LEVEL of the stack this starts")
    parser.add_argument("--no-echo", action="store_true", help="skip the bare echo run")
    parser.add_argument("--pid", action="append", default=[], metavar="NAME=PID",
                        help="with --ws-url: a process of that stack to measure (repeatable; name 'ai' "
                             "is left out of the sum)")
    args = parser.parse_args()

    from devstack.servers import free_port, stop_process

    window = int(os.environ.get("MAX_CHAT_HISTORY_CONTEXT", "10") or 10)
    warmup = default_warmup(window) if args.warmup is None else args.warmup
    work = Path(tempfile.mkdtemp(prefix="bench-turns-"))
    stack = None
    echo = None
    pids: dict[str, int] = {}
    bare: Run | None = None
    load_before = os.getloadavg()
    try:
        if args.ws_url:
            if not args.user_id:
                parser.error("--ws-url needs at least one --user-id (a user entitled to --model, with balance)")
            url = args.ws_url
            users = [args.user_id[i % len(args.user_id)] for i in range(args.sockets)]
            for item in args.pid:
                name, _, pid = item.partition("=")
                if not pid.isdigit():
                    parser.error(f"--pid wants NAME=PID, got {item!r}")
                pids[name] = int(pid)
        else:
            try:
                from devstack.stack import Ports, Stack, wait_ready
            except ImportError:
                parser.error("devstack.stack is not available: give --ws-url and --user-id of a running stack")

            print("starting a stack (PostgreSQL, Redis, S3, five services) ...", flush=True)
            stack = Stack(
                work / "stack", ports=Ports.free(), durable=False,
                env={
                    "AI_PROVIDER": "offline",
                    "LOG_LEVEL": args.log_level,
                    "RATE_LIMIT_REQUESTS": "100000000",
                    "MAX_SOCKETS_PER_USER": "100000",
                    "MAX_CHAT_HISTORY_CONTEXT": str(window),
                },
            )
            stack.start()
            wait_ready(stack.gateway_url, 60)
            url = stack.ws_url
            users = [stack.create_user(f"bench-{i}", [0, 1, 2, 3, 4, 5, 6, 7, 8], 1_000_000.0)
                     for i in range(args.sockets)]
            pids = stack.pids()

        print(f"{args.sockets} sockets, {args.seconds:.0f} s each run, no think time, "
              f"{warmup} warm-up turns per socket (window {window} entries)", flush=True)
        turns = asyncio.run(drive("chat turn (type 3)", url, args.sockets, args.seconds,
                                  turn_frames(users, args.model), warmup=warmup, pids=pids))

        if not args.no_echo:
            echo_port = free_port()
            echo = start_echo(echo_port, work)
            bare = asyncio.run(drive("bare Litestar echo", f"ws://127.0.0.1:{echo_port}/ws", args.sockets,
                                     args.seconds, echo_frames(args.sockets), warmup=10,
                                     pids={"echo": echo.pid}))
    finally:
        if echo is not None:
            stop_process(echo)
        if stack is not None:
            stack.stop()
    load_after = os.getloadavg()

    print()
    print(f"{'':<22} {'replies':>8} {'per s':>10} {'p50 ms':>9} {'p99 ms':>9} {'errors':>7}")
    print(turns.row())
    if bare is not None:
        print(bare.row())
    if bare is not None and turns.rate and bare.rate:
        print(f"\nturns/s are {turns.rate / bare.rate:.4f} of bare echoes/s (1 turn costs "
              f"{bare.rate / turns.rate:.0f} echoes); p50 {turns.percentile(50) / bare.percentile(50):.0f}x")
    print()
    for line in cpu_report(turns, bare, pids):
        print(line)
    if turns.warmup_errors:
        print(f"warm-up errors: {turns.warmup_errors} of {turns.warmup_replies}")
    if turns.first_error:
        print(f"first error: {turns.first_error}")
    print(f"cores: {os.cpu_count()}; load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)")
    return 0 if turns.latencies and not turns.errors else 1


if __name__ == "__main__":
    sys.exit(main())
