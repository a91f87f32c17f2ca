"""A run's status: its backend's state plus progress from the bucket's metrics.jsonl.

Dollars are GPU-hours x price over all nodes: the trainer's own `cost_usd` (its elapsed time over all
restarts x GPUs x price, the figure its budget cap uses) when present, else elapsed x GPUs x price; for a
spot run, plus the attempts SkyPilot ran that were preempted before their first push (runs/attempts.py).
Speed is RunMetrics' steady median, the same figure `train`, `plot` and `report` show.

It writes one thing: that count of unseen attempts, to the run's bucket prefix, where the next attempt's
node reads it for its budget.
"""

from __future__ import annotations

import re
import time
from typing import Optional

from gpt2cloud.backends import ACTIVE_STATES, state_of
from gpt2cloud.names import FAILED, LOCAL, MANAGED_JOB
from gpt2cloud.runs import attempts
from gpt2cloud.runs.registry import RunRecord
from gpt2cloud.runs.rundata import price_of, run_dir_candidates
from gpt2cloud.store import StorageError, open_store
from gpt2cloud.store.layout import METRICS, NODE_HOME, TIMELINE, remote_checkpoints
from gpt2cloud.units import when
from model import deadman, pushstate
from model.config import EXIT_DIVERGED, EXIT_NO_GPU
from model.datadir import STATUS as DATA_STATUS
from model.metrics import RunMetrics, unseen_attempt_seconds
from model.sync import EXIT_BUCKET, EXIT_DATA, EXIT_FINAL_PUSH
from model.watchdog import EXIT_STALLED

# What the node's exit codes mean (model/sync.py, model/watchdog.py, model/config.py for the setup's GPU
# check, model/deadman.py for the phases that hung and a full disk): `status` says it in words, with where to look.
EXIT_MEANINGS = {
    EXIT_DATA: f"the data download or its sha256 verification failed: see the node log and {DATA_STATUS} in "
               f"the node's data directory (~/{NODE_HOME}/data)",
    EXIT_BUCKET: "the node could not reach the run's bucket: check the bucket and its credentials",
    EXIT_FINAL_PUSH: "the final push to the bucket failed: the newest checkpoint may be only on the node",
    EXIT_NO_GPU: "setup: torch saw fewer GPUs than the node has (a CPU-only torch or a broken driver)",
    EXIT_STALLED: "the trainer stalled (no progress) and the watchdog ended it",
    EXIT_DIVERGED: "the run diverged (a non-finite loss, or a loss spike past its bound): no checkpoint of it was "
                   "written; resume from the last good one with a lower lr, or a looser loss_spike_factor",
    deadman.EXIT_SETUP_HUNG: "setup hung (nvidia-smi, CUDA init or a package download past its bound) and the deadman "
                             "ended it: the job's log (`gpt2cloud logs`) names the part; a managed job retries on a new node",
    deadman.EXIT_PULL_HUNG: "the checkpoint pull from the bucket hung past its bound and the deadman ended it: check "
                            "the bucket and its endpoint",
    deadman.EXIT_DATA_HUNG: "the first data shards did not arrive within the deadman's bound: the data source is "
                            f"stalled or far too slow (see {DATA_STATUS} in the node's data directory)",
    deadman.EXIT_STARTUP_HUNG: "the trainer's start-up (CUDA init, the rendezvous of the nodes) hung past its bound "
                               "and the deadman ended it; a managed job retries on a new node",
    deadman.EXIT_RENDEZVOUS_HUNG: "a node never joined the nodes' rendezvous within its bound: the job's log names "
                                  "it, and that node's own log says why (a failed setup, a blocked port)",
    deadman.EXIT_DISK_FULL: "the node's disk filled up: the task's disk_size (the launch sizes it for the shards, "
                            "the checkpoints and the venv) was too small; the node log says what could not be written",
}


def progress(m: RunMetrics, total_steps: int, gpus: int, price_per_gpu_hour: float,
             max_cost_usd: float = 0.0, unseen_seconds: float = 0.0) -> dict:
    """Step, losses, speed, ETA and dollars of a run from its metrics; unseen_seconds: node time of attempts
    that never reached the bucket (runs/attempts.py)."""
    total_steps = m.total_steps or total_steps
    step_seconds = m.step_seconds()
    step = m.last_step if m.train else None
    done = m.finished
    remaining = 0 if done else max(0, total_steps - (step or 0))
    eta_hours = remaining * step_seconds / 3600 if step_seconds else (0.0 if done else None)
    # dollars since the node came up (and its earlier attempts', those the bucket never saw too), not only the
    # trainer's own loop; a trainer that pulled the unseen figure has it in its cost_usd already: the larger
    node_seconds = m.node_seconds() + unseen_seconds
    so_far = max(m.cost_usd(gpus, price_per_gpu_hour) or 0.0, node_seconds / 3600 * gpus * price_per_gpu_hour)
    projected = so_far + eta_hours * gpus * price_per_gpu_hour if eta_hours is not None else None
    if max_cost_usd and projected is not None:
        # the trainer stops before a step would pass the cap (start-up alone may have passed it)
        projected = max(so_far, min(projected, max_cost_usd))
    elapsed = m.elapsed_seconds
    return {
        "phase": "finished" if m.finished else m.phase(), "node_hours": m.node_seconds() / 3600,
        "step": step, "total_steps": total_steps, "loss": m.train[-1]["loss"] if m.train else None,
        "val_loss": m.last_val_loss, "tokens_per_second": m.tokens_per_second(), "mfu": m.mfu(),
        "step_seconds": step_seconds, "eta_hours": eta_hours,
        "elapsed_hours": elapsed / 3600 if elapsed is not None else None,
        "cost_so_far_usd": round(so_far, 4), "cost_projected_usd": round(projected, 4) if projected is not None else None,
        "finished": m.completed, "budget_stopped": m.budget_stopped, "time_stopped": m.time_stopped,
        "sample": m.last_sample, "restarts": m.restarts,
    }


def read_run_metrics(run_url: str) -> tuple[RunMetrics, Optional[str]]:
    """(metrics, problem): the run's metrics from its bucket; problem says why there are none."""
    try:
        store = open_store(run_url)
        texts = [store.get_bytes(name).decode("utf-8", "replace") for name in (METRICS, TIMELINE) if store.exists(name)]
        if not texts:
            return RunMetrics(), "no metrics in the bucket yet (the node is starting, or never reached the bucket)"
        return RunMetrics.from_text("\n".join(texts)), None
    except StorageError as e:
        return RunMetrics(), str(e)


def run_status(record: RunRecord) -> dict:
    """One run's status as a dict (the --json object of `gpt2cloud status`)."""
    return read_status(record)[0]


def read_status(record: RunRecord) -> tuple[dict, RunMetrics]:
    """(run_status's dict, the metrics it was read from): `status --watch` draws the loss curve from the same
    read (gpt2cloud/runs/watch.py), so one refresh reads the bucket once."""
    spec = record.spec
    # SkyPilot's managed-job records before the bucket's lines (attempts.job_records says why)
    jobs, why = attempts.job_records(record) if spec.kind == MANAGED_JOB else (None, "")
    metrics, problem = read_run_metrics(spec.run_url)
    price = price_of(spec, metrics)
    unseen = unseen_charge(record, jobs, why, metrics, price)
    d = {
        "run": spec.run_id, "state": state_of(record), "kind": spec.kind, "infra": spec.infra,
        "gpus": f"{spec.nodes} x {spec.gpu_type}:{spec.gpus_per_node}", "recipe": spec.recipe,
        "run_url": spec.run_url, "started_at": record.started_at,
        **progress(metrics, spec.total_steps, spec.gpus, price, spec.max_cost_usd,
                   unseen["node_hours"] * 3600 if unseen else 0.0),
        "price_per_gpu_hour": price,
        "cost_estimated_usd": spec.estimate.cost_usd if spec.estimate else None,
        "max_cost_usd": spec.max_cost_usd or None,
    }
    if unseen:
        d["unseen_attempts"] = unseen
    notes = [n for n in (problem, (unseen or {}).get("note")) if n]
    if notes:
        d["note"] = "; ".join(notes)
    warning = push_warning(record, d["state"])
    if warning:
        d["push_warning"] = warning
        d["note"] = warning + (f"; {d['note']}" if d.get("note") else "")
    if d["state"].startswith(FAILED) and spec.kind != LOCAL:
        d["note"] = node_copy_hint(record, metrics)
    meaning = exit_meaning(d["state"])
    if meaning and spec.kind == LOCAL:  # the node's data directory is on this machine: name it
        meaning = meaning.replace("the node's data directory", str(record.node_dir / "node" / "data"))
    if meaning:
        d["exit_meaning"] = meaning
        d["note"] = f"{meaning} (`gpt2cloud logs {spec.run_id}`)" + (f"; {d['note']}" if d.get("note") else "")
    if record.recovered:
        d["note"] = record.recovered + (f"; {d['note']}" if d.get("note") else "")
    return d, metrics


BUCKET_ON_DISK = "the bucket (on this disk)"  # known_spend's source when it read the bucket itself


def known_spend(record: RunRecord) -> tuple[Optional[float], str]:
    """(dollars so far, where the figure comes from) from what this machine holds, with no network call
    (`gpt2cloud runs` sums them): the bucket when it is a directory here (file://), else the newest copy of
    the metrics here (where `fetch` put them, a local run's node), as of that copy; (None, why) when only
    the bucket knows. The same arithmetic as `status` (progress()), a spot run's unseen attempts as last
    written to the bucket (SkyPilot is not asked)."""
    spec = record.spec
    problem = "only in the bucket (no copy of its metrics here): `gpt2cloud status` reads it"
    if spec.run_url.startswith("file://"):
        metrics, problem = read_run_metrics(spec.run_url)
        if problem is None:
            unseen = (attempts.read(open_store(spec.run_url)) or {}) if spec.kind == MANAGED_JOB else {}
            return _spend(record, metrics, float(unseen.get("seconds") or 0.0)), BUCKET_ON_DISK
    for out in run_dir_candidates(record):
        if (out / METRICS).is_file():
            metrics = RunMetrics.read(out / METRICS, out / TIMELINE)
            copied = when((out / METRICS).stat().st_mtime)
            return _spend(record, metrics, unseen_attempt_seconds(out)), f"{out} as of {copied}"
    return None, problem


def _spend(record: RunRecord, metrics: RunMetrics, unseen_seconds: float) -> float:
    spec = record.spec
    price = price_of(spec, metrics)
    return progress(metrics, spec.total_steps, spec.gpus, price, spec.max_cost_usd, unseen_seconds)["cost_so_far_usd"]


def unseen_charge(record: RunRecord, jobs: Optional[dict], why: str, metrics: RunMetrics,
                  price_per_gpu_hour: float) -> Optional[dict]:
    """A spot run's attempts preempted before their first push (runs/attempts.py: `jobs` and `why` are its
    job_records), in node hours and dollars; None for other runs, or when neither SkyPilot nor the bucket
    can say."""
    if record.spec.kind != MANAGED_JOB:
        return None
    try:
        figure = attempts.unseen_attempts(record, jobs, why, metrics.rows)
    except StorageError:
        return None  # the bucket cannot be reached: read_run_metrics says so
    if figure is None:
        return None
    seconds = float(figure.get("seconds") or 0.0)
    return {"attempts": int(figure.get("attempts") or 0), "node_hours": seconds / 3600,
            "usd": round(seconds / 3600 * record.spec.gpus * price_per_gpu_hour, 4),
            "bound_hours": float(figure.get("bound_seconds") or 0.0) / 3600, "source": figure["source"],
            "jobs": list(figure.get("jobs", {}).values()), **({"note": figure["note"]} if "note" in figure else {})}


# A push is "late" after its interval plus this: a push of a big checkpoint takes a while.
PUSH_LATE_S = 60


def push_warning(record: RunRecord, state: str, now: Optional[float] = None) -> Optional[str]:
    """While the run trains: say so when the node's pushes fail or stopped coming (its newest work is then
    only on the node). A local run's node directory has the pusher's own record, errors included; else
    the bucket's copy, which is late when the node cannot reach the bucket."""
    if state not in ACTIVE_STATES:
        return None
    now = time.time() if now is None else now
    status = pushstate.read(record.node_dir / "node" / "out") if record.spec.local else None
    if status is None:
        try:
            status = pushstate.read_store(open_store(record.spec.run_url))
        except StorageError:
            status = None
    if status is None:
        return None  # nothing pushed yet: the node is starting (the timeline's phase says so)
    failing = pushstate.failing_seconds(status, now)
    if failing:
        return (f"pushes to the bucket have failed for {failing / 60:.0f} min ({status.get('failures')} tries; "
                f"last: {status.get('last_error')}): the newest work is only on the node")
    late = now - float(status.get("time") or now) - float(status.get("every") or 0)
    if late > PUSH_LATE_S:
        return (f"no push from the node for {(now - float(status['time'])) / 60:.0f} min (every "
                f"{float(status.get('every') or 0):g} s expected): it may not reach the bucket; the newest work "
                "may be only on the node")
    return None


def exit_meaning(state: str) -> Optional[str]:
    """What "FAILED (exit code N)" means, for the node's own exit codes; None for any other state."""
    m = re.match(r"FAILED \(exit code (\d+)\)", state)
    return EXIT_MEANINGS.get(int(m.group(1))) if m else None


def node_copy_hint(record: RunRecord, metrics: RunMetrics) -> str:
    """A failed job may have failed its final push (EXIT_FINAL_PUSH): then the newest checkpoint is only
    on the node, which autostop deletes `idle_minutes` after the job ended."""
    spec = record.spec
    saved = [int(e["step"]) for e in metrics.events if e.get("event") == "checkpoint"]
    try:
        complete, _ = remote_checkpoints(open_store(spec.run_url))
    except StorageError:
        complete = []
    pushed = complete[-1][0] if complete else 0
    what = (f"checkpoint step {max(saved)} is not in the bucket (newest there: {pushed or 'none'})"
            if saved and max(saved) > pushed else "if its final push failed, the newest checkpoint is only on the node")
    if spec.kind == MANAGED_JOB:  # SkyPilot's controller removes a failed managed job's node at once
        return (f"the job failed; {what}: a managed job's node is removed by SkyPilot's controller when the job "
                "fails, so a copy that was only there is gone (the node retried its final push first; "
                f"`gpt2cloud logs {spec.run_id}` says why it failed)")
    return (f"the job failed; {what}: copy it within {spec.idle_minutes} min of the failure, before autostop "
            f"removes the node: rsync -a {getattr(record.handle, 'cluster', None) or spec.run_id}:~/{NODE_HOME}/out/ "
            f"runs/{spec.run_id}/ "
            f"(`gpt2cloud logs {spec.run_id}` says why it failed)")
