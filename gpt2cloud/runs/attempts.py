"""A spot run's attempts that never reached the bucket, counted from SkyPilot's managed-job records.

The node's cost clock (model/clock.py) knows an earlier attempt only from what that attempt pushed:
its node_up event and its last line in the bucket's timeline and metrics. An attempt preempted during
setup, the checkpoint pull or the data wait left nothing there, because the pusher starts only after
those (gpt2cloud/launch/scripts.py, the run script). SkyPilot's jobs controller counts every attempt of
a managed job, and the node cannot ask it; `status` can. Per managed job of the run it compares the
attempts SkyPilot ran with those the bucket saw, and charges each one the bucket never saw at
bound_seconds(): the most node time an attempt can bill before its first push. `status` adds that to the
dollars so far and writes it to the run's bucket prefix (UNSEEN_ATTEMPTS), where the next attempt's
checkpoint pull (model/sync.py) fetches it and the trainer's Clock adds it to the earlier attempts' node
time, so the budget stop counts it too. The figure is only as new as the last `status`.
"""

from __future__ import annotations

import json
import time
from typing import Optional

from gpt2cloud.backends import backend_for
from gpt2cloud.errors import UserError
from gpt2cloud.names import MANAGED_JOB
from gpt2cloud.runs import registry
from gpt2cloud.store import StorageError, open_store
from gpt2cloud.store.layout import UNSEEN_ATTEMPTS
from model import deadman

FORMAT = "gpt2cloud-unseen-attempts"
SOURCE = "SkyPilot's managed-job records"
# SkyPilot's states of a managed job whose current attempt is on a node now: that attempt is not over
ON_A_NODE = {"RUNNING", "WINDING_DOWN", "CANCELLING"}


def bound_seconds(push_every: float) -> float:
    """The most node time an attempt can bill before its first push: past each phase's bound the node's
    deadman ends the job (model/deadman.py: every setup part, the checkpoint pull, the data wait), and the
    pusher, started right after them, pushes within one push interval: ~2.6 h with the default bounds.
    SkyPilot's own start on the node (from its boot to our setup: minutes) is not bounded by us; the
    generous bounds cover it in practice."""
    return sum(deadman.SETUP_BOUNDS.values()) + deadman.PULL_BOUND + deadman.DATA_BOUND + push_every


def ended_attempts(job: dict) -> int:
    """The attempts of one managed job that are over: SkyPilot's recovery_count (the recoveries it
    completed) + 1 for the first attempt, less the one on a node now. A job that never ran on a node
    (job_duration 0 and no recovery: pending, starting, no capacity) has none. While a job is RECOVERING
    its count is not bumped yet (SkyPilot does that once the new node runs): every attempt so far is over."""
    recoveries = int(job.get("recovery_count") or 0)
    if recoveries == 0 and not float(job.get("job_duration") or 0.0) > 0:
        return 0
    return recoveries + 1 - (1 if job.get("status") in ON_A_NODE else 0)


def count_unseen(jobs: dict[int, dict], rows: list[dict]) -> list[dict]:
    """Per managed job, oldest first: the attempts that are over ("ran"), those of them the bucket saw
    ("seen": rank-0 node_up events from the job's submission to the next job's) and the difference
    ("unseen"). `rows`: the bucket's timeline and metrics lines.

    The attempt on a node now is not over: its node_up is left out too once it pushed, which the bucket
    tells by a line written after that attempt began running (an attempt that is over was preempted
    before it, so it wrote nothing then). When SkyPilot does not say when it began, it is taken as pushed:
    an attempt too many rather than one too few."""
    ups = [r for r in rows if r.get("event") == "node_up" and r.get("rank") in (0, None)
           and isinstance(r.get("time"), (int, float))]
    # A node_up names its managed job and attempt (the run script): counted by those. One without them
    # (an older run script) is placed by its time between the jobs' submissions.
    tagged = {(str(r["job"]), r.get("attempt") or r["time"]) for r in ups if r.get("job")}
    untagged = sorted({r["time"] for r in ups if not r.get("job")})
    newest = max((r["time"] for r in rows if isinstance(r.get("time"), (int, float))), default=None)
    order = sorted(jobs, key=lambda j: (float(jobs[j].get("submitted_at") or 0.0), j))
    counts = []
    for i, job_id in enumerate(order):
        job = jobs[job_id]
        since = float(job.get("submitted_at") or 0.0)
        until = float(jobs[order[i + 1]].get("submitted_at") or 0.0) if i + 1 < len(order) else float("inf")
        seen = (sum(1 for j, _ in tagged if j == str(job_id))
                + sum(1 for t in untagged if since <= t < until))
        began = float(job.get("last_recovered_at") or 0.0)
        if job.get("status") in ON_A_NODE and seen and newest is not None and newest > began:
            seen -= 1  # the attempt on a node pushed: one of these node_ups is its own
        ran = ended_attempts(job)
        counts.append({"job_id": job_id, "submitted_at": job.get("submitted_at"), "status": job.get("status"),
                       "ran": ran, "seen": seen, "unseen": max(0, ran - seen)})
    return counts


def job_records(record) -> tuple[Optional[dict], str]:
    """(SkyPilot's records of the run's managed jobs, "") or (None, why SkyPilot cannot say: its jobs
    controller stopped, say). Ask before the bucket is read: a line pushed in between can then only come
    from an attempt SkyPilot saw on a node, never make an attempt that is over look unseen."""
    try:
        return backend_for(MANAGED_JOB).job_records(record), ""
    except UserError as e:
        return None, str(e)


def read(store) -> Optional[dict]:
    """The figure `status` last wrote to the run's bucket prefix, or None (none yet, or not ours)."""
    try:
        d = json.loads(store.get_bytes(UNSEEN_ATTEMPTS)) if store.exists(UNSEEN_ATTEMPTS) else None
    except (StorageError, ValueError):
        return None
    return d if isinstance(d, dict) and d.get("format") == FORMAT else None


def unseen_attempts(record, jobs: Optional[dict], why: str, rows: list[dict]) -> Optional[dict]:
    """The run's unseen attempts as `status` shows them: {"attempts", "seconds", "bound_seconds", "jobs",
    "source", "time"}, counted now from SkyPilot's records (`jobs`, from job_records) and the bucket's lines
    (`rows`), and written to the bucket when they changed. A job the bucket's figure holds and SkyPilot no
    longer lists (a new jobs controller forgot it) keeps its count there. When SkyPilot cannot say, the
    bucket's figure as last written; None when there is neither. "note": a write that failed."""
    store = open_store(record.spec.run_url)
    recorded = read(store)
    if jobs is None:
        return {**recorded, "source": f"{SOURCE} as last counted ({why})"} if recorded else None
    bound = bound_seconds(registry.push_every(record.run_id))
    by_key = {f"{c['job_id']}@{c['submitted_at']}": c for c in count_unseen(jobs, rows)}
    kept = {k: c for k, c in (recorded or {}).get("jobs", {}).items() if k not in by_key and isinstance(c, dict)}
    every = {**kept, **by_key}
    unseen = sum(int(c.get("unseen") or 0) for c in every.values())
    figure = {"format": FORMAT, "version": 1, "run": record.run_id, "time": time.time(), "source": SOURCE,
              "bound_seconds": bound, "attempts": unseen, "seconds": unseen * bound, "jobs": every}
    before = (recorded or {}).get("attempts", 0), (recorded or {}).get("seconds", 0.0)
    if before != (unseen, unseen * bound):
        try:
            store.put_bytes(UNSEEN_ATTEMPTS, (json.dumps(figure) + "\n").encode())
        except StorageError as e:
            figure["note"] = f"could not write {UNSEEN_ATTEMPTS} to the bucket ({e}): the node does not count them"
    return figure
