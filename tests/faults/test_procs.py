"""The /proc helpers the benchmark and the fault tests rely on: CPU of a process tree counts
children that already exited (once reaped), and a tree is killed whole even when its children
left the parent's session, as PostgreSQL's backends do."""
from __future__ import annotations

import os
import subprocess
import sys
import time

from devstack.procs import CLK_TCK, descendants, is_alive, kill_tree, tree_cpu_ticks

BURN = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"

# A parent that starts a child in a session of its own (like a postmaster's backend), then waits.
PARENT = (
    "import os, subprocess, sys, time\n"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)\n"
    "time.sleep(60)\n"
)


def test_exited_children_are_counted_through_the_parent() -> None:
    before = tree_cpu_ticks(os.getpid())
    subprocess.run([sys.executable, "-c", BURN], check=True)  # exits and is reaped by us
    spent = (tree_cpu_ticks(os.getpid()) - before) / CLK_TCK
    assert spent >= 0.25, spent


def test_kill_tree_reaches_children_in_other_sessions() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not descendants(parent.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        children = descendants(parent.pid)
        assert children, "the child did not start"
        assert os.getsid(children[0]) != os.getsid(parent.pid)
        killed = kill_tree(parent.pid)
        parent.wait(5)
        assert set(children) <= set(killed)
        assert not any(is_alive(pid) for pid in children)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(5)
