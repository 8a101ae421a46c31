"""Memory stays bounded whatever the body size: the peak resident size (VmHWM) of the gateway
and files service processes barely moves while a body many times the limit streams through.

Both processes are started fresh for this module, so their peaks are their own (a peak left
by another module's traffic would hide growth)."""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

import httpx
import pytest

from devstack.servers import ServiceProcess
from devstack.stack import Stack

from .gateway_helpers import (
    CONTENT_TYPE,
    form_fields,
    repeated,
    start_pair,
    stop_pair,
    streamed_body,
)

MB = 1024 * 1024
# What a process may grow by: a few chunks in flight, plus (files service) the one S3 part
# minio builds in memory (5 MiB, copied once when it is cut).
GROWTH_BOUND = 15 * MB


def peak_rss(process: ServiceProcess) -> int:
    assert process.process is not None
    with open(f"/proc/{process.process.pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


@pytest.fixture(scope="module")
def small_limit(system: Stack) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    gateway, files = start_pair(system, "mem-small", {"MAX_FILE_SIZE": "2", "USER_STORAGE_QUOTA_MB": "1000"})
    yield gateway, files
    stop_pair(system, "mem-small")


@pytest.fixture(scope="module")
def large_limit(system: Stack) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    gateway, files = start_pair(system, "mem-large", {"MAX_FILE_SIZE": "64", "USER_STORAGE_QUOTA_MB": "1000"})
    yield gateway, files
    stop_pair(system, "mem-large")


async def warm_up(client: httpx.AsyncClient, user: str, pair: tuple[ServiceProcess, ServiceProcess],
                  sizes: tuple[int, ...] = (10, 300_000)) -> None:
    """Run every code path once so imports, pools, threads and caches are in the baseline."""
    for size in sizes:
        response = await client.post(
            "/upload",
            content=streamed_body(form_fields(user), "warm.txt", text_chunks(size)),
            headers={"content-type": CONTENT_TYPE},
        )
        assert response.status_code == 202, (response.text, pair[0].log_tail(10), pair[1].log_tail(10))
        assert (await client.get(f"/uploads/{response.json()['data']['fileName']}")).status_code == 200


def text_chunks(total: int, chunk: int = 256 * 1024) -> Iterable[bytes]:
    line = b"All work and no play makes Jack a dull boy.\n"
    return repeated((line * (chunk // len(line) + 1))[:chunk], total)


async def test_a_body_twenty_times_the_limit_is_refused_with_bounded_memory(
    system: Stack, small_limit: tuple[ServiceProcess, ServiceProcess]
) -> None:
    gateway, files = small_limit
    user = system.create_user("Memory")
    async with httpx.AsyncClient(base_url=gateway.url, timeout=120) as client:
        await warm_up(client, user, small_limit)
        before = {"gateway": peak_rss(gateway), "files": peak_rss(files)}
        response = await client.post(
            "/upload",
            content=streamed_body(form_fields(user), "huge.txt", text_chunks(40 * MB)),
            headers={"content-type": CONTENT_TYPE},
        )
        after = {"gateway": peak_rss(gateway), "files": peak_rss(files)}
    assert response.status_code == 413, response.text
    assert "2 MB" in response.json()["message"]
    for name in before:
        growth = after[name] - before[name]
        print(f"{name}: peak RSS {before[name] / MB:.1f} MB -> {after[name] / MB:.1f} MB")
        assert growth < GROWTH_BOUND, f"{name} peak RSS grew by {growth / MB:.1f} MB"


async def test_a_large_accepted_upload_streams_through_with_bounded_memory(
    system: Stack, large_limit: tuple[ServiceProcess, ServiceProcess]
) -> None:
    gateway, files = large_limit
    user = system.create_user("Memory")
    size = 60 * MB
    expected = hashlib.sha256()
    for chunk in text_chunks(size):
        expected.update(chunk)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=300) as client:
        # The warm-up includes a multipart S3 upload (11 MB: three parts), so the baseline
        # already holds what one upload needs whatever its size (minio keeps up to three
        # 5 MiB part buffers: the part being sent, the next one, and its one-byte-shifted
        # copy). A 60 MB upload must not add to that; a buffered body would add ~60 MB.
        await warm_up(client, user, large_limit, (10, 300_000, 11 * MB))
        before = {"gateway": peak_rss(gateway), "files": peak_rss(files)}
        response = await client.post(
            "/upload",
            content=streamed_body(form_fields(user), "large.txt", text_chunks(size)),
            headers={"content-type": CONTENT_TYPE},
        )
        assert response.status_code == 202, response.text
        info = response.json()["data"]
        got = hashlib.sha256()
        received = 0
        async with client.stream("GET", f"/uploads/{info['fileName']}") as download:
            assert download.status_code == 200
            async for chunk in download.aiter_raw():
                got.update(chunk)
                received += len(chunk)
        after = {"gateway": peak_rss(gateway), "files": peak_rss(files)}
    assert info["size"] == size and info["sha256"] == expected.hexdigest()
    assert received == size and got.hexdigest() == expected.hexdigest()
    for name in before:
        growth = after[name] - before[name]
        print(f"{name}: peak RSS {before[name] / MB:.1f} MB -> {after[name] / MB:.1f} MB")
        assert growth < GROWTH_BOUND, f"{name} peak RSS grew by {growth / MB:.1f} MB"
