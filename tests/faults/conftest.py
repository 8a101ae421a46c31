"""One stack for the fault scenarios, with its own PostgreSQL (durable: a SIGKILLed cluster must
come back with every commit) and Redis, since both get killed; the S3 store is the shared one
(nothing here kills it). Each scenario starts again whatever a previous one left dead; teardown
stops everything and SIGKILLs whatever did not stop."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.servers import S3Server
from devstack.stack import Infrastructure, Ports, Stack, wait_ready

from .fault_support import FAULT_ENV


@pytest.fixture(scope="module")
def fault_stack(work_dir: Path, s3_server: S3Server) -> Iterator[Stack]:
    infra = Infrastructure(
        s3_endpoint=s3_server.endpoint(), s3_access_key=s3_server.access_key,
        s3_secret_key=s3_server.secret_key,
    )
    stack = Stack(work_dir / "faults", ports=Ports.free(), infra=infra, durable=True, env=dict(FAULT_ENV))
    try:
        stack.start()
        wait_ready(stack.gateway_url, timeout=60)
    except Exception:
        for name, part in stack.parts().items():
            print(f"--- {name} log ---\n{part.log_tail(60)}")
        stack.kill_everything()
        raise
    try:
        yield stack
    finally:
        try:
            stack.stop()
        finally:
            stack.kill_everything()
