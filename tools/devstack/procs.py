"""Processes by pid from /proc (Linux): a process's descendants, the CPU it and its children used,
and killing a whole tree. PostgreSQL backends call setsid(), so they are not in the postmaster's
process group: a tree is found by parent pid, not by group.

CPU is read from /proc/PID/stat: utime+stime of the process itself and cutime+cstime of the
children it has reaped (so a backend that exited during a measurement is still counted, in its
parent's cutime/cstime), in clock ticks of ``os.sysconf('SC_CLK_TCK')``.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuTicks:
    own: int  # utime + stime
    reaped: int  # cutime + cstime (children that exited and were waited for)

    @property
    def total(self) -> int:
        return self.own + self.reaped


def stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (field 3, the state, is index 0)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read().decode(errors="replace")
    except OSError:
        return None
    return raw[raw.rfind(")") + 2:].split()


def cpu_ticks(pid: int) -> CpuTicks | None:
    fields = stat_fields(pid)
    if fields is None or len(fields) < 15:
        return None
    # stat fields 14..17 (1-based) are utime, stime, cutime, cstime; index = field - 3.
    utime, stime, cutime, cstime = (int(fields[i]) for i in (11, 12, 13, 14))
    return CpuTicks(utime + stime, cutime + cstime)


def parent_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = stat_fields(int(name))
        if fields is None or len(fields) < 2:
            continue
        children.setdefault(int(fields[1]), []).append(int(name))
    return children


def descendants(pid: int, tree: dict[int, list[int]] | None = None) -> list[int]:
    tree = parent_map() if tree is None else tree
    found: list[int] = []
    stack = list(tree.get(pid, ()))
    while stack:
        child = stack.pop()
        found.append(child)
        stack.extend(tree.get(child, ()))
    return found


def is_alive(pid: int) -> bool:
    fields = stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def tree_cpu_ticks(pid: int, tree: dict[int, list[int]] | None = None) -> int:
    """CPU ticks of ``pid`` and everything under it: its own, its reaped children's, and every
    live descendant's own + reaped. The difference of two readings is the CPU the tree spent
    between them, also counting descendants that exited in between (once reaped by ``pid``)."""
    tree = parent_map() if tree is None else tree
    total = 0
    for member in (pid, *descendants(pid, tree)):
        ticks = cpu_ticks(member)
        if ticks is not None:
            total += ticks.total
    return total


def kill_tree(pid: int, *, timeout: float = 10.0) -> list[int]:
    """SIGKILL ``pid`` and all its descendants (found before the kill: once the parent is gone
    they are re-parented), then wait until none is left. Returns the pids killed."""
    members = [pid, *descendants(pid)]
    for member in members:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(is_alive(member) for member in members):
            break
        time.sleep(0.05)
    return members


__all__ = ["CLK_TCK", "CpuTicks", "cpu_ticks", "descendants", "is_alive", "kill_tree", "parent_map",
           "tree_cpu_ticks"]
