"""``python -m chat_ai`` as a real process: configured from the environment, JSON logs on stdout,
health SERVING, and a clean exit on SIGTERM/SIGINT."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chat_common.aiproto import ai_service_pb2 as pb
from chat_common.aiproto import ai_service_pb2_grpc
from devstack.servers import ServiceProcess, free_port, wait_for_port

ENV_KEYS_TO_CLEAR = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OLLAMA_BASE_URL", "OLLAMA_HOST", "OLLAMA_PORT")


def clean_env(**values: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ENV_KEYS_TO_CLEAR}
    env.update(values)
    return env


@pytest.fixture
def ai_process(tmp_path: Path) -> Iterator[ServiceProcess]:
    port = free_port()
    process = ServiceProcess(
        "ai", port, tmp_path / "ai", module="chat_ai", health_path=None,
        env={"AI_SERVER_PORT": str(port), "AI_PROVIDER": "offline", "SHUTDOWN_GRACE_SECONDS": "2", "LOG_LEVEL": "DEBUG"},
    )
    yield process.start(timeout=30)
    process.kill()


def log_lines(process: ServiceProcess) -> list[dict]:
    return [json.loads(line) for line in process.log_path.read_text().splitlines() if line.startswith("{")]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serves_and_stops_cleanly(ai_process: ServiceProcess, sig: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{ai_process.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reply = ai_service_pb2_grpc.AIServiceStub(channel).Process(
            pb.Request(chat_message="ping", model_name="gpt-4", model_provider="openai"),
            metadata=(("x-request-id", "req-from-test"),), timeout=10,
        )
    assert reply.response_text.startswith("Echo: ping\n")

    assert ai_process.process is not None
    ai_process.process.send_signal(sig)
    assert ai_process.process.wait(10) == 0

    lines = log_lines(ai_process)
    assert all(line["service"] == "ai" for line in lines)
    messages = [line["msg"] for line in lines if line.get("logger", "").startswith("chat_ai")]
    assert messages[0] == "AI service listening"
    assert "AI service stopped" in messages
    answered = next(line for line in lines if line["msg"] == "Process answered")
    assert answered["request_id"] == "req-from-test"
    assert answered["provider"] == "offline"


def test_bad_configuration_exits_with_a_logged_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "chat_ai"], capture_output=True, text=True, timeout=30,
        env=clean_env(AI_PROVIDER="nonsense", AI_SERVER_PORT=str(free_port())),
    )
    assert result.returncode == 2
    error = json.loads(result.stdout.strip().splitlines()[-1])
    assert error["level"] == "error" and "AI_PROVIDER" in error["msg"]
    assert "Traceback" not in result.stdout + result.stderr


def test_port_in_use_exits_nonzero(tmp_path: Path) -> None:
    port = free_port()
    first = subprocess.Popen(
        [sys.executable, "-m", "chat_ai"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=clean_env(AI_SERVER_PORT=str(port)),
    )
    try:
        wait_for_port(port, 30, first)
        second = subprocess.run(
            [sys.executable, "-m", "chat_ai"], capture_output=True, text=True, timeout=30,
            env=clean_env(AI_SERVER_PORT=str(port)),
        )
        assert second.returncode == 1
        assert "cannot start" in second.stdout
    finally:
        first.terminate()
        first.wait(10)
