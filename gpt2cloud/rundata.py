"""A finished (or running) run as plot, report and calibration see it: its OUT dir, registry record, metrics.

`OUT/metrics.jsonl` (written by model/train.py) holds one JSON object a line:
- per step: step, loss, lr, grad_norm, step_seconds, tokens_per_second (all GPUs), mfu,
  tokens_seen, elapsed_seconds, cost_usd (when a price was given);
- {"step", "val_loss"}, {"step", "hellaswag_acc_norm"}, {"step", "sample"};
- events: {"event": "start", "world_size", "config", ...}, "checkpoint", "budget_stop", "end".
A resumed run appends a second "start"; lines a killed run wrote past its checkpoint are dropped by
the trainer, so each step appears once.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from gpt2cloud.errors import UserError
from gpt2cloud.progress import parse_metrics

METRICS = "metrics.jsonl"
WARMUP_FRACTION = 0.1  # tokens/s of the first steps (compilation, cold caches) is not representative
MIN_WARMUP_STEPS = 5


@dataclass
class RunData:
    out_dir: Path
    record: Optional[object] = None  # gpt2cloud.registry.RunRecord when RUN was a registry id
    train: list = field(default_factory=list)  # per-step lines
    val: list = field(default_factory=list)
    hellaswag: list = field(default_factory=list)
    samples: list = field(default_factory=list)
    events: list = field(default_factory=list)

    # ---- what the run was ----
    @property
    def start(self) -> dict:
        starts = [e for e in self.events if e.get("event") == "start"]
        return starts[0] if starts else {}

    @property
    def config(self) -> dict:
        return self.start.get("config", {})

    @property
    def run_id(self) -> str:
        if self.record:
            return self.record.run_id
        # "out" says nothing; "tiny/out" does.
        d = self.out_dir.resolve()
        return f"{d.parent.name}/{d.name}" if d.name in ("out", "OUT") else d.name

    @property
    def recipe(self) -> str:
        return (self.record.recipe if self.record else None) or self.config.get("recipe_name") or "unknown recipe"

    @property
    def world_size(self) -> int:
        return int(self.start.get("world_size") or (self.record.gpus if self.record else 1))

    @property
    def gpu_type(self) -> Optional[str]:
        """The GPU type, known from the registry; None for a plain DIR or a local CPU run."""
        on_gpu = self.start.get("device", "cuda") != "cpu"
        if self.record and self.record.kind != "local" and self.record.gpu_type and on_gpu:
            return self.record.gpu_type
        return None

    @property
    def hardware(self) -> str:
        if self.gpu_type:
            r = self.record
            nodes = f"{r.nodes} nodes x " if r.nodes > 1 else ""
            return f"{nodes}{r.gpus_per_node} x {r.gpu_type}{' (spot)' if r.spot else ''}"
        device = self.start.get("device", "unknown device")
        peak = float(self.config.get("peak_flops_per_gpu") or 0)
        if device == "cuda":
            device = f"GPU ({peak / 1e12:g} TFLOPS peak)" if peak else "GPU"
        return f"{self.world_size} x {device}" + (" (local)" if self.record and self.record.kind == "local" else "")

    @property
    def price_per_gpu_hour(self) -> float:
        if self.record and self.record.price_per_gpu_hour:
            return float(self.record.price_per_gpu_hour)
        return float(self.config.get("price_per_gpu_hour") or 0.0)

    @property
    def peak_flops_per_gpu(self) -> Optional[float]:
        """Peak BF16 FLOPS of one GPU: the registry's GPU type, else what the trainer was told."""
        if self.gpu_type:
            from gpt2cloud.hardware import gpu_spec

            try:
                return gpu_spec(self.gpu_type).peak_bf16_tflops * 1e12
            except UserError:
                return None
        return float(self.config.get("peak_flops_per_gpu") or 0) or None

    @property
    def total_steps(self) -> Optional[int]:
        return self.config.get("steps") or (self.record.total_steps if self.record else None)

    @property
    def finished(self) -> bool:
        return any(e.get("event") in ("end", "budget_stop") for e in self.events)

    # ---- what it measured ----
    @property
    def last_step(self) -> int:
        return self.train[-1]["step"] if self.train else 0

    @property
    def tokens_seen(self) -> int:
        return int(self.train[-1].get("tokens_seen", 0)) if self.train else 0

    @property
    def wall_seconds(self) -> float:
        return float(self.train[-1].get("elapsed_seconds", 0.0)) if self.train else 0.0

    @property
    def gpu_hours(self) -> float:
        return self.wall_seconds / 3600 * self.world_size

    @property
    def cost_usd(self) -> Optional[float]:
        if self.train and self.train[-1].get("cost_usd") is not None:
            return float(self.train[-1]["cost_usd"])
        return self.gpu_hours * self.price_per_gpu_hour if self.price_per_gpu_hour else None

    def steady_tokens_per_second(self) -> Optional[float]:
        """Median tokens/s over all GPUs after warm-up (the first 10% of steps, at least 5, are skipped)."""
        rates = [r["tokens_per_second"] for r in self.train if r.get("tokens_per_second")]
        if not rates:
            return None
        skip = max(MIN_WARMUP_STEPS, int(len(rates) * WARMUP_FRACTION))
        steady = rates[skip:] if len(rates) > skip else rates[len(rates) // 2:]
        return statistics.median(steady)

    def tokens_at(self, step: int) -> int:
        """Tokens seen at a step (from the step's own line, else steps x tokens per step)."""
        for r in self.train:
            if r["step"] == step:
                return int(r.get("tokens_seen", 0))
        return step * int(self.config.get("tokens_per_step") or 0)


def from_records(rows: list[dict], out_dir: str | Path, record=None) -> RunData:
    """A RunData from already-parsed metrics lines (e.g. what `gpt2cloud status` read from the bucket)."""
    data = RunData(out_dir=Path(out_dir), record=record)
    for row in rows:
        if "event" in row:
            data.events.append(row)
        elif "loss" in row:
            data.train.append(row)
        elif "val_loss" in row:
            data.val.append(row)
        elif "hellaswag_acc_norm" in row:
            data.hellaswag.append(row)
        elif "sample" in row:
            data.samples.append(row)
    for rows_ in (data.train, data.val, data.hellaswag, data.samples):
        rows_.sort(key=lambda r: r.get("step", 0))
    return data


def read_metrics(out_dir: str | Path, record=None) -> RunData:
    """Parse OUT/metrics.jsonl (a torn last line from a live run is skipped)."""
    out_dir = Path(out_dir)
    path = out_dir / METRICS
    if not path.is_file():
        raise UserError(f"{path}: not found; give a run's OUT directory (it holds {METRICS}) or a registry run id")
    return from_records(parse_metrics(path.read_text(encoding="utf-8")), out_dir, record)


def _record_for_dir(path: Path):
    """The registry record of a fetched OUT dir: by the run id in its run.json (written at launch and
    fetched with the metrics), else by the dir's name if it is where that run's OUT is looked for.
    A run.json of a run launched on another machine still tells the GPUs and price."""
    from gpt2cloud import registry

    info = None
    if (path / "run.json").is_file():
        try:
            info = json.loads((path / "run.json").read_text())
        except (OSError, json.JSONDecodeError):
            info = None
    if isinstance(info, dict) and info.get("run_id"):
        record = registry.find(info["run_id"])
        if record is not None:
            return record
        gpu, _, count = str(info.get("gpus", "")).partition(":")
        try:
            return registry.RunRecord(
                run_id=info["run_id"], kind="cluster", infra="unknown", run_url="", bucket="",
                data_url=info.get("data_url", ""), recipe=info.get("recipe", ""), gpu_type=gpu,
                gpus_per_node=int(count or 1), nodes=int(info.get("nodes", 1)), spot=False,
                price_per_gpu_hour=float(info.get("price_per_gpu_hour") or 0),
                total_steps=int(info.get("total_steps") or 0), started_at=float(info.get("launched_at") or 0),
                estimate={})
        except (TypeError, ValueError):
            return None
    record = registry.find(path.name)
    if record and path.resolve() in [c.resolve() for c in run_dir_candidates(record)]:
        return record
    return None


def run_dir_candidates(record) -> list[Path]:
    """Where a registry run's OUT may be on this machine: where `gpt2cloud fetch` last put it (the
    record's fetched_dir), then fetch's default --dest under the current dir, then a local run's node."""
    fetched = record.fetched_dir
    candidates = [
        *([Path(fetched)] if fetched else []),  # `gpt2cloud fetch RUN --dest DIR`, as the registry noted it
        Path.cwd() / "runs" / record.run_id,  # `gpt2cloud fetch RUN`'s default --dest
        record.node_dir / "node" / "out",  # an --infra local run's node (gpt2cloud/local_runner.py)
    ]
    return list(dict.fromkeys(candidates))


def load_run(run_or_dir: str) -> RunData:
    """RUN (a registry run id: its fetched OUT dir) or DIR (an OUT dir with metrics.jsonl)."""
    from gpt2cloud import registry

    path = Path(run_or_dir)
    if (path / METRICS).is_file():
        return read_metrics(path, _record_for_dir(path))
    record = registry.find(run_or_dir)
    if record is None:
        raise UserError(f"{run_or_dir}: neither an OUT directory with {METRICS} nor a run in {registry.runs_dir()}")
    for candidate in run_dir_candidates(record):
        if (candidate / METRICS).is_file():
            return read_metrics(candidate, record)
    raise UserError(f"run {record.run_id}: no {METRICS} on this machine yet; "
                    f"run `gpt2cloud fetch {record.run_id}` first")


def model_spec(data: RunData):
    """The run's model shape as the estimator's ModelSpec (None if the config is missing)."""
    from gpt2cloud.recipes import ModelSpec

    try:
        return ModelSpec(**data.config["model"])
    except (KeyError, TypeError, ValueError):
        return None


def run_estimate(data: RunData) -> tuple[Optional[dict], str]:
    """(estimate dict, where it came from): the launch-time estimate from the registry, else one
    computed now from the run's config if its GPUs are known, else (None, why not)."""
    from types import SimpleNamespace

    from gpt2cloud.estimate import estimate
    from gpt2cloud.hardware import gpu_spec, known_gpus

    if data.record is not None and data.record.estimate:
        return data.record.estimate, "launch-time estimate (run registry)"
    spec = model_spec(data)
    if spec is None:
        return None, "no estimate was recorded, and metrics.jsonl has no run config to compute one from"
    gpu = data.gpu_type
    peak = float(data.config.get("peak_flops_per_gpu") or 0)
    if gpu is None and peak > 0:
        # A plain DIR: the trainer was told the GPUs' peak; the first GPU type with that peak
        # (H100 for 989 TFLOPS) has the same calibration and arithmetic.
        gpu = next((g for g in known_gpus() if gpu_spec(g).peak_bf16_tflops * 1e12 == peak), None)
    if gpu is None:
        return None, "no estimate was recorded (not a GPU run of known type)"
    c = data.config
    recipe = SimpleNamespace(name=data.recipe, model=spec, train=SimpleNamespace(
        steps=c["steps"], tokens_per_step=c["tokens_per_step"], micro_batch=c["micro_batch"]))
    try:
        e = estimate(recipe, gpu_type=gpu, gpus_per_node=data.world_size,
                     price=data.price_per_gpu_hour or None, check_batch=False)
    except UserError as err:
        return None, f"no estimate was recorded, and none can be computed: {err}"
    return e.to_dict(), f"computed now by gpt2cloud.estimate for {data.world_size} x {gpu} (none was recorded)"
