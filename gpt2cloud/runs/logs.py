"""`gpt2cloud logs` and `down`: a run's console output, and stopping everything that bills for it.

`down --graceful` asks the node to stop first, through the run's bucket (model/stoprequest.py: the node's
pusher relays the request to the trainer, which stops with a checkpoint; the final push carries it), waits
a bounded time for the job to end, then tears down as plain `down` does. Plain `down` (and a graceful one
whose wait ran out) says what the node may have held that the bucket does not: the work since the
bucket's newest checkpoint.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Callable, Optional

from gpt2cloud.backends import ACTIVE_STATES, backend_for, state_of
from gpt2cloud.errors import UserError
from gpt2cloud.names import DOWN, UNKNOWN
from gpt2cloud.runs import registry
from gpt2cloud.store import StorageError, open_store
from gpt2cloud.store.layout import LOGS, remote_checkpoints
from model import pushstate, stoprequest

# How the backends' stop() ends when nothing was there to stop (see backends/*.py)
NOTHING_TO_STOP = ("it was not running", "its cluster was already gone", "(SkyPilot's jobs controller is not up)",
                   "was in progress")


def print_bucket_logs(run_url: str) -> bool:
    """Print the node logs the pusher put in the bucket; False if there are none."""
    try:
        store = open_store(run_url)
        keys = sorted(o.key for o in store.list(f"{LOGS}/") if o.key.endswith(".log"))
        for key in keys:
            if len(keys) > 1:
                sys.stdout.write(f"==> {store.url_for(key)} <==\n")
            sys.stdout.write(store.get_bytes(key).decode("utf-8", "replace"))
    except StorageError:
        return False
    return bool(keys)


def show_logs(run_id: str, follow: bool) -> int:
    """Print the run's console output from its backend, else the copy in its bucket; the exit code."""
    record = registry.get(run_id)
    try:
        return backend_for(record.spec.kind).logs(record, follow)
    except UserError as e:
        # The cluster is gone (autostop down after the run): the pusher's copy in the bucket remains.
        if print_bucket_logs(record.spec.run_url):
            print(f"(from the bucket: {e})", file=sys.stderr)
            return 0
        raise UserError(f"{e}; and there are no logs in {record.spec.run_url}/{LOGS}/ yet") from None


def stop_run(run_id: str, graceful: bool = False, wait_minutes: Optional[float] = None,
             say: Callable[[str], None] = print) -> dict:
    """Stop the run's cluster, managed job or local process tree; the bucket keeps its checkpoints. A
    SkyPilot run's backend cancels every launch request and managed job of every attempt still under way
    (a launch killed with -9 included) and says which. graceful: first let the trainer stop with a
    checkpoint and the node push it (stop_gracefully), for at most wait_minutes.

    A run whose record is missing or damaged is stopped all the same (found from what exists); no record
    is written for it then (a damaged one stays as it is)."""
    record = registry.get(run_id)
    was_down = record.state == DOWN
    gentle = stop_gracefully(record, wait_minutes, say) if graceful else None
    what = backend_for(record.spec.kind).stop(record)
    unrecorded = None
    if not (was_down and what.endswith(NOTHING_TO_STOP)):  # a rerun of `down` changes nothing
        try:
            registry.note(record, f"down: {what}", state=DOWN)
        except (UserError, OSError) as e:  # stopped all the same: say the record still shows the old state
            unrecorded = f"stopped, but its record was not updated ({e})"
    d = {"run": run_id, "state": DOWN, "action": what, "run_url": record.spec.run_url or "its bucket"}
    if gentle is not None:
        d["graceful"] = gentle
    ended = bool(gentle and gentle.get("ended"))
    if not what.endswith(NOTHING_TO_STOP) or (gentle and not ended):  # it was running: what the node held
        lost = may_lose(record, ended)
        if lost:
            d["may_lose"] = lost
    notes = [n for n in (record.recovered, unrecorded) if n]
    if notes:
        d["note"] = "; ".join(notes)
    return d


# ---- down --graceful ----

POLL_S = 5.0  # how often the wait asks the backend whether the job has ended
REFRESH_S = 60.0  # how often it writes the request again (a node that boots meanwhile must see a newer one)
MAX_WAIT_MINUTES = 24 * 60.0  # --wait-minutes: bounded, like every wait
# Beyond the estimate's figures: the job's exit reaching SkyPilot's job table, torchrun's teardown, a check
# that comes late because an evaluation runs first
GRACE_SLACK_S = 120.0


def default_wait_minutes(record) -> float:
    """How long `down --graceful` waits by default: the pusher's next look at the bucket (a push interval);
    the trainer's next check (at most two steps off: the one in flight and the next); writing the
    checkpoint; the trainer's exit and the final push of that checkpoint (the estimate's finish phase);
    and GRACE_SLACK_S. A run without an estimate (its record rebuilt) gets 10 minutes for the middle part."""
    from gpt2cloud.cost.estimate import GIB
    from gpt2cloud.cost.phases import defaults

    est = record.spec.estimate
    if est is None:
        middle = 600.0
    else:
        # a checkpoint holds the fp32 weights and the optimizer's state: the estimate's memory has both
        ckpt_bytes = (est.memory.get("weights_gib", 0.0) + est.memory.get("optimizer_gib", 0.0)) * GIB
        write_s = ckpt_bytes / (defaults(record.spec.local)["checkpoint_gb_per_s"][0] * 1e9)
        middle = 2 * est.step_seconds + write_s + (est.breakdown_hours or {}).get("finish", 0.0) * 3600
    return math.ceil((registry.push_every(record.run_id) + middle + GRACE_SLACK_S) / 60 * 10) / 10  # to a tenth of a minute


def stop_gracefully(record, wait_minutes: Optional[float], say: Callable[[str], None]) -> dict:
    """Ask the node to stop (a stop request in the run's bucket), then wait at most wait_minutes for the job
    to end; the request is withdrawn however this ends. What happened: {"asked", "ended", "state",
    "waited_s", "wait_minutes"}; the teardown that follows is the caller's."""
    state = state_of(record)
    if state not in ACTIVE_STATES and not state.startswith(UNKNOWN):
        say(f"{record.run_id}: nothing is training ({state}): no checkpoint to wait for; tearing down")
        return {"asked": False, "ended": True, "state": state, "waited_s": 0.0}
    minutes = default_wait_minutes(record) if wait_minutes is None else wait_minutes
    try:
        store = open_store(record.spec.run_url)
        stoprequest.write(store, stoprequest.make())
    except StorageError as e:
        say(f"{record.run_id}: could not write the stop request to {record.spec.run_url} ({e}); tearing down now")
        return {"asked": False, "ended": False, "state": state, "waited_s": 0.0, "wait_minutes": minutes}
    say(f"{record.run_id}: asked the node to stop with a checkpoint ({record.spec.run_url}/"
        f"{stoprequest.STOP_REQUEST}); waiting up to {minutes:g} min for the job to end ({state} now)")
    try:
        state, waited = _wait_for_end(record, store, minutes)
    except KeyboardInterrupt:
        say(f"{record.run_id}: interrupted: nothing was torn down and the stop request is withdrawn (a node that "
            f"saw it already stops with a checkpoint); `gpt2cloud down {record.run_id}` still stops it")
        raise
    finally:  # (Ctrl-C too) a request left behind would stop a later job of the run at once
        try:
            stoprequest.withdraw(store)
        except StorageError as e:
            say(f"{record.run_id}: could not remove the stop request ({e}); a relaunch onto a new node ignores it")
    ended = state not in ACTIVE_STATES and not state.startswith(UNKNOWN)
    say(f"{record.run_id}: the job ended ({state}) after {waited:.0f} s; tearing down" if ended else
        f"{record.run_id}: the job did not end within {minutes:g} min ({state}); tearing down now")
    return {"asked": True, "ended": ended, "state": state, "waited_s": round(waited, 1), "wait_minutes": minutes}


def _wait_for_end(record, store, minutes: float) -> tuple[str, float]:
    """Poll the backend until the job leaves ACTIVE_STATES or `minutes` pass, rewriting the request every
    REFRESH_S; (the last state seen, seconds waited)."""
    t0 = time.monotonic()
    deadline, refreshed = t0 + minutes * 60, t0
    while True:
        state = state_of(record)
        now = time.monotonic()
        if (state not in ACTIVE_STATES and not state.startswith(UNKNOWN)) or now >= deadline:
            return state, now - t0
        if now - refreshed >= REFRESH_S:
            try:
                stoprequest.write(store, stoprequest.make())
                refreshed = now
            except StorageError:
                pass  # the first one is there; the next refresh tries again
        time.sleep(min(POLL_S, max(0.0, deadline - now)))


# ---- what a teardown may lose ----

def _ago(t: float, now: float) -> str:
    minutes = max(0.0, now - t) / 60
    return (f"{time.strftime('%H:%M:%S', time.localtime(t))}, "
            + (f"{minutes:.0f} min ago" if minutes >= 1 else "under a minute ago"))


def may_lose(record, ended: bool = False, now: Optional[float] = None) -> Optional[str]:
    """What the node may have held that the bucket does not, read from the bucket: the work since its newest
    checkpoint (its step, when the trainer wrote it, the node's last push that worked). None when nothing
    is at risk: the run is done and its last step is checkpointed there, or the job ended (ended) and its
    final push left the newest checkpoint at the last step the metrics know."""
    from gpt2cloud.runs.status import read_run_metrics

    now = time.time() if now is None else now
    try:
        store = open_store(record.spec.run_url)
        complete, _ = remote_checkpoints(store)
        status = pushstate.read_store(store) or {}
    except StorageError as e:
        return f"what the node held since its last push: its bucket could not be read ({e})"
    metrics, _problem = read_run_metrics(record.spec.run_url)
    last = metrics.last_step
    newest = complete[-1][0] if complete else 0
    if newest >= last and (ended or metrics.finished):
        return None
    written = [float(e["time"]) for e in metrics.events
               if e.get("event") == "checkpoint" and e.get("step") == newest and e.get("time")]
    pushed_ok = float(status.get("last_ok") or 0.0)
    since = (f"the bucket's newest checkpoint, step {newest}" + (f" (written {_ago(written[-1], now)})" if written else "")
             if complete else "the start (the bucket has no checkpoint)")
    return (f"the work since {since}: the bucket's metrics reach step {last}"
            + (f"; the node's last push that worked: {_ago(pushed_ok, now)}" if pushed_ok else "")
            + "; anything trained after that was only on the node")


def remove_controller() -> str:
    """`down --controller`: SkyPilot's managed-jobs controller, once no managed job is live."""
    from gpt2cloud.backends.skypilot import remove_jobs_controller

    return remove_jobs_controller()
