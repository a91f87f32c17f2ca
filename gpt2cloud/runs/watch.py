"""`gpt2cloud status RUN --watch`: one run's status read again every interval until the run ends.

A refresh is status's own read (status.read_status: the backend's state, the bucket's metrics, timeline and
push_status) turned into a Frame: what the view shows, plus the node's phase in one word and the train
loss for its curve. The loop is thin and takes its clock and sleep as arguments, so tests drive it
without waiting; the CLI (gpt2cloud/cli/status.py) only draws frames.

Each refresh runs on a daemon thread and is waited for at most REFRESH_BOUND_S: the bucket's reads have
their own timeouts, but a SkyPilot API server that never answers must not freeze the view or keep Ctrl-C
waiting. A refresh that fails or runs late leaves the last figures on screen with the error beside them,
and the watch goes on.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

from gpt2cloud.backends import MAY_BE_ALIVE
from gpt2cloud.errors import UserError, positive
from gpt2cloud.names import UNKNOWN
from gpt2cloud.store import StorageError

DEFAULT_INTERVAL_S = 30.0
# Each refresh asks SkyPilot's API server and reads the bucket: more often than this only loads both
MIN_INTERVAL_S = 5.0
MAX_INTERVAL_S = 3600.0
# A refresh that has not answered in this long is reported as late (SkyPilot's status call takes seconds)
REFRESH_BOUND_S = 120.0

# The node's phases in one word each, by the timeline's last event (model/metrics.py NODE_EVENTS)
PHASE_AFTER = {"node_up": "setup", "setup": "pulling", "pull": "data", "data": "training",
               "train_start": "training", "train_end": "final push", "final_push": "final push"}
ENDED = "ended"
SPARK = "▁▂▃▄▅▆▇█"


@dataclass
class Frame:
    """What one refresh shows. On a failed refresh, the last good figures with `error` set."""

    run: str
    at: float  # when the refresh ended (the watch's clock)
    status: Optional[dict] = None  # run_status's dict; None until a refresh worked
    losses: list = field(default_factory=list)  # the train loss per step, for the curve
    phase: str = "setup"  # setup, pulling, data, training, final push or ended
    ended: bool = False
    error: Optional[str] = None


def check_interval(seconds: float) -> float:
    """--interval: a finite number of seconds from MIN_INTERVAL_S to MAX_INTERVAL_S, else a UserError."""
    positive("--interval", seconds, "30", upper=MAX_INTERVAL_S)
    if seconds < MIN_INTERVAL_S:
        raise UserError(f"--interval {seconds:g}: must be at least {MIN_INTERVAL_S:g} s (each refresh asks the "
                        "backend and reads the bucket), e.g. --interval 30")
    return float(seconds)


def is_over(state: str) -> bool:
    """The run has ended: its backend says neither under way nor unknown (an UNKNOWN state may be SkyPilot's
    API server failing for a moment: the watch goes on)."""
    return state not in MAY_BE_ALIVE and not state.startswith(UNKNOWN)


def node_phase(d: dict) -> str:
    """The node's phase in one word, from what status read: the backend's state (ended), the trainer's
    stop in the bucket (the node's final push follows it) and the timeline's last event; before the
    node's first event, setup (SkyPilot provisions and sets it up)."""
    from model.metrics import NODE_EVENTS  # here: the CLI imports this module for --help's defaults

    if is_over(d["state"]):
        return ENDED
    if d.get("phase") == "finished":  # the trainer stopped; the node pushes its last work and exits
        return "final push"
    words = {NODE_EVENTS[e]: word for e, word in PHASE_AFTER.items() if e in NODE_EVENTS}
    if d.get("phase") in words:
        return words[d["phase"]]
    if d.get("phase"):  # an event this module does not know yet: the timeline's own words
        return str(d["phase"])
    return "training" if d.get("step") is not None else "setup"


def sparkline(values: list, width: int = 40) -> str:
    """The values as at most `width` block characters, each the mean of its share of the values, scaled
    from the lowest to the highest (non-finite values, a diverging step's, are left out)."""
    values = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not values or width < 1:
        return ""
    n = min(width, len(values))
    means = []
    for i in range(n):
        chunk = values[i * len(values) // n:(i + 1) * len(values) // n]
        means.append(sum(chunk) / len(chunk))
    low, high = min(means), max(means)
    if high - low < 1e-12:
        return SPARK[len(SPARK) // 2] * n
    return "".join(SPARK[min(len(SPARK) - 1, int((m - low) / (high - low) * len(SPARK)))] for m in means)


def read_frame(run_id: str, clock: Callable[[], float] = time.time) -> Frame:
    """One refresh, as `gpt2cloud status RUN` reads the run (its record read again: a relaunch moves it)."""
    from gpt2cloud.runs import registry
    from gpt2cloud.runs.status import read_status

    d, metrics = read_status(registry.get(run_id))
    return Frame(run=run_id, at=clock(), status=d, losses=[r["loss"] for r in metrics.train],
                 phase=node_phase(d), ended=is_over(d["state"]))


class Refresh:
    """One refresh on a daemon thread: a call SkyPilot never answers is left behind rather than waited on
    (and does not keep the process from exiting)."""

    def __init__(self, read: Callable[[], Frame]):
        self.frame: Optional[Frame] = None
        self.error: Optional[BaseException] = None
        self.done = threading.Event()
        threading.Thread(target=self._run, args=(read,), daemon=True, name="status-watch").start()

    def _run(self, read: Callable[[], Frame]) -> None:
        try:
            self.frame = read()
        except Exception as e:  # noqa: BLE001 - any failure is shown in the view, and the watch goes on
            self.error = e
        finally:
            self.done.set()


def outcome(refresh: Refresh, last: Optional[Frame], run_id: str, now: float, bound: float) -> Frame:
    """The refresh's frame once it answers within `bound` s; else the last figures with the error."""
    if refresh.done.wait(bound) and refresh.frame is not None:
        return refresh.frame
    if refresh.error is None:
        error = f"no answer within {bound:g} s (SkyPilot's API server or the bucket is slow); still waiting for it"
    elif isinstance(refresh.error, (UserError, StorageError)):  # already one line saying what failed
        error = str(refresh.error)
    else:
        error = f"{type(refresh.error).__name__}: {(str(refresh.error).splitlines() or [''])[0]}"
    return replace(last or Frame(run=run_id, at=now), at=now, error=error, ended=False)


def watch(run_id: str, interval: float, show: Callable[[Frame], None], *, sleep: Callable[[float], None] = time.sleep,
          clock: Callable[[], float] = time.time, bound: float = REFRESH_BOUND_S,
          read: Callable[[str, Callable[[], float]], Frame] = read_frame) -> Frame:
    """Show a frame every `interval` s until the run ends; returns the last frame (its final status).
    A refresh still running from the last round is waited on again rather than started twice."""
    last: Optional[Frame] = None
    refresh: Optional[Refresh] = None
    while True:
        if refresh is None or refresh.done.is_set():
            refresh = Refresh(lambda: read(run_id, clock))
        last = outcome(refresh, last, run_id, clock(), bound)
        show(last)
        if last.ended:
            return last
        sleep(interval)
