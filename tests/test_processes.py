"""gpt2cloud.processes: alive() and kill_process_tree() on real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

from gpt2cloud.processes import alive, kill_process_tree, process_create_time

IGNORE_TERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"


def _wait_for_children(pid: int, n: int) -> list[psutil.Process]:
    deadline = time.time() + 30
    while time.time() < deadline:
        tree = psutil.Process(pid).children(recursive=True)
        if len(tree) >= n:
            return tree
        time.sleep(0.05)
    raise AssertionError(f"{pid} did not start {n} descendants")


def _gone(proc: psutil.Process) -> bool:
    return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE


def test_alive_running_zombie_and_reused_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        created = process_create_time(proc.pid)
        assert alive(proc.pid) and alive(proc.pid, created)
        assert not alive(proc.pid, created - 60)  # same PID, another start time: a reused PID
        proc.kill()
        deadline = time.time() + 10
        while time.time() < deadline and psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE:
            time.sleep(0.02)
        assert not alive(proc.pid, created) and not alive(proc.pid)  # a zombie is not alive
        assert proc.wait(timeout=10) == -9  # left for its parent to reap, exit status intact
    finally:
        proc.kill()
        proc.wait()


def test_kill_process_tree_reaches_other_sessions():
    """A grandchild in a session of its own (as torchrun's workers are) that ignores SIGTERM still dies."""
    child = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {IGNORE_TERM!r}], "
             "start_new_session=True); time.sleep(600)")
    parent = subprocess.Popen([sys.executable, "-c", child])
    (stubborn,) = _wait_for_children(parent.pid, 1)
    assert os.getsid(stubborn.pid) != os.getsid(parent.pid)
    started = time.monotonic()
    kill_process_tree(parent.pid, graceful_seconds=1.0)
    assert time.monotonic() - started < 8
    parent.wait(timeout=10)
    assert _gone(stubborn)


def test_graceful_shutdown_returns_early_and_sigkill_reaches_orphans():
    """SIGTERM lets a well-behaved tree exit at once; without grace, an orphan-to-be is still found."""
    sleeper = "import time; time.sleep(600)"
    child = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {sleeper!r}]); time.sleep(600)"
    parent = subprocess.Popen([sys.executable, "-c", child])
    tree = _wait_for_children(parent.pid, 1)
    started = time.monotonic()
    kill_process_tree(parent.pid, graceful_seconds=30.0)
    assert time.monotonic() - started < 10  # everything obeyed SIGTERM: no waiting out the 30 s
    parent.wait(timeout=10)
    assert all(_gone(p) for p in tree)

    own_session = child.replace("subprocess.Popen(", "subprocess.Popen(start_new_session=True, args=")
    parent = subprocess.Popen([sys.executable, "-c", own_session])
    tree = _wait_for_children(parent.pid, 1)
    kill_process_tree(parent.pid)
    assert parent.wait(timeout=10) == -9
    assert all(_gone(p) for p in tree)


def test_kill_process_tree_skips_a_reused_pid_and_a_missing_one():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        created = process_create_time(proc.pid)
        kill_process_tree(proc.pid, create_time=created - 60)  # not the process we meant
        assert alive(proc.pid, created)
        kill_process_tree(proc.pid, create_time=created)
        assert proc.wait(timeout=10) == -9
        kill_process_tree(proc.pid)  # gone (and reaped): nothing to do, no error
    finally:
        proc.kill()
        proc.wait()
