"""Shared fixtures: real servers started as processes on free ports, once per test run.

Each test module that needs a database gets one of its own (``fresh_database``), so modules
never see each other's rows. Tests that kill or restart a server start their own instance
with the classes in :mod:`devstack.servers` instead of using these shared ones.
"""
from __future__ import annotations

import secrets
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.servers import PostgresServer, RedisServer, S3Server, free_port
from devstack.stack import Stack


@pytest.fixture(scope="session")
def work_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="chat-tests-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def private_dir() -> Iterator[Path]:
    """A scratch folder outside pytest's tmp_path tree: pytest resets that tree's root to mode
    0700, which locks out the unprivileged user PostgreSQL runs as."""
    path = Path(tempfile.mkdtemp(prefix="chat-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres(work_dir: Path) -> Iterator[PostgresServer]:
    server = PostgresServer("postgres", free_port(), work_dir / "pg", durable=False).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(work_dir: Path) -> Iterator[RedisServer]:
    server = RedisServer("redis", free_port(), work_dir / "redis").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server(work_dir: Path) -> Iterator[S3Server]:
    server = S3Server("s3", free_port(also_free_offset=10000), work_dir / "s3").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def service_token() -> str:
    return secrets.token_urlsafe(24)


def new_database(postgres: PostgresServer) -> str:
    """A new empty database; returns its SQLAlchemy asyncpg URL."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    postgres.create_database(name)
    return f"postgresql+asyncpg://postgres@127.0.0.1:{postgres.port}/{name}"


@pytest.fixture(scope="module")
def fresh_database(postgres: PostgresServer) -> str:
    return new_database(postgres)


SYSTEM_MAX_FILE_SIZE_MB = 2


@pytest.fixture(scope="session")
def system(work_dir: Path, postgres: PostgresServer, redis_server: RedisServer, s3_server: S3Server,
           service_token: str) -> Iterator[Stack]:
    """All five services as processes on free ports, on the shared PostgreSQL (a database of
    their own), Redis and S3. Limits are set so tests can reach them quickly."""
    from devstack.stack import Infrastructure, Ports, Stack, wait_ready

    infra = Infrastructure(
        database_url=new_database(postgres),
        redis_url=redis_server.url(),
        s3_endpoint=s3_server.endpoint(),
        s3_access_key=s3_server.access_key,
        s3_secret_key=s3_server.secret_key,
    )
    stack = Stack(
        work_dir / "system",
        ports=Ports.free(),
        infra=infra,
        service_token=service_token,
        durable=False,
        env={
            "MAX_FILE_SIZE": str(SYSTEM_MAX_FILE_SIZE_MB),
            "MAX_CHAT_HISTORY_CONTEXT": "10",
            "AI_PROVIDER": "offline",
            "RATE_LIMIT_REQUESTS": "100000",
            "MAX_SOCKETS_PER_USER": "1000",
            "S3_BUCKET": "system-files",
            "LOG_LEVEL": "INFO",
        },
    )
    try:
        stack.start()
        wait_ready(stack.gateway_url, timeout=60)
    except Exception:
        for name, process in stack.services.items():
            print(f"--- {name} log ---\n{process.log_tail(80)}")
        stack.stop()
        raise
    yield stack
    stack.stop()


# The files that take longest (wall time, on a busy 2-core machine), run first: `make test` runs
# pytest-xdist with --dist loadfile --no-loadscope-reorder, which hands whole files to workers
# in collection order, and one of these started last would be the end of the run on its own.
LONGEST_FIRST = (
    "tests/faults/test_turn_faults.py",
    "tests/gateway/test_streaming.py",
    "tests/gateway/test_user_data.py",
    "tests/security/test_hostile_clients.py",
    "tests/security/test_tokens.py",
    "tests/gateway/test_balance_aware.py",
    "tests/gateway/test_limits.py",
    "tests/security/test_limits.py",
    "tests/foundation/test_run_command.py",
    "tests/gateway/test_turns.py",
    "tests/gateway/test_dependency_restarts.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::", 1)[0]
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file keeps its own order
