"""Calibration feedback: each finished GPU run teaches `gpt2cloud estimate` the MFU it really got.

Written by `gpt2cloud report` (never by a read command such as status).

For a run in the registry that finished on GPUs of a known type, the measured MFU is
    median tokens/s after warm-up x FLOPs per token / (GPUs x peak BF16 FLOPS per GPU)
with the estimator's own FLOPs formula (6N + 12*L*d*T) and peak table, so the figure is directly
comparable with the bundled points. It is appended to the user calibration file
(`gpt2cloud.home.user_calibration_path()`, JSON lines), once per run, and `default_mfu` then
interpolates with it like any published point.

A run over several nodes is not an MFU point: its step also waits for the gradient all-reduce between
nodes, which a single-node estimate never pays. Its measured step, beyond the compute the (single-node)
calibration predicts, is the exposed all-reduce; the point records it with the nodes and the interconnect
(kind "network") and the link efficiency that reproduces it (gpt2cloud/cost/network.py), which later
estimates on the same cloud and instance use. The MFU calibration is the compute side: a single-node run
on the same GPUs calibrates it first.
"""

from __future__ import annotations

import json
import time
from typing import Optional

from gpt2cloud.cost.estimate import estimate_config
from gpt2cloud.cost.hardware import gpu_spec
from gpt2cloud.cost.network import NETWORK_KIND, measured_link_efficiency
from gpt2cloud.cost.phases import PER_LAUNCH
from gpt2cloud.errors import UserError
from gpt2cloud.home import user_calibration_path
from gpt2cloud.runs.rundata import RunData, model_config
from model.config import TrainConfig

MIN_STEPS = 20  # fewer steps than this say more about warm-up than about steady throughput


def source_for(run_id: str) -> str:
    return f"gpt2cloud run {run_id}"


def measured_mfu(data: RunData) -> Optional[float]:
    """The run's MFU by the estimator's formula, or None if throughput, GPU peak or model is unknown."""
    tokens_per_second = data.steady_tokens_per_second()
    model = model_config(data)
    peak = data.peak_flops_per_gpu
    if tokens_per_second is None or model is None or not peak:
        return None
    return tokens_per_second * model.flops_per_token() / (data.world_size * peak)


def _already_recorded(source: str) -> bool:
    path = user_calibration_path()
    if not path.exists():
        return False
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("source") == source:
                return True
        except (json.JSONDecodeError, AttributeError):
            continue
    return False


def record_calibration(data: RunData) -> tuple[Optional[dict], str]:
    """Append the run's measured MFU to the user calibration file (once per run).

    Returns (the point written, or None; a one-line explanation for the report).
    """
    if data.spec is None:
        return None, "not recorded: not a registry run (GPU type unknown)"
    if data.gpu_type is None:
        return None, "not recorded: not a run on GPUs of a known type (a local or CPU run)"
    if not data.finished:
        return None, "not recorded yet: the run has not finished"
    if len(data.train) < MIN_STEPS:
        return None, f"not recorded: only {len(data.train)} steps (need {MIN_STEPS} for a steady throughput)"
    source = source_for(data.run_id)
    if _already_recorded(source) or _already_recorded(f"{source}: network"):
        return None, f"already in {user_calibration_path()}"
    mfu = measured_mfu(data)
    if mfu is None or not 0 < mfu <= 1:
        shown = "unknown" if mfu is None else f"{mfu:.1%}"
        return None, f"not recorded: measured MFU {shown} is not plausible"
    if data.spec.nodes > 1:
        return record_network(data, mfu, source)
    point = {
        "gpu": gpu_spec(data.gpu_type).name,
        "params": model_config(data).param_count(),
        "mfu": round(mfu, 4),
        "kind": "measured",
        "nodes": 1,
        "source": source,
        "date": _date(data),
    }
    path = _append(point)
    return point, f"recorded MFU {mfu:.1%} for {point['gpu']} in {path}"


def _date(data: RunData) -> str:
    return time.strftime("%Y-%m-%d", time.localtime(data.record.started_at if data.record else time.time()))


def _append(point: dict):
    path = user_calibration_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:  # one short append: concurrent writers do not interleave
        f.write(json.dumps(point) + "\n")
    return path


def record_network(data: RunData, mfu: float, source: str) -> tuple[Optional[dict], str]:
    """A multi-node run's point: its measured step against the compute the single-node calibration
    predicts for it, on the interconnect its launch estimate assumed (the table's, when none was recorded).
    A launch over GPU candidates is estimated at the dearest one's instance: when the node found another GPU,
    that estimate's network is not the one the run had, and nothing is recorded."""
    spec, launched = data.spec, data.spec.estimate
    found = data.config.get("gpu")
    if found and found != spec.gpu_type:
        return None, (f"network not recorded: the nodes had {found}, not {spec.gpu_type} (the dearest GPU "
                      "candidate), whose instance the launch's interconnect figure is of; MFU not recorded (a "
                      "multi-node step)")
    try:
        cfg = TrainConfig.from_dict(data.config)
        gbps = launched.interconnect_gbps if launched is not None and launched.interconnect_gbps > 0 else None
        now = estimate_config(spec.recipe, cfg, data.gpu_type, spec.gpus_per_node, spec.nodes,
                              price=spec.price_per_gpu_hour or None, check_batch=False, interconnect_gbps=gbps)
    except (TypeError, ValueError, UserError) as err:
        return None, f"not recorded: a {spec.nodes}-node run whose config cannot be estimated ({err})"
    key = launched.interconnect_key if launched is not None else ""
    measured_step = cfg.tokens_per_step / data.steady_tokens_per_second()
    efficiency = measured_link_efficiency(cfg.model, spec.gpus_per_node, spec.nodes, now.interconnect_gbps,
                                          now.compute_seconds, now.grad_accum, measured_step)
    point = {
        "kind": NETWORK_KIND, "gpu": gpu_spec(data.gpu_type).name, "params": model_config(data).param_count(),
        "nodes": spec.nodes, "gpus_per_node": spec.gpus_per_node, "interconnect": key,
        "interconnect_gbps": now.interconnect_gbps,
        "link_efficiency": None if efficiency is None else round(efficiency, 4),
        "measured_step_seconds": round(measured_step, 6), "compute_step_seconds": round(now.compute_seconds, 6),
        "scaling_efficiency": round(min(1.0, now.compute_seconds / measured_step), 4),
        "mfu_with_network": round(mfu, 4),  # not "mfu": never read as a single-node MFU point
        "source": f"{source}: network", "date": _date(data),
    }
    path = _append(point)
    where = f"{spec.nodes} nodes, {key or 'an unnamed cloud instance (no later estimate can use it)'}"
    if efficiency is None:
        return point, (f"recorded the network of {where} in {path}: the steps took no longer than the calibrated "
                       "compute, so nothing was learned about the link; MFU not recorded (a multi-node step)")
    return point, (f"recorded the network of {where}: scaling {point['scaling_efficiency']:.0%}, link efficiency "
                   f"{efficiency:.0%} of {now.interconnect_gbps:,.0f} Gb/s, in {path}; MFU not recorded (a "
                   "multi-node step includes the network)")


def measured_phases(data: RunData) -> dict[str, float]:
    """Hours per phase the run really spent (all its attempts): the node's timeline, the trainer's own
    durations, and provisioning from the launch time in the registry. Empty without a timeline."""
    seconds = data.metrics.phase_seconds()
    ups = sorted(e["time"] for e in data.metrics.events if e.get("event") == "node_up" and "time" in e)
    if not ups:
        return {}
    out = {k: v / 3600 for k, v in seconds.items()}
    if data.record is not None:
        since_launch = [u for u in ups if u >= data.record.started_at - 60]
        out["provisioning"] = max(0.0, since_launch[0] - data.record.started_at) / 3600 if since_launch else 0.0
    return out


def record_phases(data: RunData) -> tuple[list[dict], str]:
    """Append the per-launch phases a finished run measured (provisioning, setup, compile, finish) and its
    data download rate to the user calibration file, once per run: later estimates use their median
    instead of the table's defaults."""
    if data.spec is None or not data.finished:
        return [], "not recorded: " + ("not a registry run" if data.spec is None else "the run has not finished")
    phases = measured_phases(data)
    if not phases:
        return [], "not recorded: the run has no node timeline (a run of `gpt2cloud train`)"
    source = f"{source_for(data.run_id)}: phases"
    if _already_recorded(source):
        return [], f"already in {user_calibration_path()}"
    launches = max(1, sum(1 for e in data.metrics.events if e.get("event") == "node_up"))
    gpu = data.gpu_type or data.spec.gpu_type  # the GPU the node found (GPU candidates), else the launch's
    points = [{"kind": "phase", "phase": p, "hours": round(phases[p] / launches, 9), "local": data.spec.local,
               "gpu": gpu, "source": source} for p in PER_LAUNCH if p in phases]
    downloads = [e for e in data.metrics.events if e.get("event") == "data" and e.get("bytes")
                 and isinstance(e.get("start"), (int, float)) and e["time"] - e["start"] > 1]
    if downloads:  # a rate from downloads long enough to time (a cached, already verified set is not one)
        seconds = sum(e["time"] - e["start"] for e in downloads)
        points.append({"kind": "phase", "phase": "data_mb_per_s", "local": data.spec.local, "gpu": gpu,
                       "value": round(sum(e["bytes"] for e in downloads) / 1e6 / seconds, 3), "source": source})
    path = user_calibration_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(p) + "\n" for p in points))
    return points, f"recorded {', '.join(p['phase'] for p in points)} per launch in {path}"
