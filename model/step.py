"""One training step and what it needs: the schedule, the precision, the model and optimizer as the
trainer (model/train.py) and benchmarks/bench_train.py both build them, and the step itself."""

from __future__ import annotations

import dataclasses
import functools
import math
import random

import numpy as np
import torch

from model.config import TrainConfig
from model.gpt import GPT
from model.optim import build_optimizer


def schedule_length(cfg: TrainConfig) -> int:
    """The schedule's length: schedule_steps, or steps when it is 0 (unset)."""
    return cfg.schedule_steps or cfg.steps


def get_lr(it: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then down to lr * min_lr_ratio at the schedule's last step
    (schedule_steps; `--steps` only says where this run stops), then flat at the minimum. The way down:
    cosine: a cosine from the end of warmup. wsd (warmup-stable-decay): flat at the peak, then linear over
    the last cooldown_frac of the schedule."""
    max_lr, min_lr = cfg.lr, cfg.lr * cfg.min_lr_ratio
    total = schedule_length(cfg)
    if it < cfg.warmup_steps:
        return max_lr * (it + 1) / cfg.warmup_steps
    if it >= total:
        return min_lr
    if cfg.schedule == "wsd":
        cooldown = cfg.cooldown_frac * total
        left = total - it  # steps until the end: the cooldown runs while fewer than `cooldown` are left
        if left >= cooldown:
            return max_lr
        return min_lr + (max_lr - min_lr) * left / cooldown
    decay = (it - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * decay)) * (max_lr - min_lr)


def pick_dtype(setting: str, device_type: str) -> torch.dtype:
    """auto: bf16 on CUDA that has it, fp16 (with a GradScaler) on older CUDA, fp32 on CPU."""
    if setting == "auto":
        if device_type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[setting]


@dataclasses.dataclass
class Setup:
    """The model and what trains it, as the trainer and benchmarks/bench_train.py both build them."""

    raw_model: GPT  # what is saved and sampled from: never compiled, never DDP-wrapped
    model: torch.nn.Module  # raw_model, compiled when cfg.compile
    dtype: torch.dtype
    amp: functools.partial  # autocast context for the forward passes
    scaler: torch.amp.GradScaler  # enabled for fp16 only
    optimizer: torch.optim.Optimizer


def setup_training(cfg: TrainConfig, device: str) -> Setup:
    """Seed, precision, model, optimizer (the same seed on every rank: identical initial weights)."""
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast use TF32
        torch.backends.cudnn.allow_tf32 = True
    raw_model = GPT(cfg.model).to(device)
    dtype = pick_dtype(cfg.dtype, device_type)
    amp = functools.partial(torch.autocast, device_type=device_type, dtype=dtype, enabled=dtype != torch.float32)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
    optimizer = build_optimizer(raw_model, cfg, device_type)  # cfg.optimizer, from model/optim.py's registry
    # compiled lazily, at the first forward: loading a checkpoint into raw_model first is fine
    model = torch.compile(raw_model) if cfg.compile else raw_model
    return Setup(raw_model, model, dtype, amp, scaler, optimizer)


def train_step(model, optimizer, scaler, loader, grad_accum, amp, grad_clip, lr, ddp, device):
    """One optimizer step over `grad_accum` micro-batches: (this rank's mean loss, gradient norm).
    lr is the schedule's value for cfg.lr; a group with an "lr_ratio" (Muon's) runs at lr * lr_ratio."""
    optimizer.zero_grad(set_to_none=True)
    loss_accum = torch.zeros((), device=device)
    for micro in range(grad_accum):
        x, y = loader.next_batch()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if ddp:
            # all-reduce gradients once per step, during the last micro-step's backward
            model.require_backward_grad_sync = micro == grad_accum - 1
        with amp():
            _, loss = model(x, y)
        loss = loss / grad_accum  # gradients of the step's mean loss, not of a sum of means
        loss_accum += loss.detach()
        scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # clip the true gradients, not fp16-scaled ones
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)
    scaler.step(optimizer)
    scaler.update()
    return loss_accum, norm
