"""Muon against AdamW on real English at CPU scale: how many steps Muon needs to reach AdamW's final val
loss, at one or more training lengths (horizons), with both optimizers tuned alike.

    make corpus && python benchmarks/bench_optim.py [--png curves.png] [--json out.json]   # <= 25 min
    python benchmarks/bench_optim.py --ablate           # + Muon's AdamW-part lr and weight decay (4 more runs)
    python benchmarks/bench_optim.py --preset long      # 6 layers, horizons 100/200/400: ~3 h (see below)

Time: the default needs at most 25 minutes on the 2-core dev machine with another busy process beside it
(measured with --ablate: 24.0 minutes while other test suites kept the machine at a load of 4-7, then 2-3;
docs/training.md#the-cpu-benchmark) and never runs longer than --max-minutes (default 30): every run checks
the deadline between steps, and the pool is waited on with a timeout, so an overrun ends with the runs
that finished and says which did not.

The model: a small GPT-2 (model.gpt.GPT: 4 layers, width 192, 3 heads, context 128, 2,048 tokens per
step) trained by the trainer's own code (model.step's setup_training, get_lr, train_step; model/muon.py
through build_optimizer; model.data's TokenLoader) on Shakespeare (scripts/shakespeare.py; 3 held-out
plays for val). To fit 2 CPU cores the vocabulary is cut to the 4,095 most frequent GPT-2 ids of the
training text plus one id for all the others (--vocab 0: every id that occurs, ~19.4k, ~2x slower): the
same tokenization and targets, rare tokens pooled, so the losses are a 4,096-way problem's, not GPT-2's.

Fairness, in order:
1. Equal grids. Each optimizer's lr is swept over the same multipliers of its own default (--grid,
   default 0.5, 1, 2): AdamW's lr (default 1e-3); Muon's matrix lr and its AdamW part's lr together
   (defaults 0.03 and 3e-3). Same number of points, each centred on its own default. A choice at the
   edge of its grid is flagged in the table (the optimum may lie outside).
2. Tuning seeds apart from scored seeds. The grid runs on --tune-seeds (default 100, 101); the chosen
   lr of each optimizer then runs on the scored --seeds (default 0, 1, 2), which no choice has seen. A
   seed sets the initial weights and where in the training text the run starts reading, the same for
   both optimizers (paired runs).
3. Each horizon tuned on its own. One run covers every horizon of --horizons: the warmup-stable-decay
   schedule is the same at every length until a horizon's cooldown starts, so the run keeps its state
   there and trains that horizon's cooldown from it: exactly the run scheduled for that length, for the
   cost of its cooldown. The lr is then chosen per horizon.

"Steps to reach" is where a scored Muon run's val curve first crosses the mean final val loss of the
scored AdamW runs at the same horizon (linear between evaluations); the ratio is that over the horizon.
It is conservative: at that point the Muon run has not finished its cooldown; a run scheduled to stop
there would have, and would be lower still.

--ablate runs the chosen Muon on the tuning seeds twice more: its AdamW part at AdamW's chosen lr (what
the fast recipes did: their AdamW part at the faithful recipe's lr) instead of ~3x it, and Muon weight
decay 0.05 (the top of the references' 0.01-0.05) instead of 0. Tuning seeds: a setting chosen from this
must not be scored on the seeds that chose it.

--preset long: 6 layers, horizons 100, 200 and 400, evaluations every 20 steps, 1 tuning seed and 2
scored seeds (~90 min on 2 quiet cores; --max-minutes 240). It reports how the ratio moves with the
training length on one model. With --n-layer 4 (the default model) it took 48.6 min on the 2-core dev
machine: the ratio rose from 0.34 (100 steps) to 0.46 (200) and 0.56 (400) (docs/training.md).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.config import GPTConfig, TrainConfig  # noqa: E402
from model.data import TokenLoader, find_shards  # noqa: E402
from model.shards import read_shard, write_shard  # noqa: E402
from model.step import get_lr, setup_training, train_step  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OPTIMIZERS = ("adamw", "muon")


@dataclasses.dataclass
class Bench:
    """One benchmark's shape, schedule, grids and seeds."""

    n_layer: int = 4
    n_embd: int = 192
    n_head: int = 3
    block_size: int = 128
    batch: int = 16
    vocab: int = 4096  # the most frequent ids (one of them standing for all the rest); 0: every id in the corpus
    horizons: tuple = (100,)  # training lengths in steps, each its own schedule (see the module docstring)
    eval_every: int = 10
    val_seqs: int = 48  # fixed val sequences, evenly spaced over the val plays
    seeds: tuple = (0, 1, 2)  # scored
    tune_seeds: tuple = (100, 101)  # the grids run on these; never scored
    seed_stride: int = 400_000  # seed s starts reading the training text at token s * stride
    # the schedule, shared by both optimizers
    schedule: str = "wsd"
    warmup_steps: int = 15
    cooldown_frac: float = 0.4
    min_lr_ratio: float = 0.0
    # the grid: the same multipliers of each optimizer's own default
    grid: tuple = (0.5, 1.0, 2.0)
    adamw_lr: float = 1e-3  # AdamW's default lr
    muon_lr: float = 0.03  # Muon's default matrix lr
    muon_adam_lr: float = 3e-3  # Muon's default lr for its AdamW part (embedding/head, biases, LayerNorm)
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0

    def __post_init__(self):
        self.horizons = tuple(sorted(int(h) for h in self.horizons))
        self.seeds, self.tune_seeds = tuple(self.seeds), tuple(self.tune_seeds)
        self.grid = tuple(float(g) for g in self.grid)
        shared = set(self.seeds) & set(self.tune_seeds)
        if shared:
            raise ValueError(f"seeds {sorted(shared)} are both tuning and scored seeds: a choice would be scored "
                             "on the runs that made it")
        if not self.seeds or not self.tune_seeds or not self.horizons:
            raise ValueError("need at least one scored seed, one tuning seed and one horizon")
        if len(self.grid) % 2 == 0 or sorted(self.grid)[len(self.grid) // 2] != 1.0:
            raise ValueError(f"grid {self.grid}: an odd number of multipliers centred on 1 (each optimizer's default)")
        if min(self.horizons) <= self.warmup_steps:
            raise ValueError(f"horizon {min(self.horizons)} is not longer than the warmup ({self.warmup_steps})")


PRESETS = {
    "default": {},
    "long": dict(n_layer=6, horizons=(100, 200, 400), eval_every=20, tune_seeds=(100,), seeds=(0, 1)),
    # seconds-long, for the tests
    "quick": dict(n_layer=1, n_embd=16, n_head=2, block_size=16, batch=2, vocab=64, horizons=(20, 40),
                  eval_every=5, val_seqs=4, seeds=(0, 1), tune_seeds=(100,), seed_stride=97, warmup_steps=2),
}
# what each preset needs on the 2-core dev machine with another busy process beside it (minutes), and the
# hard limit --max-minutes defaults to
STATED_MINUTES = {"default": 25, "long": 180, "quick": 1}
MAX_MINUTES = {"default": 30, "long": 240, "quick": 2}


# ---- the plan: which runs, with which hyperparameters ----

def hyper(b: Bench, optimizer: str, scale: float) -> dict:
    """The lrs of one grid point: scale x the optimizer's defaults (Muon's matrix and AdamW-part lrs together)."""
    if optimizer == "adamw":
        return {"lr": b.adamw_lr * scale}
    return {"lr": b.muon_adam_lr * scale, "muon_lr": b.muon_lr * scale}


def grid(b: Bench, optimizer: str) -> list[dict]:
    """One optimizer's grid: [{"scale", "lr", ("muon_lr")}, ...], the same multipliers for both."""
    return [{"scale": s, **hyper(b, optimizer, s)} for s in b.grid]


def tuning_jobs(b: Bench) -> list[dict]:
    return [{"optimizer": opt, "seed": seed, "scale": p["scale"], "variant": "grid", "purpose": "tune"}
            for opt in OPTIMIZERS for p in grid(b, opt) for seed in b.tune_seeds]


def choose(b: Bench, runs: list[dict]) -> dict:
    """{optimizer: {horizon: {"scale", "mean", "edge", "by_scale"}}}: per horizon, the grid point with the lowest
    mean final val loss over the tuning seeds (runs that did not finish are left out)."""
    out = {}
    for opt in OPTIMIZERS:
        out[opt] = {}
        for h in b.horizons:
            by_scale = {}
            for s in b.grid:
                finals = [r["finals"][h] for r in runs if r["optimizer"] == opt and r["scale"] == s
                          and r["variant"] == "grid" and r["purpose"] == "tune" and h in r["finals"]]
                if finals and len(finals) == len(b.tune_seeds):
                    by_scale[s] = statistics.fmean(finals)
            if not by_scale:
                continue
            best = min(by_scale, key=by_scale.get)
            out[opt][h] = {"scale": best, "mean": by_scale[best], "by_scale": by_scale,
                           "edge": best in (min(b.grid), max(b.grid))}
    return out


def scoring_jobs(b: Bench, chosen: dict) -> list[dict]:
    """The chosen point of each optimizer on the scored seeds: one run per distinct chosen scale (a run covers
    every horizon)."""
    jobs = []
    for opt in OPTIMIZERS:
        for scale in sorted({c["scale"] for c in chosen.get(opt, {}).values()}):
            jobs += [{"optimizer": opt, "seed": seed, "scale": scale, "variant": "grid", "purpose": "score"}
                     for seed in b.seeds]
    return jobs


def ablation_jobs(b: Bench, chosen: dict) -> list[dict]:
    """Muon at its chosen point (longest horizon), on the tuning seeds, with its AdamW part at AdamW's chosen lr,
    and with weight decay 0.05."""
    h = b.horizons[-1]
    if h not in chosen.get("muon", {}) or h not in chosen.get("adamw", {}):
        return []
    m, a = chosen["muon"][h]["scale"], chosen["adamw"][h]["scale"]
    variants = {"adam_part_at_adamw_lr": {"lr": b.adamw_lr * a}, "weight_decay_0.05": {"muon_weight_decay": 0.05}}
    return [{"optimizer": "muon", "seed": seed, "scale": m, "variant": name, "overrides": over, "purpose": "ablate"}
            for name, over in variants.items() for seed in b.tune_seeds]


# ---- one run ----

def remap_corpus(data_dir: Path, work: Path, vocab: int = 0) -> tuple[int, Path, Path]:
    """(vocabulary size, train shard, val shard) with ids relabelled densely: every id in the corpus (vocab 0),
    or the vocab - 1 most frequent training ids (in id order) and one id for all the others."""
    train, val = find_shards(data_dir)
    if not val:
        raise SystemExit(f"error: {data_dir} has no val shard")
    train_t = np.concatenate([read_shard(p) for p in train]).astype(np.int64)
    val_t = np.concatenate([read_shard(p) for p in val]).astype(np.int64)
    top = int(max(train_t.max(), val_t.max())) + 1
    if vocab:
        counts = np.bincount(train_t, minlength=top)
        keep = np.sort(np.argsort(-counts, kind="stable")[: vocab - 1])
        table = np.full(top, vocab - 1, dtype=np.uint16)
        table[keep] = np.arange(keep.size, dtype=np.uint16)
        size = vocab
    else:
        ids = np.unique(np.concatenate([train_t, val_t]))
        table = np.zeros(top, dtype=np.uint16)
        table[ids] = np.arange(ids.size, dtype=np.uint16)
        size = int(ids.size)
    write_shard(work / "bench_train.bin", table[train_t])
    write_shard(work / "bench_val.bin", table[val_t])
    return size, work / "bench_train.bin", work / "bench_val.bin"


def train_config(b: Bench, job: dict, vocab: int, steps: int) -> TrainConfig:
    padded = (vocab + 63) // 64 * 64
    model = GPTConfig(n_layer=b.n_layer, n_head=b.n_head, n_embd=b.n_embd, block_size=b.block_size,
                      vocab_size=vocab, padded_vocab_size=padded)
    h = {**hyper(b, job["optimizer"], job["scale"]), **job.get("overrides", {})}
    muon = job["optimizer"] == "muon"
    # cfg.lr: the lr of every AdamW group (for muon: its AdamW part); muon_* only matter for muon
    return TrainConfig(model=model, tokens_per_step=b.batch * b.block_size, micro_batch=b.batch, steps=steps,
                       schedule_steps=steps, seed=job["seed"], lr=h["lr"], min_lr_ratio=b.min_lr_ratio,
                       warmup_steps=b.warmup_steps, optimizer=job["optimizer"],
                       muon_lr=h.get("muon_lr", b.muon_lr), muon_momentum=b.muon_momentum,
                       muon_weight_decay=h.get("muon_weight_decay", b.muon_weight_decay) if muon else 0.0,
                       schedule=b.schedule, cooldown_frac=b.cooldown_frac, compile=False, dtype="fp32",
                       device="cpu")


def branch_points(b: Bench, cfg: TrainConfig) -> dict[int, int]:
    """{horizon: the first step whose lr differs from the longest horizon's} for every shorter horizon: up to
    there the two schedules are the same run."""
    out = {}
    for h in b.horizons[:-1]:
        short = dataclasses.replace(cfg, steps=h, schedule_steps=h)
        out[h] = next(i for i in range(h + 1) if i == h or get_lr(i, short) != get_lr(i, cfg))
    return out


@torch.no_grad()
def val_loss(model, val: np.ndarray, n_seqs: int, T: int) -> float:
    """Mean loss over n_seqs fixed sequences spread evenly over the val tokens (the same for every run)."""
    model.eval()
    starts = np.linspace(0, len(val) - T - 2, n_seqs).astype(np.int64)
    total = 0.0
    for chunk in np.array_split(starts, max(1, n_seqs // 16)):
        buf = torch.from_numpy(np.stack([val[s: s + T + 1] for s in chunk]).astype(np.int64))
        _, loss = model(buf[:, :-1].contiguous(), buf[:, 1:].contiguous())
        total += loss.item() * len(chunk)
    model.train()
    return total / n_seqs


def run_one(args: tuple) -> dict:
    """Train one job over every horizon; its val curve and final val loss per horizon, and timing. Stops at the
    deadline (time.time()) between steps: a horizon not finished by then has no final."""
    b, job, vocab, train_path, val_path, threads, deadline = args
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    longest = b.horizons[-1]
    cfg = train_config(b, job, vocab, longest)
    s = setup_training(cfg, "cpu")
    loader = TokenLoader([Path(train_path)], cfg.micro_batch, b.block_size, 0, 1, 1)
    n_train = len(loader.tokens)
    start = (job["seed"] * b.seed_stride) % max(1, n_train - cfg.tokens_per_step - 1)
    loader.set_state({"shard": Path(train_path).name, "position": start})
    val = np.asarray(read_shard(val_path))
    branch = branch_points(b, cfg)
    saved, curves, finished = {}, {}, True

    def train(first: int, last: int, c: TrainConfig, curve: list, at_branch: dict) -> bool:
        for step in range(first, last):
            for h, at in at_branch.items():
                if at == step:  # the state a shorter horizon's cooldown starts from
                    saved[h] = (copy.deepcopy(s.raw_model.state_dict()), copy.deepcopy(s.optimizer.state_dict()),
                                loader.state())
            if time.time() > deadline:
                return False
            train_step(s.model, s.optimizer, s.scaler, loader, 1, s.amp, cfg.grad_clip, get_lr(step, c), False, "cpu")
            if (step + 1) % b.eval_every == 0 or step + 1 == last:
                curve.append((step + 1, val_loss(s.model, val, b.val_seqs, b.block_size)))
        return True

    main = []
    finished = train(0, longest, cfg, main, branch)
    if finished:
        curves[longest] = main
    for h, at in sorted(branch.items()):
        if h not in saved or not finished:
            continue
        weights, opt_state, where = saved.pop(h)
        s.raw_model.load_state_dict(weights)
        s.optimizer.load_state_dict(opt_state)
        loader.set_state(where)
        curve = [p for p in main if p[0] <= at]
        if train(at, h, dataclasses.replace(cfg, steps=h, schedule_steps=h), curve, {}):
            curves[h] = curve
    return {**job, "curves": curves, "finals": {h: c[-1][1] for h, c in curves.items()},
            "seconds": time.perf_counter() - t0, "finished": sorted(curves) == list(b.horizons)}


def run_jobs(b: Bench, jobs: list[dict], vocab: int, train_path: Path, val_path: Path, n_jobs: int,
             deadline: float, threads: int | None = None, on_run=None) -> list[dict]:
    """Every job, n_jobs at a time, each with `threads` threads (default: the cores shared out); waits no longer
    than the deadline (a run that has not returned 30 s after it is ended with the pool). Runs that did not
    finish come back with "finished": False. on_run(result) as each run returns (main keeps them on disk)."""
    threads = threads or max(1, (os.cpu_count() or 1) // max(1, n_jobs))
    args = [(b, j, vocab, str(train_path), str(val_path), threads, deadline) for j in jobs]
    on_run = on_run or (lambda r: None)
    out = []
    if n_jobs <= 1:
        for a in args:
            out.append(run_one(a))
            on_run(out[-1])
        return out
    with mp.get_context("spawn").Pool(n_jobs) as pool:
        results = pool.imap_unordered(run_one, args)
        for _ in args:
            try:
                out.append(results.next(timeout=max(1.0, deadline - time.time() + 30)))
                on_run(out[-1])
            except (mp.TimeoutError, StopIteration):
                pool.terminate()
                break
    done = {(r["optimizer"], r["seed"], r["scale"], r["variant"]) for r in out}
    out += [{**j, "curves": {}, "finals": {}, "seconds": None, "finished": False} for j in jobs
            if (j["optimizer"], j["seed"], j["scale"], j["variant"]) not in done]
    return out


# ---- the results ----

def steps_to_reach(curve: list, target: float) -> float | None:
    """The first step at which the curve is at or below target (linear between points); None if never."""
    prev_step, prev_loss = 0, float("inf")
    for step, loss in curve:
        if loss <= target:
            if prev_loss == float("inf"):
                return float(step)
            return prev_step + (prev_loss - target) / (prev_loss - loss) * (step - prev_step)
        prev_step, prev_loss = step, loss
    return None


def mean_sd(xs: list) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(b: Bench, chosen: dict, scored: list[dict]) -> dict:
    """Per horizon: each optimizer's chosen point and final val loss over the scored seeds; Muon's steps to
    reach AdamW's mean final and their ratio to the horizon."""
    out = {}
    for h in b.horizons:
        row = {}
        for opt in OPTIMIZERS:
            c = chosen.get(opt, {}).get(h)
            if c is None:
                continue
            runs = [r for r in scored if r["optimizer"] == opt and r["scale"] == c["scale"] and h in r["finals"]]
            finals = [r["finals"][h] for r in runs]
            entry = {"scale": c["scale"], "edge": c["edge"], **hyper(b, opt, c["scale"]),
                     "finished": f"{len(finals)}/{len(b.seeds)}"}
            if finals:
                m, sd = mean_sd(finals)
                entry.update(final_mean=m, final_sd=sd, final_each=finals)
            row[opt] = entry
        if "final_mean" in row.get("adamw", {}) and "final_mean" in row.get("muon", {}):
            target = row["adamw"]["final_mean"]
            muon_runs = [r for r in scored if r["optimizer"] == "muon" and r["scale"] == row["muon"]["scale"]
                         and h in r["curves"]]
            reach = [steps_to_reach(r["curves"][h], target) for r in muon_runs]
            row["target"] = target
            row["muon"]["steps_each"] = reach
            got = [x for x in reach if x is not None]
            if got and len(got) == len(reach) == len(b.seeds):
                m, sd = mean_sd(got)
                row["muon"].update(steps_mean=m, steps_sd=sd, ratio_mean=m / h, ratio_sd=sd / h)
        out[h] = row
    return out


def summarize_ablation(b: Bench, chosen: dict, tune: list[dict], ablate: list[dict]) -> dict:
    """At the longest horizon, over the tuning seeds: the chosen Muon's mean final val loss, and each variant's,
    with its difference from the chosen run of the same seed (paired: the seed's data and weights alike)."""
    h = b.horizons[-1]
    if not ablate or h not in chosen.get("muon", {}):
        return {}
    scale = chosen["muon"][h]["scale"]
    base = {r["seed"]: r["finals"][h] for r in tune if r["optimizer"] == "muon" and r["scale"] == scale
            and r["variant"] == "grid" and h in r["finals"]}
    out = {"horizon": h, "chosen": {"mean": statistics.fmean(base.values()) if base else None, "vs_chosen": []}}
    for r in ablate:
        v = out.setdefault(r["variant"], {"finals": [], "vs_chosen": []})
        if h in r["finals"]:
            v["finals"].append(r["finals"][h])
            if r["seed"] in base:
                v["vs_chosen"].append(r["finals"][h] - base[r["seed"]])
    for k, v in out.items():
        if k not in ("horizon", "chosen"):
            v["mean"] = statistics.fmean(v.pop("finals")) if v["finals"] else None
    return out


def describe(b: Bench, vocab: int) -> str:
    return (f"GPT-2 {b.n_layer}L/{b.n_embd}d/{b.n_head}h, context {b.block_size}, batch {b.batch} "
            f"({b.batch * b.block_size:,} tokens/step), vocabulary {vocab:,}; schedule {b.schedule}: warmup "
            f"{b.warmup_steps}, cooldown {b.cooldown_frac:g} of each horizon to {b.min_lr_ratio:g} x peak; grid "
            f"{'/'.join(f'{g:g}' for g in b.grid)} x each default (AdamW lr {b.adamw_lr:g}; Muon lr {b.muon_lr:g} "
            f"with its AdamW part at {b.muon_adam_lr:g}, momentum {b.muon_momentum:g}); tuned on seeds "
            f"{','.join(map(str, b.tune_seeds))}, scored on {','.join(map(str, b.seeds))}")


def table(b: Bench, s: dict, chosen: dict, ablation: dict, wall: float, vocab: int, stated: float,
          load: str) -> str:
    lines = [describe(b, vocab), "",
             "tuning (mean final val loss over the tuning seeds; * chosen, ! chosen at the grid's edge)"]
    for opt in OPTIMIZERS:
        for h, c in chosen.get(opt, {}).items():
            cells = "  ".join(f"x{sc:g}: {m:.4f}{'*' if sc == c['scale'] else ''}" for sc, m in
                              sorted(c["by_scale"].items()))
            lines.append(f"  {opt:<6} h={h:<4} {cells}{'  ! edge' if c['edge'] else ''}")
    lines += ["", f"{'horizon':<8}{'optimizer':<10}{'lr (chosen)':<22}{'final val loss (mean ± sd)':>28}"
                  f"{'steps to AdamW final':>24}{'token ratio':>16}"]
    for h, row in s.items():
        for opt in OPTIMIZERS:
            r = row.get(opt)
            if r is None:
                continue
            lr = f"{r['lr']:.2g}" + (f" / {r['muon_lr']:.2g}" if "muon_lr" in r else "") + ("!" if r["edge"] else "")
            final = (f"{r['final_mean']:.4f} ± {r['final_sd']:.4f}" if "final_mean" in r
                     else f"unfinished ({r['finished']})")
            steps, ratio = (f"{h}", "1") if opt == "adamw" else ("-", "-")
            if opt == "muon" and "steps_mean" in r:
                steps = f"{r['steps_mean']:.0f} ± {r['steps_sd']:.0f}"
                ratio = f"{r['ratio_mean']:.2f} ± {r['ratio_sd']:.2f}"
            elif opt == "muon" and "steps_each" in r:
                steps, ratio = "not reached by all", "> 1?"
            lines.append(f"{h:<8}{opt:<10}{lr:<22}{final:>28}{steps:>24}{ratio:>16}")
    if ablation:
        lines += ["", f"ablation (Muon at its chosen lr, horizon {ablation['horizon']}, tuning seeds: mean final val "
                      "loss, and each seed's difference from the chosen run)"]
        for k, v in ablation.items():
            if k == "horizon":
                continue
            diffs = ", ".join(f"{d:+.4f}" for d in v["vs_chosen"])
            lines.append(f"  {k:<26}{v['mean']:.4f}" + (f"   ({diffs})" if diffs else "") if v["mean"] is not None
                         else f"  {k:<26}unfinished")
    lines.append(f"\nwall time {wall / 60:.1f} min (stated: at most {stated:g} min){'; ' + load if load else ''}")
    return "\n".join(lines)


def plot(b: Bench, chosen: dict, scored: list[dict], s: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = b.horizons[-1]
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = {"adamw": "tab:blue", "muon": "tab:orange"}
    lows = []
    for opt in OPTIMIZERS:
        c = chosen.get(opt, {}).get(h)
        for i, r in enumerate(x for x in scored if c and x["optimizer"] == opt and x["scale"] == c["scale"]
                              and h in x["curves"]):
            steps, losses = zip(*r["curves"][h])
            lows.append(min(losses))
            ax.plot(steps, losses, color=colors[opt], alpha=0.8, lw=1.2, label=opt if i == 0 else None)
    row = s.get(h, {})
    if "target" in row:
        ax.axhline(row["target"], color="gray", ls="--", lw=1, label="AdamW final (mean)")
        if "steps_mean" in row.get("muon", {}):
            ax.axvline(row["muon"]["steps_mean"], color=colors["muon"], ls=":", lw=1,
                       label=f"Muon reaches it: {row['muon']['ratio_mean']:.2f}x the steps")
    if lows:
        ax.set_ylim(min(lows) - 0.1, min(lows) + 1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("val loss (held-out plays)")
    ax.set_title(f"Muon vs AdamW, GPT-2 {b.n_layer}L/{b.n_embd}d on Shakespeare, horizon {h}, scored seeds")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_benchmark(b: Bench, data: Path, n_jobs: int = 2, max_minutes: float = 30, ablate: bool = False,
                  log=print, threads: int | None = None, on_run=None) -> dict:
    """Tune on the tuning seeds, score the choices on the scored seeds (and the ablation): everything the table
    and the JSON show. Ends by max_minutes whatever happens. threads: per run (default: the cores shared out;
    1 for a tiny model, whose ops are too small to split)."""
    t0 = time.time()
    deadline = t0 + max_minutes * 60
    with tempfile.TemporaryDirectory() as tmp:
        vocab, train_path, val_path = remap_corpus(data, Path(tmp), b.vocab)
        jobs = tuning_jobs(b)
        log(f"tuning: {len(jobs)} runs ({len(b.grid)} lrs x {len(OPTIMIZERS)} optimizers x {len(b.tune_seeds)} "
            f"seeds), horizons {', '.join(map(str, b.horizons))}")
        tune = run_jobs(b, jobs, vocab, train_path, val_path, n_jobs, deadline, threads, on_run)
        chosen = choose(b, tune)
        jobs = scoring_jobs(b, chosen) + (ablation_jobs(b, chosen) if ablate else [])
        log(f"scoring: {len(jobs)} runs ({time.time() - t0:.0f} s so far)")
        rest = run_jobs(b, jobs, vocab, train_path, val_path, n_jobs, deadline, threads, on_run)
    scored = [r for r in rest if r["purpose"] == "score"]
    ablated = [r for r in rest if r["purpose"] == "ablate"]
    return {"bench": dataclasses.asdict(b), "vocab": vocab, "wall_seconds": time.time() - t0, "chosen": chosen,
            "summary": summarize(b, chosen, scored), "ablation": summarize_ablation(b, chosen, tune, ablated),
            "unfinished": [{k: r[k] for k in ("optimizer", "seed", "scale", "variant", "purpose")}
                           for r in tune + rest if not r["finished"]],
            "runs": tune + rest}


def load_average() -> str:
    try:
        one, five, _ = os.getloadavg()
        return f"load average {one:.1f} (1 min) / {five:.1f} (5 min) on {os.cpu_count()} cores at the end"
    except OSError:
        return ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=REPO / "data" / "shakespeare",
                   help="llm.c shards with a val shard (default data/shakespeare: `make corpus`)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="default (~25 min), long (6 layers, horizons 100/200/400, ~3 h), quick (seconds, for tests)")
    p.add_argument("--ablate", action="store_true", help="also: Muon's AdamW part at AdamW's lr; Muon weight decay 0.05")
    p.add_argument("--max-minutes", type=float, default=None, help="hard limit (default: the preset's, 30 for default)")
    p.add_argument("--quick", action="store_true", help="the same as --preset quick")
    p.add_argument("--jobs", type=int, default=2, help="runs at once")
    p.add_argument("--threads", type=int, default=None, help="threads per run (default: cores / jobs)")
    p.add_argument("--json", type=Path, default=None,
                   help="also write the summary and curves as JSON here (and each run as it ends to *.runs.jsonl)")
    p.add_argument("--png", type=Path, default=None, help="draw the scored val curves (longest horizon) to this PNG")
    types = {"int": int, "float": float, "str": str}  # the field annotations, as strings
    for f in dataclasses.fields(Bench):
        if f.type in types:
            p.add_argument("--" + f.name.replace("_", "-"), type=types[f.type], default=None)
        elif f.type == "tuple":
            p.add_argument("--" + f.name.replace("_", "-"), default=None, help="comma-separated")
    a = p.parse_args()
    if a.quick:
        a.preset = "quick"
    fields = dict(PRESETS[a.preset])
    for f in dataclasses.fields(Bench):
        v = getattr(a, f.name, None)
        if v is not None:
            fields[f.name] = tuple(float(x) if f.name == "grid" else int(x) for x in v.split(",")) \
                if f.type == "tuple" else v
    try:
        b = Bench(**fields)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if not a.data.is_dir():
        raise SystemExit(f"error: {a.data} does not exist; run `make corpus` first")
    max_minutes = a.max_minutes or MAX_MINUTES[a.preset]
    stated = STATED_MINUTES[a.preset]
    print(f"{describe(b, b.vocab or 0)}\nthe {a.preset} preset needs at most ~{stated:g} min on 2 cores with a busy "
          f"process beside them (other settings: more or less); hard limit {max_minutes:g} min", flush=True)
    runs_log = a.json.with_suffix(".runs.jsonl") if a.json else None  # each run as it finishes: a kill keeps them
    if runs_log:
        runs_log.write_text("")

    def keep(run: dict) -> None:
        if runs_log:
            with open(runs_log, "a", encoding="utf-8") as f:
                f.write(json.dumps(run, default=str) + "\n")

    out = run_benchmark(b, a.data, a.jobs, max_minutes, a.ablate, log=lambda m: print(m, flush=True),
                        threads=a.threads, on_run=keep)
    load = load_average()
    print(table(b, out["summary"], out["chosen"], out["ablation"], out["wall_seconds"], out["vocab"], stated, load))
    if out["unfinished"]:
        print(f"unfinished by the limit: {len(out['unfinished'])} runs: "
              + ", ".join(f"{u['optimizer']} x{u['scale']:g} seed {u['seed']} ({u['purpose']})" for u in out["unfinished"]))
    if a.png:
        plot(b, out["chosen"], [r for r in out["runs"] if r["purpose"] == "score"], out["summary"], a.png)
        print(f"curves: {a.png}")
    if a.json:
        out["load"] = load
        a.json.write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
