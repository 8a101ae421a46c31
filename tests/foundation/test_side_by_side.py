"""devstack starts and stops the parts of a stack side by side: every call runs at once, all of
them finish even when one fails, and then the first failure is raised."""
from __future__ import annotations

import threading

import pytest

from devstack.stack import side_by_side


def test_the_calls_run_at_the_same_time() -> None:
    barrier = threading.Barrier(3, timeout=10)  # broken (an error) unless all three wait together
    side_by_side(barrier.wait, barrier.wait, barrier.wait)


def test_a_failure_is_raised_after_every_other_call_has_finished() -> None:
    finished: list[str] = []
    gate = threading.Event()

    def fails() -> None:
        raise RuntimeError("first part failed to start")

    def slow() -> None:
        gate.wait(10)
        finished.append("slow")

    def opens_the_gate() -> None:
        gate.set()
        finished.append("fast")

    with pytest.raises(RuntimeError, match="first part failed"):
        side_by_side(fails, slow, opens_the_gate)
    assert sorted(finished) == ["fast", "slow"]


def test_nothing_to_run_is_fine() -> None:
    side_by_side()
