"""A run's metrics: `OUT/metrics.jsonl`, its one writer (the trainer) and its one reader (everyone else).

One JSON object a line:
- per step: step, loss, lr, grad_norm, step_seconds, tokens_per_second (all GPUs), mfu, tokens_seen,
  elapsed_seconds, cost_usd (when a price was given);
- {"step", "val_loss"}, {"step", "hellaswag_acc_norm", ...}, {"step", "sample"};
- events: {"event": "start", "world_size", "config", ...}, "checkpoint", "budget_stop", "end".
A resumed run appends another "start"; lines a killed run wrote past its checkpoint are dropped by
the trainer (truncate_after), and the reader keeps the last line of a step in any case.

`RunMetrics` is what `gpt2cloud status`, `train`, `plot` and `report` read: one steady tokens/s, one
cost, one last step, so a finished run shows the same figures everywhere.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from gpt2cloud.store import atomic_write
from gpt2cloud.store.layout import UNSEEN_ATTEMPTS

STOPS = ("end", "budget_stop", "time_stop")  # the events a run's trainer ends with
# tokens/s of the first steps (compilation, cold caches) is not representative
WARMUP_FRACTION = 0.1
MIN_WARMUP_STEPS = 5


def mfu(tokens_per_second: float, flops_token: int, peak_flops_per_gpu: float, world_size: int):
    """Model FLOPs utilisation, or None when the peak is unknown (0)."""
    if peak_flops_per_gpu <= 0:
        return None
    return tokens_per_second * flops_token / (peak_flops_per_gpu * world_size)


def cost_usd(elapsed_seconds: float, world_size: int, price_per_gpu_hour: float) -> float:
    return elapsed_seconds / 3600 * world_size * price_per_gpu_hour


# ---------------------------------------------------------------- writing


class MetricsLog:
    """Appends one JSON object per line to OUT/metrics.jsonl, flushed at once (rank 0 only).

    Readers (`gpt2cloud status`, plots) can tail the file while the run is going.
    """

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.f = open(self.path, "a", encoding="utf-8") if enabled else None

    def write(self, record: dict) -> None:
        if self.f is not None:
            record = {**record, "time": round(time.time(), 3)}  # when: the timeline and node-time cost use it
            # inf/nan (an fp16 overflow step, a diverged run) as null: strict JSON readers reject them
            record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
            self.f = None


def truncate_after(path: str | Path, step: int) -> None:
    """Drop lines about steps after `step` (a killed run logged them; the resumed run redoes them).

    Each step then appears once in the file, and its loss is the one the finished run has.
    """
    path = Path(path)
    if not path.exists():
        return
    kept = [r for r in parse_metrics(path.read_text(encoding="utf-8")) if r.get("step") is None or r["step"] <= step]
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept))


def console_line(step: int, steps: int, loss: float, lr: float, norm: float, tok_s: float, dt: float) -> str:
    return (f"step {step}/{steps} | loss {loss:.4f} | lr {lr:.1e} | norm {norm:.2f} | "
            f"{tok_s:,.0f} tok/s | {dt:.2f} s")


# ---------------------------------------------------------------- node time


def node_seconds_before(records: list[dict], node_up: float) -> float:
    """The node time of a run's earlier attempts (spot recoveries, relaunches): from each attempt's
    node_up event to the last record it pushed. `records` are the timeline's and the metrics' lines as
    pulled from the bucket; the attempt that came up at `node_up` (this one) is not counted."""
    ups = sorted(r["time"] for r in records if r.get("event") == "node_up" and isinstance(r.get("time"), (int, float))
                 and r["time"] < node_up - 1e-3)
    times = sorted(r["time"] for r in records if isinstance(r.get("time"), (int, float)))
    total = 0.0
    for i, up in enumerate(ups):
        until = ups[i + 1] if i + 1 < len(ups) else node_up
        last = max((t for t in times if up <= t < until), default=up)
        total += last - up
    return total


def unseen_attempt_seconds(out: str | Path) -> float:
    """Node time of earlier attempts that never reached the bucket (preempted before their first push), as
    `gpt2cloud status` counted it from SkyPilot's managed-job records and the checkpoint pull brought it
    (OUT/unseen_attempts.json, gpt2cloud/runs/attempts.py); 0 when there is none or it is unreadable."""
    try:
        d = json.loads((Path(out) / UNSEEN_ATTEMPTS).read_text(encoding="utf-8"))
        seconds = float(d["seconds"])
    except (OSError, ValueError, TypeError, KeyError):
        return 0.0
    return seconds if math.isfinite(seconds) and seconds > 0 else 0.0


# ---------------------------------------------------------------- reading


def parse_metrics(text: str) -> list[dict]:
    """The JSON objects of metrics.jsonl text; a line cut short (an upload in progress, a kill) is skipped."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _median(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


@dataclass
class RunMetrics:
    """metrics.jsonl read back: the lines by kind, and the figures every command shows."""

    train: list = field(default_factory=list)  # per-step lines, one per step (the last written wins), by step
    val: list = field(default_factory=list)
    hellaswag: list = field(default_factory=list)
    samples: list = field(default_factory=list)
    events: list = field(default_factory=list)
    warm_steps: set = field(default_factory=set)  # the first step after each (re)start: it pays for warm-up
    rows: list = field(default_factory=list)  # every line as read (the timeline's too), for node time

    @classmethod
    def from_rows(cls, rows: list[dict]) -> "RunMetrics":
        m = cls(rows=list(rows))
        steps: dict[int, dict] = {}
        after_start = False
        for r in rows:
            if "event" in r:
                m.events.append(r)
                after_start = after_start or r["event"] == "start"
            elif "loss" in r and "step" in r:
                steps[int(r["step"])] = r
                if after_start:
                    m.warm_steps.add(int(r["step"]))
                    after_start = False
            elif "val_loss" in r:
                m.val.append(r)
            elif "hellaswag_acc_norm" in r:
                m.hellaswag.append(r)
            elif "sample" in r:
                m.samples.append(r)
        m.train = [steps[k] for k in sorted(steps)]
        for rows_ in (m.val, m.hellaswag, m.samples):
            rows_.sort(key=lambda r: r.get("step", 0))
        return m

    @classmethod
    def from_text(cls, text: str) -> "RunMetrics":
        return cls.from_rows(parse_metrics(text))

    @classmethod
    def read(cls, path: str | Path, timeline: str | Path | None = None) -> "RunMetrics":
        """OUT/metrics.jsonl, and the node's timeline.jsonl beside it when there is one."""
        texts = [Path(p).read_text(encoding="utf-8") for p in (path, timeline) if p and Path(p).is_file()]
        return cls.from_text("\n".join(texts))

    # ---- what the run was ----
    @property
    def start(self) -> dict:
        """The first start event (the run's config and world size)."""
        return next((e for e in self.events if e.get("event") == "start"), {})

    @property
    def config(self) -> dict:
        return self.start.get("config", {})

    @property
    def total_steps(self) -> Optional[int]:
        """The steps of the newest start's config (a resume may have extended the run)."""
        starts = [e for e in self.events if e.get("event") == "start" and isinstance(e.get("config"), dict)]
        return int(starts[-1]["config"]["steps"]) if starts and starts[-1]["config"].get("steps") else None

    @property
    def restarts(self) -> int:
        return max(0, sum(1 for e in self.events if e.get("event") == "start") - 1)

    @property
    def end(self) -> Optional[dict]:
        return next((e for e in reversed(self.events) if e.get("event") in STOPS), None)

    @property
    def finished(self) -> bool:
        return self.end is not None

    @property
    def budget_stopped(self) -> bool:
        """The run's latest stop was the budget cap's (a resume with a higher cap may have gone on)."""
        return self.end is not None and self.end.get("event") == "budget_stop"

    @property
    def time_stopped(self) -> bool:
        """The run's latest stop was its wall-time limit (max_hours)."""
        return self.end is not None and self.end.get("event") == "time_stop"

    @property
    def completed(self) -> bool:
        """The run trained all its steps (its latest stop was the end, not the budget cap)."""
        return self.end is not None and self.end.get("event") == "end"

    # ---- where it got ----
    @property
    def last_step(self) -> int:
        return int(self.train[-1]["step"]) if self.train else int((self.end or {}).get("step") or 0)

    @property
    def last_loss(self) -> Optional[float]:
        if self.end and self.end.get("final_loss") is not None:
            return self.end["final_loss"]
        return self.train[-1]["loss"] if self.train else None

    @property
    def last_val_loss(self) -> Optional[float]:
        return self.val[-1]["val_loss"] if self.val else None

    @property
    def last_sample(self) -> Optional[str]:
        return self.samples[-1]["sample"] if self.samples else None

    @property
    def tokens_seen(self) -> int:
        return int(self.train[-1].get("tokens_seen", 0)) if self.train else 0

    @property
    def elapsed_seconds(self) -> Optional[float]:
        """Wall time over all restarts, as the trainer counts it for its budget."""
        return float(self.train[-1].get("elapsed_seconds", 0.0)) if self.train else None

    def cost_usd(self, world_size: int, price_per_gpu_hour: float) -> Optional[float]:
        """Dollars so far: the trainer's own cost_usd (what its cap uses), else elapsed x GPUs x price;
        a budget stop's cost if higher (a stop before the first step still cost money)."""
        cost = None
        if self.train and self.train[-1].get("cost_usd") is not None:
            cost = float(self.train[-1]["cost_usd"])
        elif price_per_gpu_hour:
            cost = (self.elapsed_seconds or 0.0) / 3600 * world_size * price_per_gpu_hour
        stop_cost = [float(e["cost_usd"]) for e in self.events
                     if e.get("event") == "budget_stop" and e.get("cost_usd") is not None]
        if stop_cost:
            cost = max(cost or 0.0, *stop_cost)
        return cost

    # ---- how fast: medians over the steady steps ----
    def steady_steps(self) -> list[dict]:
        """The steps after warm-up: the first 10% (at least 5) and the first step of every restart are
        skipped; a run too short for that keeps its second half."""
        skip = max(MIN_WARMUP_STEPS, int(len(self.train) * WARMUP_FRACTION))
        steady = [r for r in self.train[skip:] if int(r["step"]) not in self.warm_steps]
        return steady or self.train[len(self.train) // 2:]

    def tokens_per_second(self) -> Optional[float]:
        """Median tokens/s over all GPUs after warm-up: the one throughput every command shows."""
        return _median([r.get("tokens_per_second") for r in self.steady_steps()])

    def step_seconds(self) -> Optional[float]:
        return _median([r.get("step_seconds") for r in self.steady_steps()])

    def mfu(self) -> Optional[float]:
        return _median([r.get("mfu") for r in self.steady_steps()])

    # ---- where the node's time went (the timeline's phases and the trainer's own durations) ----
    def node_seconds(self) -> float:
        """Node time over all attempts: from each node_up to the last line that attempt wrote."""
        return node_seconds_before(self.rows, float("inf"))

    def phase_seconds(self) -> dict[str, float]:
        """Measured seconds per phase, summed over attempts (gpt2cloud/cost/phases.py names the phases)."""
        spans = {"setup": 0.0, "data": 0.0, "compile": 0.0, "training": 0.0, "evals": 0.0, "finish": 0.0}
        for e in self.events:
            if e.get("event") in ("setup", "data", "pull") and isinstance(e.get("start"), (int, float)):
                spans["setup" if e["event"] == "setup" else "data"] += e["time"] - e["start"]
        for e in (e for e in self.events if e.get("event") == "train_start"):
            first = next((r for r in self.train if r.get("time", 0) > e["time"]), None)
            if first is not None:  # start-up, compilation, the first step's allocations
                spans["compile"] += max(0.0, first["time"] - (first.get("step_seconds") or 0) - e["time"])
        for e in (e for e in self.events if e.get("event") == "train_end"):
            before = [r["time"] for r in [*self.train, *self.events] if r.get("event") in (None, *STOPS)
                      and isinstance(r.get("time"), (int, float)) and r["time"] <= e["time"]]
            if before:  # from the trainer's last line to its processes' exit
                spans["finish"] += e["time"] - max(before)
        spans["training"] = sum(r.get("step_seconds") or 0 for r in self.train)
        spans["evals"] = sum(r.get("seconds") or 0 for r in [*self.val, *self.hellaswag, *self.events]
                             if "seconds" in r and (r.get("event") in (None, "checkpoint")))
        return spans

    @property
    def node_price(self) -> Optional[float]:
        """The price the newest node reported (an any_of launch: its own cloud's), if any."""
        prices = [e["price_per_gpu_hour"] for e in self.events if e.get("event") == "node_up"
                  and isinstance(e.get("price_per_gpu_hour"), (int, float))]
        return prices[-1] if prices else None

    def phase(self) -> Optional[str]:
        """What the node is doing now, by its timeline's last event (None before it came up)."""
        last = next((e["event"] for e in reversed(sorted(
            (e for e in self.events if e.get("event") in NODE_EVENTS), key=lambda e: e.get("time", 0)))), None)
        return NODE_EVENTS.get(last)


# the node's timeline events -> what the node does after each
NODE_EVENTS = {"node_up": "setup", "setup": "pulling the newest checkpoint", "pull": "downloading data",
               "data": "starting the trainer", "train_start": "training", "train_end": "final push",
               "final_push": "final push, then exit"}
