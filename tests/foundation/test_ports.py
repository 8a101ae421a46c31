"""Free ports for the local servers: under pytest-xdist each worker draws from a block of its
own below the kernel's ephemeral range, skips a port something already listens on, and never
hands out one port twice."""
from __future__ import annotations

import socket

import pytest

from devstack import servers
from devstack.servers import WORKER_PORT_BASE, WORKER_PORT_BLOCK, free_port


def test_a_worker_draws_only_from_its_own_block(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(servers, "_reserved_ports", set())
    blocks = {}
    for worker in ("gw0", "gw3"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        blocks[worker] = [free_port() for _ in range(20)]
    for worker, ports in blocks.items():
        start = WORKER_PORT_BASE + int(worker[2:]) * WORKER_PORT_BLOCK
        assert all(start <= port < start + WORKER_PORT_BLOCK for port in ports), (worker, ports)
        assert len(set(ports)) == len(ports)
    assert not set(blocks["gw0"]) & set(blocks["gw3"])


def test_a_port_in_use_is_skipped_and_the_offset_port_is_free_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(servers, "_reserved_ports", set())
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    block = range(WORKER_PORT_BASE + WORKER_PORT_BLOCK, WORKER_PORT_BASE + 2 * WORKER_PORT_BLOCK)
    # two ports of gw1's block that are free now (a real gw1 worker may hold others)
    taken, wanted = [port for port in block if servers.port_is_free(port)][:2]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", taken))  # this one is drawn first, then again, then the other
        busy.listen()
        draws = iter([block.index(taken), block.index(taken), block.index(wanted)])
        monkeypatch.setattr(servers.secrets, "randbelow", lambda _n: next(draws))
        assert free_port() == wanted
    monkeypatch.undo()

    monkeypatch.setattr(servers, "_reserved_ports", set())
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw2")
    port = free_port(also_free_offset=10000)
    assert servers.port_is_free(port) and servers.port_is_free(port + 10000)


def test_outside_xdist_the_kernel_picks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(servers, "_reserved_ports", set())
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    ports = [free_port() for _ in range(10)]
    assert len(set(ports)) == 10
    assert all(servers.port_is_free(port) for port in ports)
