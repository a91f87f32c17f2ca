"""gpt2cloud's own directory on this machine: `$GPT2CLOUD_HOME`, default ~/.gpt2cloud.

    runs/RUN.json          the run registry (gpt2cloud/runs/registry.py)
    builds/RUN/            the wheel, config.json and task.yaml shipped to a run's node (gpt2cloud/launch/build.py)
    local/RUN/             an `--infra local` run's node (gpt2cloud/backends/local.py)
    cache/val/             validation shards `gpt2cloud eval --val URL` downloaded
    calibration.jsonl      MFU points measured by this user's finished runs (`gpt2cloud report`)
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
import uuid
from pathlib import Path

from gpt2cloud.errors import UserError


def home() -> Path:
    return Path(os.environ.get("GPT2CLOUD_HOME") or Path.home() / ".gpt2cloud")


def _name() -> str:
    return f"$GPT2CLOUD_HOME ({home()})" if os.environ.get("GPT2CLOUD_HOME") else f"{home()} (~/.gpt2cloud)"


def unusable(e: OSError) -> UserError:
    """The one line for a home this machine cannot write (a file, under a file, read only, ...)."""
    what = e.strerror or type(e).__name__
    return UserError(f"{_name()} cannot be used: {what}{f': {e.filename}' if e.filename else ''}; point "
                     "GPT2CLOUD_HOME at a writable directory (e.g. export GPT2CLOUD_HOME=~/.gpt2cloud) or fix "
                     "its permissions")


def check_usable(write: bool = True) -> Path:
    """Fail before anything is written anywhere (bucket included) if the home cannot hold the registry.

    write=False (commands that only read it): a missing home is fine, one that is (or is below) a file
    is not.
    write=True: create the home and a probe file in it (O_EXCL, then removed): a permission check alone
    says yes to root on a read-only directory, while a real create fails on a read-only file system,
    under a regular file or in /proc."""
    h = home()
    if not write:
        # the home, or the first of its parents that exists (a home not made yet), is a directory
        there = next((p for p in (h, *h.parents) if p.exists()), Path("/"))
        if not there.is_dir():
            raise unusable(NotADirectoryError(20, "not a directory", str(there)))
        return h
    probe = h / f".probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        h.mkdir(parents=True, exist_ok=True)
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as e:
        raise unusable(e) from None
    return h


def runs_dir() -> Path:
    return home() / "runs"


def build_dir(run_id: str) -> Path:
    return home() / "builds" / run_id


def local_node_dir(run_id: str) -> Path:
    return home() / "local" / run_id


def val_cache_dir() -> Path:
    return home() / "cache" / "val"


def user_calibration_path() -> Path:
    return home() / "calibration.jsonl"


def lock_exclusive(fd: int, wait_s: float, busy: str) -> None:
    """flock `fd` exclusively among gpt2cloud processes (the registry's records, the config file), retrying
    for at most wait_s: every wait is bounded. UserError(busy) when another holds it longer."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                raise UserError(busy) from None
            time.sleep(0.05)
