"""What the trainer (model/train.py) sets up before its first step: the config, this process among the
run's (torchrun, DDP), the data and HellaSwag. The model and optimizer are model/step.py's setup_training."""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from model import checkpoint as ckpt
from model import trackers
from model.config import TrainConfig, price_here, resolve_gpu
from model.data import TokenLoader, find_shards
from model.eval import EvalDataError, load_hellaswag, val_loader_steps
from model.shards import ShardError
from model.step import schedule_length
from model.tokenizer import VOCAB_SIZE


class TrainError(RuntimeError):
    """A problem the user can fix (config, resume); printed as one line, exit code 2."""


def load_config(args) -> TrainConfig:
    try:
        cfg = TrainConfig.load(args.config)
    except (OSError, ValueError, TypeError) as e:
        raise TrainError(f"config {args.config}: {e}") from None
    # The schedule's length is the config's (recipe's) steps unless schedule_steps says otherwise;
    # --steps only moves where this run stops, so 20 steps then 40 follow one schedule.
    if args.schedule_steps:
        cfg.schedule_steps = args.schedule_steps
    cfg.schedule_steps = schedule_length(cfg)
    if args.steps:
        cfg.steps = args.steps
    problem = trackers.refusal(cfg.trackers, f"config {args.config}: tracker")  # every rank, before any group
    if problem:
        raise TrainError(problem)
    # a launch over GPU candidates: the figures of the GPU this node has; an any_of launch: the price of
    # the cloud it landed on (else the config's own)
    if cfg.gpu_candidates and torch.cuda.is_available():
        resolve_gpu(cfg, torch.cuda.get_device_name(int(os.environ.get("LOCAL_RANK", "0"))))
    cfg.price_per_gpu_hour = price_here(cfg, os.environ.get("SKYPILOT_CLUSTER_INFO"))
    return cfg


@dataclasses.dataclass
class Procs:
    """This process among the run's. torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; nccl on CUDA, gloo on CPU."""

    rank: int
    local_rank: int
    world: int
    ddp: bool  # one process (torchrun or not) needs no process group, no DDP wrapper, no all-reduce
    device: str
    device_type: str  # cuda | cpu
    master: bool
    log: Callable  # print on rank 0, nothing elsewhere


def start_processes(cfg: TrainConfig) -> Procs:
    launched = "RANK" in os.environ  # under torchrun
    rank, local_rank, world = ((int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if launched
                               else (0, 0, 1))
    ddp = world > 1
    if cfg.device == "cuda":  # rented GPUs: training on the node's CPU would bill for nothing
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if seen < local_world:
            raise TrainError(f"this node has {local_world} ranks to place on GPUs but torch {torch.__version__} (built for "
                             f"CUDA {torch.version.cuda}) sees {seen} CUDA devices: its build does not match the driver "
                             "(see `nvidia-smi`), or the GPUs are not visible")
    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if ddp:
        if device_type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    master = rank == 0
    log = functools.partial(print, flush=True) if master else (lambda *a, **k: None)
    return Procs(rank, local_rank, world, ddp, device, device_type, master, log)


@dataclasses.dataclass
class Data:
    train: TokenLoader
    val: TokenLoader | None  # None: no validation loss
    identity: dict  # checkpointed: a resume on other shards is another run
    hellaswag: list | None  # the examples, or None: no HellaSwag


def load_data(cfg: TrainConfig, args, p: Procs, grad_accum: int) -> Data:
    """Batch: micro_batch x block_size tokens per rank per micro-step, accumulated to tokens_per_step."""
    B, T = cfg.micro_batch, cfg.model.block_size
    train_shards, val_shards = find_shards(args.data, cfg.model.vocab_size)
    identity = ckpt.data_identity(args.data)
    train_loader = TokenLoader(train_shards, B, T, p.rank, p.world, grad_accum, log=p.log)
    val_loader = None
    if val_shards and cfg.val_every > 0:
        try:
            val_loader = TokenLoader(val_shards, B, T, p.rank, p.world, val_loader_steps(cfg.val_steps, p.world),
                                     log=p.log)
        except ShardError as e:
            p.log(f"note: no validation loss: {e}")
    return Data(train_loader, val_loader, identity, find_hellaswag(cfg, args, p.log))


def find_hellaswag(cfg: TrainConfig, args, log) -> list | None:
    """HellaSwag every hellaswag_every steps: --hellaswag FILE, or DATA/hellaswag_val.jsonl if present."""
    if cfg.hellaswag_every <= 0:
        return None
    hs_path = Path(args.hellaswag) if args.hellaswag else Path(args.data) / "hellaswag_val.jsonl"
    if cfg.model.vocab_size < VOCAB_SIZE:
        log("note: no HellaSwag: the model's vocabulary is smaller than GPT-2's")
    elif not hs_path.is_file():
        log(f"note: no HellaSwag: {hs_path} does not exist (pass --hellaswag FILE)")
    else:
        try:
            return load_hellaswag(hs_path)
        except EvalDataError as e:
            raise TrainError(str(e)) from None
    return None
