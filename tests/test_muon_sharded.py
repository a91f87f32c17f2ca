"""Muon's Newton-Schulz split over 2 gloo ranks (model/muon.py): each rank orthogonalizes its share of the
matrices and the results are all-gathered; the weights must come out bit-identical to the unsharded step,
which is what one process computes from the same gradients."""

from __future__ import annotations

import datetime
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from model import muon
from model.config import GPTConfig
from model.data import TokenLoader, find_shards
from model.step import get_lr, setup_training, train_step
from trainer_helpers import make_shards, tiny_config

WORLD = 2
STEPS = 3
# (DDP, gradient accumulation): without DDP every rank trains on the whole batch, exactly as one process
# (`python -m model.train`) does; with DDP each rank takes its half and the gradients are all-reduced
VARIANTS = [(False, 2), (True, 1), (True, 2)]
DEADLINE_S = 120  # both ranks together take ~10 s on 2 busy cores


def config():
    # 3 layers: 12 square matrices (3 c_attn blocks and c_proj per layer) and 3 of each MLP shape, so the
    # MLP shapes end in a round where one rank has nothing to orthogonalize
    return tiny_config(optimizer="muon", muon_lr=0.05, muon_weight_decay=0.01, schedule="wsd", cooldown_frac=0.5,
                       warmup_steps=1, steps=STEPS, tokens_per_step=512, micro_batch=4,
                       model=GPTConfig(n_layer=3, n_head=2, n_embd=32, block_size=32, vocab_size=256,
                                       padded_vocab_size=256))


def train(cfg, shards, rank, ddp, accum, shard, counts):
    """STEPS trainer steps (model/step.py's train_step) with Newton-Schulz sharded or not: the weights."""
    s = setup_training(cfg, "cpu")
    assert s.optimizer.shard  # the trainer's optimizer shards whenever a process group of 2+ ranks is up
    s.optimizer.shard = shard
    model = DDP(s.model) if ddp else s.model
    loader = TokenLoader(shards, cfg.micro_batch, cfg.model.block_size, rank if ddp else 0, WORLD if ddp else 1,
                         accum)
    counts.clear()
    for step in range(STEPS):
        train_step(model, s.optimizer, s.scaler, loader, accum, s.amp, cfg.grad_clip, get_lr(step, cfg), ddp, "cpu")
    return {k: v.clone() for k, v in s.raw_model.state_dict().items()}, sum(counts)


def worker(rank, store, data, out):
    torch.set_num_threads(1)  # as torchrun sets: every rank does the same arithmetic
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))  # a rank that hangs fails the others
    try:
        counts = []
        real = muon.orthogonalize

        def counted(*args, **kwargs):
            counts.append(1)
            return real(*args, **kwargs)

        muon.orthogonalize = counted  # how many matrices this rank orthogonalized
        cfg, (shards, _) = config(), find_shards(data)
        results = {(ddp, accum, shard): train(cfg, shards, rank, ddp, accum, shard, counts)
                   for ddp, accum in VARIANTS for shard in (False, True)}
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(tmp_path):
    data = make_shards(tmp_path / "data", train_tokens=(6000,), val_tokens=1000)
    ctx = mp.spawn(worker, args=(str(tmp_path / "store"), str(data), str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise AssertionError(f"the {WORLD} ranks did not finish in {DEADLINE_S} s")
    finally:
        for p in ctx.processes:  # only if a rank is still running: the deadline passed or the other failed
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_sharded_newton_schulz_is_bit_identical_to_one_rank(tmp_path):
    ranks = run_ranks(tmp_path)
    initial = setup_training(config(), "cpu").raw_model.state_dict()
    qkv = "transformer.h.0.attn.c_attn.weight"
    # per step: 3 layers x (3 c_attn blocks + 3 matrices) = 18 matrices
    jobs = STEPS * 18
    for ddp, accum in VARIANTS:
        (alone, alone_count), (split, split_count) = (ranks[0][(ddp, accum, shard)] for shard in (False, True))
        assert alone_count == jobs  # unsharded, a rank orthogonalizes every matrix itself
        # sharded: 9 each (6 square, 3 MLP: one takes 2 of the up and 1 of the down projections, the other
        # 1 and 2), the whole set between them
        assert [r[(ddp, accum, True)][1] for r in ranks] == [jobs // 2, jobs // 2]
        for name, w in alone.items():
            assert torch.equal(split[name], w), (ddp, accum, name)
            assert torch.equal(ranks[1][(ddp, accum, True)][0][name], w), (ddp, accum, name)  # every rank alike
        assert not torch.equal(alone[qkv], initial[qkv])  # it trained
    # DDP or not, with or without accumulation, the runs trained on different gradients: the comparison is
    # between equal inputs, not a tautology of identical runs
    assert not torch.equal(ranks[0][(True, 1, False)][0]["transformer.h.0.mlp.c_fc.weight"],
                           ranks[0][(True, 2, False)][0]["transformer.h.0.mlp.c_fc.weight"])
