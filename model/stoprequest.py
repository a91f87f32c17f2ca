"""A graceful stop asked for from the user's machine, carried to the trainer through the run's bucket.

`gpt2cloud down RUN --graceful` must work for every backend (a local node, a SkyPilot cluster, a managed
job whose node SkyPilot may replace at any time) and needs no SSH into the node: the bucket is the one
place both sides already reach. So:

1. `down --graceful` writes STOP_REQUEST (gpt2cloud/store/layout.py) into the run's bucket prefix (who
   asked, when, why), writes it again while it waits, and deletes it when it is done;
2. the node's pusher (model/sync.py), which talks to the bucket every push interval anyway, reads it and
   writes OUT/MARKER (relay());
3. the trainer's stop rule asks requested(OUT) at its periodic check: it stops there with a checkpoint,
   the run script's final push carries that checkpoint, and the job ends as a finished run does.

A request written before the node came up (GPT2CLOUD_NODE_UP, less CLOCK_SKEW_S) is a leftover of an
earlier attempt (a `down --graceful` killed before it could delete it) and is ignored: that is why `down`
rewrites it while it waits, so a node that boots meanwhile (a spot recovery) sees a newer one. A marker
an earlier job left in OUT on a node that is used again (a relaunch onto a live cluster) is removed by
the pusher when it starts (clear_marker()), before the trainer starts.

    {"format": "gpt2cloud-stop-request", "who": "alice@laptop", "time": 1700000000.0,
     "reason": "gpt2cloud down --graceful"}

Only the standard library and gpt2cloud's store package: it runs on the node, and in the CLI.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import time
from pathlib import Path
from typing import Callable, Optional

from gpt2cloud.store import NoSuchObject, StorageError, atomic_write
from gpt2cloud.store.layout import STOP_REQUEST

MARKER = "stop_requested"  # in OUT: the trainer stops at its next check, with a checkpoint
FORMAT = "gpt2cloud-stop-request"
# How far the user's clock may be behind the node's before a fresh request would read as older than the
# node: NTP keeps both within a second or so; a request older than this before the node booted is not
# this node's (and `down` rewrites its request while it waits, so a late boot sees a newer one).
CLOCK_SKEW_S = 120.0


def who() -> str:
    """user@host of this machine: the request says who asked."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container): still a request
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def make(reason: str = "gpt2cloud down --graceful", now: Optional[float] = None) -> dict:
    return {"format": FORMAT, "who": who(), "time": time.time() if now is None else now, "reason": reason}


def describe(request: dict) -> str:
    """One line: "stop requested by alice@laptop at 2025-01-02 03:04:05 UTC (gpt2cloud down --graceful)"."""
    try:
        at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(request.get("time"))))
    except (TypeError, ValueError, OverflowError):
        at = "an unknown time"
    return f"stop requested by {request.get('who') or 'someone'} at {at} ({request.get('reason') or 'no reason given'})"


# ---- the bucket side: `gpt2cloud down --graceful` writes, the node's pusher reads ----

def write(store, request: dict) -> None:
    store.put_bytes(STOP_REQUEST, (json.dumps(request) + "\n").encode())


def read(store) -> Optional[dict]:
    """The run's stop request, or None (none there, or not one of ours); StorageError if the bucket fails."""
    try:
        request = json.loads(store.get_bytes(STOP_REQUEST))
    except NoSuchObject:
        return None
    except ValueError:  # half a file cannot happen (one PUT); something else's object: not a request
        return None
    return request if isinstance(request, dict) and request.get("format") == FORMAT else None


def withdraw(store) -> None:
    store.delete(STOP_REQUEST)


def is_stale(request: dict, node_up: float) -> bool:
    """Written before this node came up (less CLOCK_SKEW_S): an earlier attempt's leftover."""
    try:
        return node_up > 0 and float(request.get("time")) < node_up - CLOCK_SKEW_S
    except (TypeError, ValueError):
        return True  # no readable time: cannot be told from a leftover


def node_up_time() -> float:
    """When this node came up (the run script's GPT2CLOUD_NODE_UP); 0.0 when unknown (no filter)."""
    try:
        return float(os.environ.get("GPT2CLOUD_NODE_UP") or 0.0)
    except ValueError:
        return 0.0


def relay(store, out: str | Path, say: Optional[Callable[[str], None]] = None,
          node_up: Optional[float] = None) -> Optional[str]:
    """The pusher's part, once per push interval: a current request in the bucket becomes OUT/MARKER.
    Returns its line when it wrote the marker now (None otherwise). A bucket that cannot be read is no
    request (the push beside this says what fails): the stop is only delayed to the next interval."""
    if requested(out) is not None:
        return None  # relayed already: no need to ask the bucket again
    try:
        request = read(store)
    except StorageError:
        return None
    if request is None or is_stale(request, node_up_time() if node_up is None else node_up):
        return None
    line = describe(request)
    try:
        atomic_write(Path(out) / MARKER, json.dumps(request) + "\n")
    except OSError as e:  # (a full disk): the pusher goes on pushing; the next interval tries again
        if say is not None:
            say(f"{line}, but the marker for the trainer could not be written: {e}")
        return None
    if say is not None:
        say(f"{line}: the trainer stops at its next check, with a checkpoint")
    return line


# ---- the node side: the trainer's stop rule reads the marker ----

def requested(out: str | Path) -> Optional[str]:
    """Why the trainer should stop (one line, for its log), or None when no stop was requested."""
    path = Path(out) / MARKER
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as e:  # there but unreadable: still a request, the trainer stops
        return f"stop requested (its marker {path} could not be read: {e})"
    try:
        request = json.loads(text)
    except ValueError:
        request = None
    return describe(request) if isinstance(request, dict) else "stop requested"


def clear_marker(out: str | Path) -> None:
    """Remove a marker an earlier job left in OUT (a node used again): it is not this job's request."""
    try:
        (Path(out) / MARKER).unlink()
    except FileNotFoundError:
        pass
