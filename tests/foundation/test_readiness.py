"""/ready follows the service's dependencies: it fails while one is down and passes again when
it is back, without restarting the service."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

from devstack.servers import PostgresServer, RedisServer, ServiceProcess, free_port
from devstack.stack import Stack


def _ready(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"{url}/ready", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _eventually(url: str, status: int, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        got, body = _ready(url)
        if got == status:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"/ready stayed {got}: {body}")
        time.sleep(0.3)


def test_gateway_ready_follows_redis(system: Stack, tmp_path: Path) -> None:
    redis = RedisServer("own-redis", free_port(), tmp_path / "redis").start()
    gateway = system.start_service("gateway", port=free_port(), key="gateway-redis-test",
                                   env={"REDIS_URL": redis.url()})
    try:
        _eventually(gateway.url, 200)
        redis.stop()
        body = _eventually(gateway.url, 503)
        assert body["checks"]["redis"] != "ok"
        assert body["checks"]["sessions"] == "ok"
        redis.start()
        _eventually(gateway.url, 200)
    finally:
        gateway.stop()
        system.services.pop("gateway-redis-test", None)
        redis.stop()


def test_database_services_ready_follow_postgres(system: Stack, private_dir: Path, service_token: str) -> None:
    postgres = PostgresServer("own-pg", free_port(), private_dir / "pg", durable=False).start()
    postgres.create_database("chat")
    env = {**system.base_env(), "DATABASE_URL": postgres.url("chat")}
    services = [
        ServiceProcess(name, free_port(), private_dir / name, module=f"chat_{name}",
                       env={**env, f"{name.upper()}_PORT": "0"})
        for name in ("billing", "sessions", "files")
    ]
    for service in services:
        service.env[f"{service.name.upper()}_PORT"] = str(service.port)
        service.start()
    try:
        for service in services:
            _eventually(service.url, 200)
        postgres.stop()
        for service in services:
            body = _eventually(service.url, 503)
            assert any(value != "ok" for value in body["checks"].values())
        postgres.start()
        for service in services:
            _eventually(service.url, 200)
        # not only the probe: real work goes through again on the same processes
        billing = next(service for service in services if service.name == "billing")
        request = urllib.request.Request(
            f"{billing.url}/v1/users", method="POST",
            data=json.dumps({"username": "after restart", "models": [8], "balance": 1}).encode(),
            headers={"content-type": "application/json", "x-service-token": service_token},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 201
        assert all(service.process is not None and service.process.poll() is None for service in services)
    finally:
        for service in services:
            service.stop()
        postgres.stop()
