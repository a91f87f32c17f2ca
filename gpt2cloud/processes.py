"""Process trees on psutil: is a process (still the same one) alive, and end a process with everything below it.

torchrun starts each worker in a session (and process group) of its own, so neither killing a process
group nor a session reaches them; they are still descendants of torchrun by parent PID, which is what
kill_process_tree follows. It collects the tree before it signals anything: once a parent dies its
children are re-parented (to init or a subreaper) and can no longer be found from it.
"""

from __future__ import annotations

import time
from typing import Iterable, Optional

import psutil

# psutil's create_time is the start time since boot plus /proc/stat's btime, which the kernel may
# shift by a whole second (NTP adjustments); a PID reused within that long is not a practical case.
CREATE_TIME_TOLERANCE_S = 1.5


def _same(proc: psutil.Process, create_time: Optional[float]) -> bool:
    return create_time is None or abs(proc.create_time() - create_time) < CREATE_TIME_TOLERANCE_S


def process_create_time(pid: int) -> Optional[float]:
    """psutil's create_time of pid (seconds since the epoch), or None when there is no such process."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def alive(pid: int, create_time: Optional[float] = None) -> bool:
    """True if pid runs and is not a zombie; with create_time, also that it is the same process
    (a reused PID belongs to another one)."""
    try:
        proc = psutil.Process(pid)
        return _same(proc, create_time) and _running(proc)
    except psutil.Error:
        return False


def _running(proc: psutil.Process) -> bool:
    """Running (the same process, not a reused PID) and not a zombie.

    Zombies are left for their parent to reap: when that is this process, its Popen keeps the exit status.
    """
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _grow(tree: dict[int, psutil.Process]) -> bool:
    """Add the descendants of every living process in tree ({pid: Process}); True if any were new.

    Every member is a root of its own (orphans whose parent already died are still followed), and a
    child older than its parent is a reused PID, not a child.
    """
    children: dict[int, list[int]] = {}
    for proc in psutil.process_iter(["ppid"]):
        ppid = proc.info["ppid"]
        if ppid is not None:
            children.setdefault(ppid, []).append(proc.pid)
    grew = False
    todo = [p for p in tree.values() if _running(p)]
    while todo:
        parent = todo.pop()
        for pid in children.get(parent.pid, []):
            if pid in tree:
                continue
            try:
                child = psutil.Process(pid)
                if child.create_time() < parent.create_time():
                    continue
            except psutil.Error:
                continue
            tree[pid] = child
            todo.append(child)
            grew = True
    return grew


def _each(procs: Iterable[psutil.Process], action: str) -> None:
    for proc in procs:
        try:
            getattr(proc, action)()  # psutil checks the PID was not reused before it signals
        except psutil.Error:
            pass


def kill_process_tree(pid: int, graceful_seconds: float = 0.0, create_time: Optional[float] = None) -> None:
    """End pid and every process below it, torchrun workers in their own sessions included.

    graceful_seconds > 0: SIGTERM the whole tree first (the trainer saves, the pusher makes its final
    push) and wait up to that long for it to exit. Then suspend whatever is left (so nothing forks
    while we look), collect the tree again, SIGKILL all of it and wait for it to go. With create_time,
    do nothing if pid is now another process.
    """
    try:
        root = psutil.Process(pid)
        if not _same(root, create_time):
            return
    except psutil.Error:
        return
    tree = {pid: root}
    _grow(tree)
    if graceful_seconds > 0:
        _each(tree.values(), "terminate")
        deadline = time.monotonic() + graceful_seconds
        while time.monotonic() < deadline:
            _grow(tree)  # a process may fork while it shuts down
            if not any(_running(p) for p in tree.values()):
                break
            time.sleep(0.1)
    while True:
        _each([p for p in tree.values() if _running(p)], "suspend")
        if not _grow(tree):
            break
    procs = list(tree.values())
    _each(procs, "kill")  # SIGKILL ends a stopped process too
    # Wait until each is gone or a zombie: a zombie whose new parent never reaps it (a container's
    # PID 1 may not) holds no resources, and waiting for it would only burn the timeout.
    deadline = time.monotonic() + 5
    while any(_running(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
