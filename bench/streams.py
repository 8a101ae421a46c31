"""Streamed turns (docs/protocol.md, "Extensions"): time to the first delta and deltas per second, for one
stream and for 32 concurrent streams.

    python bench/streams.py [--streams 1 32] [--turns 5] [--delay-ms 0] [--words 200]
    python bench/streams.py --ws-url ws://127.0.0.1:8000/ws --user-id <uuid>   # a running stack

Without ``--ws-url`` it starts its own stack with devstack (the offline AI, paced by
``OFFLINE_STREAM_DELAY_MS=--delay-ms``). Every stream sends ``--turns`` streamed type 3 turns
back to back, each in a new session, whose message has ``--words`` words (the offline reply
echoes it, so a reply has about that many deltas). Time to first delta is measured from sending
the type 3 to receiving seq 1; deltas per second over all streams from the first send to the
last final reply.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import websockets


async def one_stream(url: str, user_id: str, turns: int, words: int) -> tuple[list[float], int, int]:
    message = " ".join(f"w{i}" for i in range(words))
    firsts: list[float] = []
    deltas = errors = 0
    async with websockets.connect(url, max_size=None) as socket:
        for _ in range(turns):
            sent = time.perf_counter()
            await socket.send(json.dumps({"type": 3, "data": {
                "user_id": user_id, "session_id": "NEW", "model_name": "llama3.1:8b", "message": message,
                "session_prompt": "", "file_name": "", "stream": True,
            }}))
            while True:
                frame = json.loads(await socket.recv())
                if frame.get("type") == 7:
                    if frame["data"]["seq"] == 1:
                        firsts.append(time.perf_counter() - sent)
                    if frame["data"]["seq"] >= 1:
                        deltas += 1
                    continue
                if "error" in frame:
                    errors += 1
                break
    return firsts, deltas, errors


async def run(url: str, users: list[str], streams: int, turns: int, words: int) -> None:
    started = time.perf_counter()
    results = await asyncio.gather(*(one_stream(url, users[i % len(users)], turns, words) for i in range(streams)))
    elapsed = time.perf_counter() - started
    firsts = sorted(f for r in results for f in r[0])
    deltas = sum(r[1] for r in results)
    errors = sum(r[2] for r in results)
    p95 = firsts[min(len(firsts) - 1, int(len(firsts) * 0.95))] if firsts else float("nan")
    print(f"{streams:>3} streams x {turns} turns: first delta median {statistics.median(firsts) * 1000:7.1f} ms, "
          f"p95 {p95 * 1000:7.1f} ms; {deltas / elapsed:9.0f} deltas/s in all "
          f"({deltas / elapsed / streams:7.0f} per stream); {errors} errors; {elapsed:.1f} s", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--words", type=int, default=200)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--ws-url")
    parser.add_argument("--user-id")
    args = parser.parse_args()
    stack = None
    try:
        if args.ws_url:
            if not args.user_id:
                parser.error("--ws-url needs --user-id")
            url, users = args.ws_url, [args.user_id]
        else:
            from devstack.stack import Ports, Stack, wait_ready

            print("starting a stack (PostgreSQL, Redis, S3, five services) ...", flush=True)
            stack = Stack(
                Path(tempfile.mkdtemp(prefix="bench-streams-")) / "stack", ports=Ports.free(), durable=False,
                env={
                    "AI_PROVIDER": "offline", "LOG_LEVEL": "WARNING", "OFFLINE_STREAM_DELAY_MS": str(args.delay_ms),
                    "RATE_LIMIT_REQUESTS": "100000000", "MAX_SOCKETS_PER_USER": "100000",
                },
            )
            stack.start()
            wait_ready(stack.gateway_url, 60)
            url = stack.ws_url
            users = [stack.create_user(f"bench-{i}", [4, 5, 8], 1_000_000.0) for i in range(max(args.streams))]
        print(f"offline AI, {args.words}-word replies, OFFLINE_STREAM_DELAY_MS={args.delay_ms:g}", flush=True)
        for streams in args.streams:
            asyncio.run(run(url, users, streams, args.turns, args.words))
    finally:
        if stack is not None:
            stack.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
