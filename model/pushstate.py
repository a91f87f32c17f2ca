"""How the node's pushes to the bucket are going: OUT/push_status.json.

The pusher (model/sync.py) records every periodic push, whether it worked, and pushes the file last, so
the bucket's copy says when the node last saved its work. Two readers:
- the trainer (a stop rule): when pushes keep failing longer than it can afford to lose, it stops with a
  checkpoint rather than train on work that cannot be saved;
- `gpt2cloud status`: a bucket copy older than one push interval and a minute means the node's newest
  work is only on the node.

    {"time": T, "every": 60, "last_ok": T0 | null, "failing_since": T1 | null, "failures": 3, "last_error": "..."}
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from gpt2cloud.store import StorageError, atomic_write
from gpt2cloud.store.layout import PUSH_STATUS

ERROR_CHARS = 300  # an error's first characters: enough to say what failed, short enough for `status`


def record(out: str | Path, ok: bool, every: float, error: str = "", now: Optional[float] = None) -> dict:
    """Note one push attempt in OUT/push_status.json (atomic: readers never see half a file)."""
    now = time.time() if now is None else now
    prev = read(out) or {}
    if ok:
        status = {"time": now, "every": every, "last_ok": now, "failing_since": None, "failures": 0, "last_error": ""}
    else:
        status = {"time": now, "every": every, "last_ok": prev.get("last_ok"),
                  "failing_since": prev.get("failing_since") or now, "failures": int(prev.get("failures", 0)) + 1,
                  "last_error": str(error)[:ERROR_CHARS]}
    atomic_write(Path(out) / PUSH_STATUS, json.dumps(status) + "\n")
    return status


def read(out: str | Path) -> Optional[dict]:
    """The recorded status, or None (no pusher here: a local `train`, or nothing pushed yet)."""
    try:
        status = json.loads((Path(out) / PUSH_STATUS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None


def read_store(store) -> Optional[dict]:
    """The copy the pusher pushed to the run's bucket (a Store), or None (none yet, or unreadable)."""
    try:
        status = json.loads(store.get_bytes(PUSH_STATUS)) if store.exists(PUSH_STATUS) else None
    except (StorageError, ValueError):
        return None
    return status if isinstance(status, dict) else None


def failing_seconds(status: Optional[dict], now: Optional[float] = None) -> float:
    """How long pushes have been failing without a success in between (0 when the last one worked)."""
    if not status or not status.get("failing_since"):
        return 0.0
    return max(0.0, (time.time() if now is None else now) - float(status["failing_since"]))


def unsaved_seconds(out: str | Path, started: float, now: float) -> float:
    """How long a node's work has not been reaching the bucket, counted from `started` (the trainer's start)
    at the earliest: pushes failing, and also a pusher that has written nothing since then (it never started,
    or died: its first push comes within seconds) or has gone quiet for longer than its interval (it hangs).
    A status written before `started` may be an earlier job's on the same node: it does not count."""
    status = read(out)
    since_start = max(0.0, now - started)
    try:
        written = float(status.get("time") or 0.0) if status else 0.0
        if written < started:
            return since_start
        quiet = now - written - float(status.get("every") or 0.0)
        return min(max(failing_seconds(status, now), quiet, 0.0), since_start)
    except (TypeError, ValueError, AttributeError):  # a status of another shape: as if none was written
        return since_start
