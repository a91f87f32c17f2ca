"""gpt2cloud.processes: alive() and kill_process_tree() on real processes.

Every process a test starts goes through the `spawn` fixture, which marks it (and, by inheritance,
everything it starts) with an environment variable of its own, and SIGKILLs whatever carries the mark
when the test ends, passed or failed: no 600-second sleeper outlives its test, orphans included.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import psutil
import pytest

from gpt2cloud.processes import alive, kill_process_tree, process_create_time

IGNORE_TERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
SLEEPER = "import time; time.sleep(600)"
MARK = "GPT2CLOUD_TEST_PROCESS"


def _marked(tag: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARK) == tag:
                found.append(proc)
        except psutil.Error:  # gone meanwhile, or not ours to read
            continue
    return found


def _kill_marked(tag: str) -> list[int]:
    """SIGKILL every process carrying the mark; the PIDs of those still running afterwards (zombies aside)."""
    for proc in _marked(tag):
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    deadline = time.time() + 10
    while True:
        left = [p.pid for p in _marked(tag) if not _gone(p)]
        if not left or time.time() > deadline:
            return left
        time.sleep(0.05)


@pytest.fixture
def spawn():
    """spawn(code) -> Popen of `python -c code`; at teardown every process carrying this test's mark
    (spawn.tag) dies, and is reaped if it is ours."""
    tag = uuid.uuid4().hex
    started: list[subprocess.Popen] = []

    def start(code: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, MARK: tag})
        started.append(proc)
        return proc

    start.tag = tag
    yield start
    left = _kill_marked(tag)
    for proc in started:
        proc.kill()
        proc.wait(timeout=10)
    assert not left, f"processes left running: {left}"


def _wait_for_children(pid: int, n: int) -> list[psutil.Process]:
    deadline = time.time() + 30
    while time.time() < deadline:
        tree = psutil.Process(pid).children(recursive=True)
        if len(tree) >= n:
            return tree
        time.sleep(0.05)
    raise AssertionError(f"{pid} did not start {n} descendants")


def _gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_alive_running_zombie_and_reused_pid(spawn):
    proc = spawn(SLEEPER)
    created = process_create_time(proc.pid)
    assert alive(proc.pid) and alive(proc.pid, created)
    assert not alive(proc.pid, created - 60)  # same PID, another start time: a reused PID
    proc.kill()
    deadline = time.time() + 10
    while time.time() < deadline and psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.02)
    assert not alive(proc.pid, created) and not alive(proc.pid)  # a zombie is not alive
    assert proc.wait(timeout=10) == -9  # left for its parent to reap, exit status intact


def test_kill_process_tree_reaches_other_sessions(spawn):
    """A grandchild in a session of its own (as torchrun's workers are) that ignores SIGTERM still dies."""
    parent = spawn(f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {IGNORE_TERM!r}], "
                   "start_new_session=True); time.sleep(600)")
    (stubborn,) = _wait_for_children(parent.pid, 1)
    assert os.getsid(stubborn.pid) != os.getsid(parent.pid)
    kill_process_tree(parent.pid, graceful_seconds=1.0)
    parent.wait(timeout=10)
    assert _gone(stubborn)


def test_graceful_shutdown_returns_early_and_sigkill_reaches_orphans(spawn):
    """SIGTERM lets a well-behaved tree exit at once; without grace, an orphan-to-be is still found."""
    child = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {SLEEPER!r}]); time.sleep(600)"
    parent = spawn(child)
    tree = _wait_for_children(parent.pid, 1)
    started = time.monotonic()
    kill_process_tree(parent.pid, graceful_seconds=30.0)
    # everything obeyed SIGTERM: kill_process_tree returned without waiting out its 30 s of grace
    assert time.monotonic() - started < 25
    assert parent.wait(timeout=10) == -signal.SIGTERM
    assert all(_gone(p) for p in tree)

    own_session = child.replace("subprocess.Popen(", "subprocess.Popen(start_new_session=True, args=")
    parent = spawn(own_session)
    tree = _wait_for_children(parent.pid, 1)
    kill_process_tree(parent.pid)
    assert parent.wait(timeout=10) == -9
    assert all(_gone(p) for p in tree)


def test_kill_process_tree_skips_a_reused_pid_and_a_missing_one(spawn):
    proc = spawn(SLEEPER)
    created = process_create_time(proc.pid)
    kill_process_tree(proc.pid, create_time=created - 60)  # not the process we meant
    assert alive(proc.pid, created)
    kill_process_tree(proc.pid, create_time=created)
    assert proc.wait(timeout=10) == -9
    kill_process_tree(proc.pid)  # gone (and reaped): nothing to do, no error


def test_spawn_fixture_reaches_orphans(spawn):
    """The fixture's own guarantee: a grandchild whose parent already exited is still found and killed."""
    parent = spawn(f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {SLEEPER!r}], "
                   "start_new_session=True)")  # exits at once, leaving its child to init
    assert parent.wait(timeout=30) == 0
    deadline = time.time() + 30
    while time.time() < deadline and not [p for p in _marked(spawn.tag) if p.pid != parent.pid]:
        time.sleep(0.05)
    (orphan,) = [p for p in _marked(spawn.tag) if p.pid != parent.pid]
    assert orphan.ppid() != parent.pid and not _gone(orphan)
    assert _kill_marked(spawn.tag) == [] and _gone(orphan)
