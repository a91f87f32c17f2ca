"""Progress of a run from its metrics.jsonl (read from the bucket): step, losses, speed, ETA, dollars.

Dollars are GPU-hours x price over all nodes: the trainer's own `cost_usd` (its elapsed time over all
restarts x GPUs x price, the figure its budget cap uses) when present, else elapsed x GPUs x price.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from typing import Optional

RECENT = 20  # steps averaged for speed and ETA


def parse_metrics(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by an upload in progress or a kill
        if isinstance(rec, dict):
            out.append(rec)
    return out


@dataclass
class Progress:
    step: Optional[int]
    total_steps: int
    loss: Optional[float]
    val_loss: Optional[float]
    tokens_per_second: Optional[float]
    mfu: Optional[float]
    step_seconds: Optional[float]
    eta_hours: Optional[float]
    elapsed_hours: Optional[float]
    cost_so_far_usd: float
    cost_projected_usd: Optional[float]
    max_cost_usd: float
    finished: bool
    budget_stopped: bool
    sample: Optional[str]
    restarts: int

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(records: list[dict], total_steps: int, gpus: int, price_per_gpu_hour: float,
              max_cost_usd: float = 0.0) -> Progress:
    steps = {}  # the last record of each training step wins (a resumed run redoes a few)
    val_loss = sample = event_cost = None
    finished = budget_stopped = False
    restarts = 0
    for r in records:
        event = r.get("event")
        if event == "start":
            restarts += 1
            if isinstance(r.get("config"), dict) and r["config"].get("steps"):
                total_steps = int(r["config"]["steps"])
        elif event == "end":
            finished = True
        elif event == "budget_stop":
            budget_stopped = True
            event_cost = r.get("cost_usd")
        elif "val_loss" in r:
            val_loss = r["val_loss"]
        elif "sample" in r:
            sample = r["sample"]
        elif "loss" in r and "step" in r:
            steps[int(r["step"])] = r
    ordered = [steps[k] for k in sorted(steps)]
    last = ordered[-1] if ordered else None
    recent = ordered[-RECENT:]
    if len(recent) > 2:
        recent = recent[1:]  # the first step of a (re)start pays for warm-up
    step_seconds = statistics.median([r["step_seconds"] for r in recent if r.get("step_seconds")] or [0]) or None
    tps = statistics.median([r["tokens_per_second"] for r in recent if r.get("tokens_per_second")] or [0]) or None
    mfus = [r["mfu"] for r in recent if r.get("mfu") is not None]
    step = int(last["step"]) if last else None
    done = finished or budget_stopped
    remaining = max(0, total_steps - (step or 0)) if not done else 0
    eta_hours = remaining * step_seconds / 3600 if step_seconds else (0.0 if done else None)
    elapsed = last.get("elapsed_seconds") if last else None
    if last and last.get("cost_usd") is not None:
        so_far = float(last["cost_usd"])
    else:
        so_far = (elapsed or 0) / 3600 * gpus * price_per_gpu_hour
    if event_cost is not None:
        so_far = max(so_far, float(event_cost))  # a budget stop before the first step still cost money
    projected = so_far + eta_hours * gpus * price_per_gpu_hour if eta_hours is not None else None
    if max_cost_usd and projected is not None:
        # the trainer stops before a step would pass the cap (start-up alone may have passed it)
        projected = max(so_far, min(projected, max_cost_usd))
    return Progress(
        step=step, total_steps=total_steps, loss=last.get("loss") if last else None, val_loss=val_loss,
        tokens_per_second=tps, mfu=statistics.median(mfus) if mfus else None, step_seconds=step_seconds,
        eta_hours=eta_hours, elapsed_hours=elapsed / 3600 if elapsed is not None else None,
        cost_so_far_usd=round(so_far, 4), cost_projected_usd=round(projected, 4) if projected is not None else None,
        max_cost_usd=max_cost_usd, finished=finished, budget_stopped=budget_stopped, sample=sample,
        restarts=max(0, restarts - 1),
    )


def read_run_metrics(run_url: str) -> tuple[list[dict], Optional[str]]:
    """(records, problem): the run's metrics from its bucket; problem says why there are none."""
    from gpt2cloud.storage import StorageError, open_store

    try:
        store = open_store(run_url)
        if not store.exists("metrics.jsonl"):
            return [], "no metrics in the bucket yet (the node is starting, or never reached the bucket)"
        return parse_metrics(store.get_bytes("metrics.jsonl").decode("utf-8", "replace")), None
    except StorageError as e:
        return [], str(e)
