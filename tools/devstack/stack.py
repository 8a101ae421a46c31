"""The whole system as processes: infrastructure (started here unless URLs are given) and the
five services, wired through environment variables exactly as a deployment wires them."""
from __future__ import annotations

import json
import secrets
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from devstack.servers import (
    ManagedServer,
    PostgresServer,
    RedisServer,
    S3Server,
    ServiceProcess,
    free_port,
)


def side_by_side(*calls: Callable[[], object]) -> None:
    """Run each call in a thread of its own, wait for all of them, then raise the first failure
    (so a failed start still lets the others finish, and be stopped)."""
    with ThreadPoolExecutor(max_workers=max(1, len(calls))) as pool:
        futures = [pool.submit(call) for call in calls]
    for future in futures:
        future.result()


SERVICE_MODULES = {
    "billing": "chat_billing",
    "sessions": "chat_sessions",
    "files": "chat_files",
    "gateway": "chat_gateway",
}


@dataclass
class Ports:
    gateway: int = 8000
    sessions: int = 8001
    files: int = 8002
    billing: int = 8003
    ai: int = 50051

    @classmethod
    def free(cls) -> "Ports":
        return cls(free_port(), free_port(), free_port(), free_port(), free_port())


@dataclass
class Infrastructure:
    """Where the stateful engines are. Anything not given is started locally."""

    database_url: str = ""
    redis_url: str = ""
    s3_endpoint: str = ""
    s3_access_key: str = ""
    s3_secret_key: str = ""


@dataclass
class Stack:
    data_dir: Path
    ports: Ports = field(default_factory=Ports)
    infra: Infrastructure = field(default_factory=Infrastructure)
    service_token: str = ""
    env: dict[str, str] = field(default_factory=dict)
    durable: bool = True
    local_ports: dict[str, int] = field(default_factory=dict)
    servers: list[ManagedServer] = field(default_factory=list)
    services: dict[str, ServiceProcess] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.service_token:
            token_file = self.data_dir / "service_token"
            if not token_file.exists():
                token_file.write_text(secrets.token_urlsafe(32))
                token_file.chmod(0o600)
            self.service_token = token_file.read_text().strip()

    # infrastructure ------------------------------------------------------------------------

    def start_infrastructure(self) -> None:
        """PostgreSQL, Redis and the S3 store, each unless its URL is given, started side by side
        (each start is mostly waiting: initdb, SeaweedFS's own start-up). Each is in
        ``servers`` as soon as it runs, so that a failed start of another still stops it."""
        def postgres() -> None:
            pg = PostgresServer(
                "postgres", self.local_ports.get("postgres") or free_port(), self.data_dir / "postgres",
                durable=self.durable,
            ).start()
            self.servers.append(pg)
            pg.create_database("chat")
            self.infra.database_url = pg.url("chat")

        def redis() -> None:
            server = RedisServer("redis", self.local_ports.get("redis") or free_port(), self.data_dir / "redis").start()
            self.servers.append(server)
            self.infra.redis_url = server.url()

        def s3() -> None:
            # the SeaweedFS ports asked for, else S3Server's own defaults (0: found free)
            server = S3Server(
                "s3", self.local_ports.get("s3") or free_port(also_free_offset=10000), self.data_dir / "s3",
                master_port=self.local_ports.get("master_port", 0),
                volume_port=self.local_ports.get("volume_port", 0),
                filer_port=self.local_ports.get("filer_port", 0),
            ).start()
            self.servers.append(server)
            self.infra.s3_endpoint = server.endpoint()
            self.infra.s3_access_key = server.access_key
            self.infra.s3_secret_key = server.secret_key

        wanted = [(self.infra.database_url, postgres), (self.infra.redis_url, redis), (self.infra.s3_endpoint, s3)]
        side_by_side(*(start for given, start in wanted if not given))

    # services ------------------------------------------------------------------------------

    def base_env(self) -> dict[str, str]:
        p = self.ports
        env = {
            "SERVICE_TOKEN": self.service_token,
            "DATABASE_URL": self.infra.database_url,
            "REDIS_URL": self.infra.redis_url,
            "S3_ENDPOINT": self.infra.s3_endpoint,
            "S3_ACCESS_KEY": self.infra.s3_access_key,
            "S3_SECRET_KEY": self.infra.s3_secret_key,
            "SESSIONS_URL": f"http://127.0.0.1:{p.sessions}",
            "FILES_URL": f"http://127.0.0.1:{p.files}",
            "BILLING_URL": f"http://127.0.0.1:{p.billing}",
            "AI_SERVER_HOST": "127.0.0.1",
            "AI_SERVER_PORT": str(p.ai),
            "GATEWAY_PORT": str(p.gateway),
            "SESSIONS_PORT": str(p.sessions),
            "FILES_PORT": str(p.files),
            "BILLING_PORT": str(p.billing),
            "GATEWAY_PUBLIC_URL": f"http://localhost:{p.gateway}",
        }
        env.update(self.env)
        return env

    def start_ai(self) -> ServiceProcess:
        ai = ServiceProcess(
            "ai", self.ports.ai, self.data_dir / "run" / "ai", module="chat_ai", env=self.base_env(),
            health_path=None,
        )
        ai.start()
        self.services["ai"] = ai
        return ai

    def start_service(self, name: str, *, port: int | None = None, env: dict[str, str] | None = None,
                      key: str | None = None) -> ServiceProcess:
        port = port or getattr(self.ports, name)
        service_env = self.base_env()
        if name == "gateway":
            service_env["GATEWAY_PORT"] = str(port)
        service_env.update(env or {})
        process = ServiceProcess(
            key or name, port, self.data_dir / "run" / (key or name), module=SERVICE_MODULES[name], env=service_env
        )
        process.start()
        self.services[key or name] = process
        return process

    def start(self) -> "Stack":
        self.start_infrastructure()
        # The database services and the AI service side by side (migrations take an advisory
        # lock per schema, so concurrent starts are safe), then the gateway, which needs them.
        side_by_side(*(partial(self.start_service, name) for name in ("billing", "sessions", "files")), self.start_ai)
        self.start_service("gateway")
        return self

    def stop(self) -> None:
        """The gateway first (it finishes turns in flight against the others), then the other
        services side by side, then the servers side by side."""
        gateways = [self.services.pop(name) for name in list(self.services) if name.startswith("gateway")]
        side_by_side(*(gateway.stop for gateway in gateways))
        side_by_side(*(process.stop for process in self.services.values()))
        self.services.clear()
        side_by_side(*(server.stop for server in self.servers))
        self.servers.clear()

    # single parts (faults, measurements) -----------------------------------------------------

    def part(self, name: str) -> ManagedServer:
        """A started part by name: "gateway", "sessions", "files", "billing", "ai", or a local
        server "postgres", "redis", "s3"."""
        if name in self.services:
            return self.services[name]
        for server in self.servers:
            if server.name == name:
                return server
        raise KeyError(f"no part named {name!r} in this stack")

    def parts(self) -> dict[str, ManagedServer]:
        return {**{server.name: server for server in self.servers}, **self.services}

    def pids(self) -> dict[str, int]:
        """The pid of every running part (PostgreSQL: the postmaster)."""
        return {name: part.pid for name, part in self.parts().items() if part.pid is not None}

    def kill_part(self, name: str) -> list[int]:
        """SIGKILL a part and all its child processes (no shutdown of any kind)."""
        return self.part(name).kill_tree()

    def restart_part(self, name: str, timeout: float = 60.0) -> ManagedServer:
        """Start a part again as it was configured (same port, data dir and environment), after
        a kill or a stop; a part still running is killed first."""
        part = self.part(name)
        if part.pid is not None:
            part.kill_tree()
        part.start(timeout)
        return part

    def kill_everything(self) -> None:
        """Teardown of last resort: SIGKILL every part still running, with its children."""
        for part in self.parts().values():
            if part.process is not None:
                part.kill_tree()

    # conveniences --------------------------------------------------------------------------

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.services['gateway'].port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.services['gateway'].port}/ws"

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.services[name].port}"

    def admin(self, method: str, path: str, body: dict | None = None) -> dict:
        """A call to the billing admin API with the service token (synchronous)."""
        request = urllib.request.Request(
            f"{self.url('billing')}{path}",
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"content-type": "application/json", "x-service-token": self.service_token},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
        return json.loads(raw) if raw else {}

    def create_user(self, username: str = "Test User", models: list[int] | None = None, balance: float = 1.0,
                    user_id: str | None = None) -> str:
        body: dict = {"username": username, "models": models if models is not None else [4, 5, 8],
                      "balance": balance}
        if user_id:
            body["user_id"] = user_id
        return self.admin("POST", "/v1/users", body)["user_id"]


def wait_ready(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except Exception as exc:  # noqa: BLE001 - anything short of 200 means "not yet"
            last = str(exc)
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready: {last}")


__all__ = ["Infrastructure", "Ports", "Stack", "wait_ready"]
