"""Resume a run from the newest complete checkpoint in OUT: weights, optimizer, schedule position, data
position, RNG, the clock's earlier seconds and the trackers' run id.

Rank 0 chooses the checkpoint and every rank must see that same one; its files are verified (sha256)
once per node, and it must be this run's continuation (the same recipe, model and data), or the run is
refused with one line saying why and how to go on (model/checkpoint.py's refusals).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from gpt2cloud.store.layout import CHECKPOINTS
from model import checkpoint as ckpt
from model.startup import TrainError
from model.trackers import RUN_ID_KEY

if TYPE_CHECKING:  # the trainer's shared state; model.train imports this module
    from model.train import Trainer


def find_checkpoint(t: Trainer, resume_mode: str) -> Path | None:
    """The newest complete checkpoint in OUT: rank 0 chooses; every rank must see that same one (shared or
    synced OUT on every node)."""
    latest = ckpt.latest_checkpoint(t.out)
    if t.p.ddp:
        chosen = [latest.name if latest is not None else None]
        dist.broadcast_object_list(chosen, src=0)
        latest = t.out / CHECKPOINTS / chosen[0] if chosen[0] else None
        if latest is not None and not (latest / ckpt.MANIFEST).exists():
            raise TrainError(f"rank {t.p.rank} cannot see {latest}: --out must be on a filesystem every node "
                             "shares, or be copied to every node before resuming")
    if latest is not None and resume_mode == "never":
        raise TrainError(f"{t.out} already holds checkpoints (newest {latest.name}); use --resume auto to "
                         "continue that run, or a new --out to start another")
    return latest


def check_resumable(t: Trainer, latest: Path) -> None:
    """Intact (the sha256 of every file once per node: its LOCAL_RANK 0 reads them all; the other ranks read
    the manifest only, and no rank goes on if the check failed anywhere) and this run's continuation."""
    error = None
    try:
        saved = ckpt.verify_checkpoint(latest) if t.p.local_rank == 0 else ckpt.read_manifest(latest)
    except ckpt.CheckpointError as e:
        error = str(e)
    if t.p.ddp:
        failed = torch.tensor(int(error is not None), device=t.p.device)
        dist.all_reduce(failed)
        if failed.item() and error is None:
            error = f"{latest}: a file failed its sha256 check on another node"
    if error is not None:
        raise TrainError(ckpt.damaged_refusal(latest, error))
    resumed_state = json.loads((latest / "trainer_state.json").read_text())
    refusal = ckpt.resume_refusal(latest, saved["config"], t.cfg, resumed_state.get("data_identity"),
                                  t.data.identity)
    if refusal:  # another recipe, model or data: not this run's continuation
        raise TrainError(refusal)


def resume(t: Trainer, resume_mode: str) -> None:
    latest = find_checkpoint(t, resume_mode)
    if latest is None:
        return
    check_resumable(t, latest)
    p = t.p
    state = ckpt.load_training_state(latest, t.s.raw_model, t.s.optimizer, t.s.scaler, p.rank, p.device)
    t.data.train.set_state(state["data"])
    t.latest, t.step, t.saved_step = latest, state["step"], state["step"]
    t.clock.elapsed_before = state["elapsed_seconds"]
    t.clock.gpu_seconds_before = state.get("gpu_seconds", state["elapsed_seconds"] * state["world_size"])
    t.tokens_seen, t.loss = state["tokens_seen"], state["loss"]
    t.tracker_run_id = state.get(RUN_ID_KEY)  # None: a checkpoint from before trackers kept one
    t.policy.resumed(state.get("slowest_iteration_seconds", 0.0), state.get("loss"))  # every rank: the same file
    if state["world_size"] != p.world:
        p.log(f"note: {latest.name} was written by {state['world_size']} ranks, this run has {p.world}: same data "
              f"position and tokens per step, gradient accumulation now {t.grad_accum}")
    if not state["rng_restored"]:  # a rank the checkpoint did not have: a fresh, distinct stream
        torch.manual_seed(t.cfg.seed + 1000 * p.rank + t.step)
    p.log(f"resuming from {latest} (step {t.step})")
