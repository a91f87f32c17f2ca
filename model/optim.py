"""The optimizers a TrainConfig may name (cfg.optimizer), one registry line each.

A factory takes (raw_model, cfg, device_type) and returns one torch.optim.Optimizer whose param groups
each carry "lr_ratio": the group's lr relative to the schedule's value for cfg.lr (model/step.py sets
group["lr"] = lr * lr_ratio every step). Checkpoints hold its state_dict(), so any optimizer works with
resume. A new optimizer is its module plus one line in OPTIMIZERS (and the recipe schema's name for it,
gpt2cloud/cost/recipes.py, on the launch side).
"""

from __future__ import annotations

import torch

from model.config import TrainConfig
from model.muon import muon_optimizer


def adamw_optimizer(raw_model, cfg: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    """GPT.configure_optimizer's AdamW (decay on 2-D tensors only), unchanged; every group at the schedule's lr."""
    opt = raw_model.configure_optimizer(cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps, device_type)
    for group in opt.param_groups:
        group["lr_ratio"] = 1.0
    return opt


OPTIMIZERS = {
    "adamw": adamw_optimizer,
    "muon": muon_optimizer,  # Muon for the blocks' 2-D weights, AdamW for the rest (model/muon.py)
}


def build_optimizer(raw_model, cfg: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    """The optimizer cfg.optimizer names; a name not in OPTIMIZERS is a ValueError that lists them."""
    factory = OPTIMIZERS.get(cfg.optimizer)
    if factory is None:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r} ({' or '.join(OPTIMIZERS)})")
    return factory(raw_model, cfg, device_type)
