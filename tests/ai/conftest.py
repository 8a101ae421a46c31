"""Fixtures for the AI service tests (helpers in ai_helpers.py)."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .ai_helpers import Recorded, Reply, StandIn, base_settings, running_ai


@pytest.fixture
def stand_in() -> Iterator[Callable[[Callable[[Recorded], Reply]], StandIn]]:
    """``stand_in(respond)`` starts a stand-in server; all are stopped after the test."""
    started: list[StandIn] = []

    def start(respond: Callable[[Recorded], Reply]) -> StandIn:
        server = StandIn(respond).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def file_host(stand_in: Callable[[Callable[[Recorded], Reply]], StandIn]) -> Callable[[dict[str, Reply]], StandIn]:
    """``file_host({path: Reply})`` serves fixed files; other paths answer 404."""

    def start(files: dict[str, Reply]) -> StandIn:
        return stand_in(lambda request: files.get(request.path, Reply(404, "no such file")))

    return start


@pytest.fixture
def ai() -> Callable[..., contextlib.AbstractAsyncContextManager]:
    """``async with ai(**settings) as (stub, channel, port)``: the service on a free port."""

    def make(**overrides: Any) -> contextlib.AbstractAsyncContextManager:
        return running_ai(base_settings(**overrides))

    return make
