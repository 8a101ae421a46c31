"""The run command brings the whole system up from nothing, answers on every port, serves the
demo user, stops everything on Ctrl-C and reuses its data the next time."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import websockets

from devstack.servers import free_port

ROOT = Path(__file__).resolve().parents[2]


def _start(env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "devstack", "run"], cwd=ROOT, env={**os.environ, **env},
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )


def _wait_for_banner(process: subprocess.Popen, log: Path, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if "chat-backend is up" in text and "Press Ctrl-C" in text:
            return text
        if process.poll() is not None:
            pytest.fail(f"run command exited {process.returncode}:\n{text}")
        time.sleep(0.05)
    pytest.fail(f"run command did not come up:\n{log.read_text(errors='replace')}")


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


async def _ws(url: str, frame: dict) -> dict:
    async with websockets.connect(url) as socket:
        await socket.send(json.dumps(frame))
        return json.loads(await asyncio.wait_for(socket.recv(), 10))


def _stop(process: subprocess.Popen) -> list[psutil.Process]:
    assert process.poll() is None, f"run command exited early with {process.returncode}"
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    process.send_signal(signal.SIGINT)
    process.wait(90)
    gone, alive = psutil.wait_procs(children, timeout=15)
    return alive


async def test_run_command_up_ready_demo_user_ctrl_c_and_data_reuse(private_dir: Path) -> None:
    ports = {name: free_port() for name in ("GATEWAY_PORT", "SESSIONS_PORT", "FILES_PORT", "BILLING_PORT", "AI_SERVER_PORT",
                                            "LOCAL_POSTGRES_PORT", "LOCAL_REDIS_PORT")}
    for name in ("LOCAL_S3_PORT", "LOCAL_S3_MASTER_PORT", "LOCAL_S3_VOLUME_PORT", "LOCAL_S3_FILER_PORT"):
        ports[name] = free_port(also_free_offset=10000)
    env = {key: str(value) for key, value in ports.items()}
    env["DATA_DIR"] = str(private_dir / "data")
    for key in ("DATABASE_URL", "DB_HOST", "REDIS_URL", "REDIS_HOST", "S3_ENDPOINT", "SERVICE_TOKEN"):
        env[key] = ""
    log = private_dir / "run1.log"
    process = _start(env, log)
    try:
        banner = _wait_for_banner(process, log)
        demo_user = banner.split("demo user", 1)[1].split()[0]
        for key in ("GATEWAY_PORT", "SESSIONS_PORT", "FILES_PORT", "BILLING_PORT"):
            assert _get(f"http://127.0.0.1:{ports[key]}/health")[0] == 200, key
            status, body = _get(f"http://127.0.0.1:{ports[key]}/ready")
            assert status == 200, (key, body)
        ws_url = f"ws://127.0.0.1:{ports['GATEWAY_PORT']}/ws"
        reply = await _ws(ws_url, {"type": 5, "data": {"user_id": demo_user}})
        assert reply == {"type": 5, "data": {"models": ["gpt-4-turbo", "gpt-4-turbo-2024-04-09", "llama3.1:8b"]}}
        turn = await _ws(ws_url, {"type": 3, "data": {"user_id": demo_user, "session_id": "NEW", "model_id": 8,
                                                      "message": "remember me after a restart", "session_prompt": ""}})
        assert "error" not in turn, turn
        session_id = turn["data"]["session_id"]
    finally:
        alive = _stop(process)
    assert alive == [], f"processes left running after Ctrl-C: {alive}"
    for key in ("GATEWAY_PORT", "BILLING_PORT"):
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{ports[key]}/health", timeout=2)

    log2 = private_dir / "run2.log"
    process = _start(env, log2)
    try:
        banner = _wait_for_banner(process, log2)
        assert demo_user in banner
        reply = await _ws(f"ws://127.0.0.1:{ports['GATEWAY_PORT']}/ws", {"type": 1, "data": {"user_id": demo_user}})
        assert [s["session_id"] for s in reply["data"]["session_info"]] == [session_id]
    finally:
        assert _stop(process) == []
