"""The whole bill: every phase a node is up for, not only the training loop.

    provisioning  asking the cloud for the VM until it boots
    setup         the venv, torch for the node's CUDA, this build of the trainer
    data          the wait for the first shards: validation and the first training shard (the rest streams
                  in behind the training loop, which waits only for a shard that has not landed yet)
    compile       torch.compile and the first step's allocations
    training      the training loop (the estimate's wall_hours)
    evals         validation, HellaSwag and checkpoints between the steps (every checkpoint_every steps,
                  and the time-based ones checkpoint_minutes apart in between: checkpoint_count)
    finish        the trainer's exit and the final push of the last checkpoint
    idle          the minutes before autostop removes the node
    recovery      spot only: relaunches after preemptions, and the steps redone since the last checkpoint
                  (half the interval between checkpoints, which checkpoint_minutes bounds)
The node bills GPUs x price for the sum of these hours; a spot run also pays SkyPilot's managed-jobs
controller VM for as long. Defaults come from tables/phases.yaml; this user's measured phases
(recorded by `gpt2cloud report`) replace them.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from gpt2cloud.cost.hardware import table, user_points
from gpt2cloud.cost.optimizers import checkpoint_bytes

PHASES = ("provisioning", "setup", "data", "compile", "training", "evals", "finish", "idle", "recovery")
PER_LAUNCH = ("provisioning", "setup", "compile", "finish")  # measured by finished runs, one value per launch
RATES = ("data_mb_per_s",)  # measured by finished runs as a rate
HELLASWAG_EXAMPLES = 10042
SHARD_TOKENS = 100_000_000  # llm.c's shard size: `data prepare`'s default and the published Hub shard sets'
# model/stop.py's MARGIN (cost/ may not import it: model.stop reaches numpy through the store): the trainer's
# timer checkpoints once the next iteration, this many times the slowest recent one, would pass the minutes
TIMER_MARGIN = 1.5


@dataclass(frozen=True)
class Bill:
    breakdown_hours: dict  # phase -> hours the node is up for it; they sum to all_in_hours
    all_in_hours: float
    all_in_cost_usd: float  # node hours x GPUs x price, plus the spot controller
    controller_usd: float
    sources: dict  # phase -> where its figure came from


def defaults(local: bool) -> dict[str, tuple[float, str]]:
    """Each phase's default (value, source); a phase measured by this user's runs uses their median."""
    rows = table("phases")["local" if local else "cloud"]
    out = {k: (float(v.get("minutes", v.get("value", 0))), v["source"]) for k, v in rows.items()}
    measured: dict[str, list[float]] = {}
    for p in user_points():
        if p.get("kind") == "phase" and p.get("phase") in (*PER_LAUNCH, *RATES) and bool(p.get("local")) == local:
            try:  # per-launch phases in hours (the table's are minutes), rates as they are
                value = float(p["value"]) if p["phase"] in RATES else float(p["hours"]) * 60
            except (KeyError, TypeError, ValueError):
                continue
            measured.setdefault(p["phase"], []).append(value)
    for phase, minutes in measured.items():
        out[phase] = (statistics.median(minutes), f"median of {len(minutes)} of your runs (gpt2cloud report)")
    return out


def timer_steps(cfg, step_seconds: float) -> int | None:
    """Steps between two of the trainer's time-based checkpoints (None: no timer). Its timer
    (model/stop.py CheckpointTimer) fires at the check where the next iteration, with the policy's
    margin, would take the time since the last checkpoint past checkpoint_minutes."""
    if cfg.checkpoint_minutes <= 0 or step_seconds <= 0:
        return None
    return max(1, math.ceil(cfg.checkpoint_minutes * 60 / step_seconds - TIMER_MARGIN))


def checkpoint_seconds(cfg, step_seconds: float) -> float:
    """The training seconds between two checkpoints: checkpoint_every steps, or fewer when the timer comes
    first."""
    every = cfg.checkpoint_every if cfg.checkpoint_every > 0 else cfg.steps
    return min(every, timer_steps(cfg, step_seconds) or every) * step_seconds


def checkpoint_count(cfg, step_seconds: float) -> int:
    """The checkpoints a run writes: one every checkpoint_every steps and at the last step, plus the
    timer's in each stretch between two of those (the timer restarts at every checkpoint)."""
    every = cfg.checkpoint_every if cfg.checkpoint_every > 0 else cfg.steps
    full, rest = divmod(cfg.steps, every)
    timer = timer_steps(cfg, step_seconds) or every

    def per_stretch(steps: int) -> int:  # a stretch's checkpoints, the one that ends it included
        return max(1, math.ceil(steps / timer))

    return full * per_stretch(every) + (per_stretch(rest) if rest else 1)


def bill(est, cfg, local: bool = False, spot: bool = False, idle_minutes: float = 10.0) -> Bill:
    """The all-in bill of an estimate (gpt2cloud.cost.estimate.Estimate) for a training config."""
    d = defaults(local)
    tokens_per_s = est.tokens_per_second
    val_evals = cfg.steps // cfg.val_every + 1 if cfg.val_every > 0 else 0
    hs_evals = cfg.steps // cfg.hellaswag_every + 1 if cfg.hellaswag_every > 0 else 0
    checkpoints = checkpoint_count(cfg, est.step_seconds)
    cadence = f"every {cfg.checkpoint_every} steps" + (f" or {cfg.checkpoint_minutes:g} min, whichever comes first"
                                                       if cfg.checkpoint_minutes > 0 else "")
    ckpt_bytes = checkpoint_bytes(cfg.model, cfg.optimizer)  # written, then read to hash
    evals_s = (val_evals * cfg.val_steps * cfg.micro_batch * cfg.model.block_size / (3 * tokens_per_s)  # forward only
               + hs_evals * HELLASWAG_EXAMPLES / est.gpus * d["hellaswag_seconds_per_example"][0]
               + checkpoints * ckpt_bytes / (d["checkpoint_gb_per_s"][0] * 1e9))
    # what the first step waits for: the val shard and the first training shard; the rest arrives while it trains
    first_bytes = min(est.tokens, 2 * SHARD_TOKENS) * 2
    data_s = first_bytes / (d["data_mb_per_s"][0] * 1e6)
    hours = {
        "provisioning": d["provisioning"][0] / 60,
        "setup": d["setup"][0] / 60,
        "data": data_s / 3600,
        "compile": d["compile"][0] / 60,
        "training": est.wall_hours,
        "evals": evals_s / 3600,
        "finish": (d["finish"][0] * 60 + ckpt_bytes / (d["data_mb_per_s"][0] * 1e6)) / 3600,
        "idle": 0.0 if local else idle_minutes / 60,
        "recovery": 0.0,
    }
    sources = {"provisioning": d["provisioning"][1], "setup": d["setup"][1],
               "data": (f"the first {first_bytes / 1e9:.1f} GB (val + first training shard) of {est.tokens * 2 / 1e9:.1f} GB "
                        f"at {d['data_mb_per_s'][0]:g} MB/s, the rest streamed during training: {d['data_mb_per_s'][1]}"),
               "compile": d["compile"][1], "training": est.mfu_source,
               "evals": f"val loss (forward passes), HellaSwag and {checkpoints} checkpoints ({cadence})",
               "finish": f"{d['finish'][1]}, and the last checkpoint uploaded at the data rate",
               "idle": "--idle-minutes before autostop tears the node down" if not local else "no idle node",
               "recovery": "on-demand: no preemption"}
    controller_usd = 0.0
    if spot and not local:
        relaunch = hours["provisioning"] + hours["setup"] + hours["data"] + hours["compile"]
        redo = checkpoint_seconds(cfg, est.step_seconds) / 2 / 3600  # half the interval between checkpoints
        preemptions = est.wall_hours / d["hours_between_preemptions"][0]
        hours["recovery"] = preemptions * (relaunch + redo)
        sources["recovery"] = (f"{preemptions:.1f} preemptions ({d['hours_between_preemptions'][1]}), each a relaunch "
                               f"and half the interval between checkpoints ({cadence}) redone")
    total = sum(hours.values())
    if spot and not local:
        controller_usd = total * d["controller_usd_per_hour"][0]
        sources["controller"] = d["controller_usd_per_hour"][1]
    cost = total * est.gpus * est.price_per_gpu_hour + controller_usd
    return Bill(hours, total, cost, controller_usd, sources)
