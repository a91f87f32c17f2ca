"""A finished (or running) run as plot, report and calibration see it: its OUT dir, its spec, its metrics.

The metrics are model/metrics.py's RunMetrics (the one reader of metrics.jsonl); the spec comes from
the run registry, or from the run.json fetched with the metrics (a run launched on another machine).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from gpt2cloud.cost.estimate import Estimate, estimate_config
from gpt2cloud.cost.hardware import gpu_spec, known_gpus
from gpt2cloud.errors import UserError
from gpt2cloud.runs import registry
from gpt2cloud.runs.fetch import read_marker
from gpt2cloud.runs.registry import RunRecord, RunSpec
from gpt2cloud.store.layout import METRICS, RUN_JSON, TIMELINE
from model.config import GPTConfig, TrainConfig
from model.metrics import RunMetrics


@dataclass
class RunData:
    out_dir: Path
    metrics: RunMetrics = field(default_factory=RunMetrics)
    spec: Optional[RunSpec] = None  # from the registry, or the run.json fetched with the metrics
    record: Optional[RunRecord] = None  # when the run is in this machine's registry

    # ---- the metrics' lines ----
    @property
    def train(self) -> list:
        return self.metrics.train

    @property
    def val(self) -> list:
        return self.metrics.val

    @property
    def hellaswag(self) -> list:
        return self.metrics.hellaswag

    @property
    def samples(self) -> list:
        return self.metrics.samples

    @property
    def config(self) -> dict:
        return self.metrics.config

    # ---- what the run was ----
    @property
    def run_id(self) -> str:
        if self.spec:
            return self.spec.run_id
        # "out" says nothing; "tiny/out" does.
        d = self.out_dir.resolve()
        return f"{d.parent.name}/{d.name}" if d.name in ("out", "OUT") else d.name

    @property
    def recipe(self) -> str:
        return (self.spec.recipe if self.spec else None) or self.config.get("recipe_name") or "unknown recipe"

    @property
    def world_size(self) -> int:
        return int(self.metrics.start.get("world_size") or (self.spec.gpus if self.spec else 1))

    @property
    def gpu_type(self) -> Optional[str]:
        """The GPU type, known from the spec; None for a plain DIR or a local CPU run."""
        on_gpu = self.metrics.start.get("device", "cuda") != "cpu"
        if self.spec and not self.spec.local and self.spec.gpu_type and on_gpu:
            # a launch over GPU candidates: the one the node found it has (model/config.py resolve_gpu)
            return (self.metrics.start.get("config") or {}).get("gpu") or self.spec.gpu_type
        return None

    @property
    def hardware(self) -> str:
        if self.gpu_type:
            s = self.spec
            nodes = f"{s.nodes} nodes x " if s.nodes > 1 else ""
            return f"{nodes}{s.gpus_per_node} x {self.gpu_type}{' (spot)' if s.spot else ''}"
        device = self.metrics.start.get("device", "unknown device")
        peak = float(self.config.get("peak_flops_per_gpu") or 0)
        if device == "cuda":
            device = f"GPU ({peak / 1e12:g} TFLOPS peak)" if peak else "GPU"
        return f"{self.world_size} x {device}" + (" (local)" if self.spec and self.spec.local else "")

    @property
    def price_per_gpu_hour(self) -> float:
        return price_of(self.spec, self.metrics)

    @property
    def peak_flops_per_gpu(self) -> Optional[float]:
        """Peak BF16 FLOPS of one GPU: the spec's GPU type, else what the trainer was told."""
        if self.gpu_type:
            try:
                return gpu_spec(self.gpu_type).peak_bf16_tflops * 1e12
            except UserError:
                return None
        return float(self.config.get("peak_flops_per_gpu") or 0) or None

    @property
    def total_steps(self) -> Optional[int]:
        return self.metrics.total_steps or (self.spec.total_steps if self.spec else None)

    @property
    def finished(self) -> bool:
        return self.metrics.finished

    # ---- what it measured ----
    @property
    def last_step(self) -> int:
        return self.metrics.last_step

    @property
    def tokens_seen(self) -> int:
        return self.metrics.tokens_seen

    @property
    def wall_seconds(self) -> float:
        return self.metrics.elapsed_seconds or 0.0

    @property
    def gpu_hours(self) -> float:
        return self.wall_seconds / 3600 * self.world_size

    @property
    def cost_usd(self) -> Optional[float]:
        return self.metrics.cost_usd(self.world_size, self.price_per_gpu_hour)

    def steady_tokens_per_second(self) -> Optional[float]:
        return self.metrics.tokens_per_second()

    def tokens_at(self, step: int) -> int:
        """Tokens seen at a step (from the step's own line, else steps x tokens per step)."""
        for r in self.train:
            if r["step"] == step:
                return int(r.get("tokens_seen", 0))
        return step * int(self.config.get("tokens_per_step") or 0)


def price_of(spec: Optional[RunSpec], metrics: RunMetrics) -> float:
    """USD per GPU-hour of the run's nodes, as status, report and the model card count its dollars: the node's
    own (its node_up event: its cloud's price of the GPU it found), else the trainer's start config's where it
    names the `gpu` it found (a launch over GPU candidates, model/config.py resolve_gpu), else the spec's (the
    launch's: the dearest candidate's), else the config's (a plain DIR); 0 when none is known."""
    if metrics.node_price:
        return float(metrics.node_price)
    cfg = metrics.config
    if cfg.get("gpu") and cfg.get("price_per_gpu_hour"):
        return float(cfg["price_per_gpu_hour"])
    if spec is not None and spec.price_per_gpu_hour:
        return float(spec.price_per_gpu_hour)
    return float(cfg.get("price_per_gpu_hour") or 0.0)


def read_metrics(out_dir: str | Path, spec: Optional[RunSpec] = None, record: Optional[RunRecord] = None) -> RunData:
    """OUT/metrics.jsonl read back (a torn last line from a live run is skipped)."""
    out_dir = Path(out_dir)
    path = out_dir / METRICS
    if not path.is_file():
        raise UserError(f"{path}: not found; give a run's OUT directory (it holds {METRICS}) or a registry run id")
    return RunData(out_dir, RunMetrics.read(path, out_dir / TIMELINE), spec=spec or (record.spec if record else None), record=record)


def _spec_for_dir(path: Path) -> tuple[Optional[RunSpec], Optional[RunRecord]]:
    """(spec, registry record) of a fetched OUT dir: by the run id in its run.json (written at launch and
    fetched with the metrics), else by the dir's name if it is where that run's OUT is looked for. The
    run.json of a run launched on another machine still tells its GPUs and price."""
    spec = None
    try:
        spec = RunSpec.from_dict(json.loads((path / RUN_JSON).read_text()))
    except (OSError, ValueError):
        pass
    if spec is not None:
        record = registry.find(spec.run_id)
        return (record.spec, record) if record else (spec, None)
    fetched = _fetched_run(path)  # fetch's marker names the run even where no run.json came with it
    if fetched and registry.find(fetched):
        record = registry.find(fetched)
        return record.spec, record
    record = registry.find(path.name)
    if record and path.resolve() in [c.resolve() for c in run_dir_candidates(record)]:
        return record.spec, record
    return None, None


def _fetched_run(path: Path) -> Optional[str]:
    """The run id `gpt2cloud fetch` recorded in a directory it fetched into."""
    return (read_marker(path) or {}).get("run")


def run_dir_candidates(record) -> list[Path]:
    """Where a registry run's OUT may be on this machine: where `gpt2cloud fetch` last put it (the
    record's fetched_dir), then fetch's default --dest under the current dir, then a local run's node."""
    fetched = record.fetched_dir
    candidates = [
        *([Path(fetched)] if fetched else []),  # `gpt2cloud fetch RUN --dest DIR`, as the registry noted it
        Path.cwd() / "runs" / record.run_id,  # `gpt2cloud fetch RUN`'s default --dest
        record.node_dir / "node" / "out",  # an --infra local run's node (gpt2cloud/backends/local.py)
    ]
    return list(dict.fromkeys(candidates))


def load_run(run_or_dir: str) -> RunData:
    """RUN (a registry run id: its fetched OUT dir) or DIR (an OUT dir with metrics.jsonl)."""
    path = Path(run_or_dir)
    if (path / METRICS).is_file():
        spec, record = _spec_for_dir(path)
        return read_metrics(path, spec, record)
    record = registry.find(run_or_dir)
    if record is None:
        raise UserError(f"{run_or_dir}: neither an OUT directory with {METRICS} nor a registry run id "
                        "(`gpt2cloud runs` lists them)")
    for candidate in run_dir_candidates(record):
        if (candidate / METRICS).is_file():
            return read_metrics(candidate, record=record)
    raise UserError(f"run {record.run_id}: no {METRICS} on this machine yet; "
                    f"run `gpt2cloud fetch {record.run_id}` first")


def model_config(data: RunData) -> Optional[GPTConfig]:
    """The run's model shape (None if the metrics hold no config)."""
    try:
        return GPTConfig(**data.config["model"])
    except (KeyError, TypeError, ValueError):
        return None


def run_estimate(data: RunData) -> tuple[Optional[Estimate], str]:
    """(estimate, where it came from): the launch-time estimate from the spec, else one computed
    now from the run's config if its GPUs are known, else (None, why not)."""
    if data.spec is not None and data.spec.estimate is not None:
        return data.spec.estimate, "launch-time estimate (run registry)"
    try:
        cfg = TrainConfig.from_dict(data.config) if data.config.get("model") else None
    except (TypeError, ValueError):
        cfg = None
    if cfg is None:
        return None, "no estimate was recorded, and metrics.jsonl has no run config to compute one from"
    gpu = data.gpu_type
    peak = float(data.config.get("peak_flops_per_gpu") or 0)
    if gpu is None and peak > 0:
        # A plain DIR: the trainer was told the GPUs' peak; the first GPU type with that peak
        # (H100 for 989 TFLOPS) has the same calibration and arithmetic.
        gpu = next((g for g in known_gpus() if gpu_spec(g).peak_bf16_tflops * 1e12 == peak), None)
    if gpu is None:
        return None, "no estimate was recorded (not a GPU run of known type)"
    try:
        e = estimate_config(data.recipe, cfg, gpu, data.world_size, price=data.price_per_gpu_hour or None,
                            check_batch=False)
    except UserError as err:
        return None, f"no estimate was recorded, and none can be computed: {err}"
    return e, f"computed now by gpt2cloud.cost.estimate for {data.world_size} x {gpu} (none was recorded)"
