"""Muon against AdamW on real English at CPU scale: val loss curves, and how many steps Muon needs to
reach AdamW's final val loss.

    make corpus && python benchmarks/bench_optim.py [--png curves.png] [--json out.json]

A small GPT-2 shape (4 layers, width 256, 4 heads, context 128) trains on Shakespeare
(scripts/shakespeare.py; 3 held-out plays for val) with each optimizer over 3 seeds, at equal tokens:
the same steps, batch, schedule shape and data. Seed s sets the initial weights and where in the
training shard the run starts reading, the same for both optimizers (paired runs). Everything is the
trainer's own code: model.gpt.GPT, model.step's setup_training (model/muon.py's build_optimizer),
get_lr and train_step, model.data's TokenLoader.

To fit 2 CPU cores, the GPT-2 token ids are relabelled to the dense set of ids that occur in the corpus
(~19.4k of 50,257): the same tokenization and the same targets, only a smaller embedding table, so the
loss is the loss the full vocabulary would see over these tokens, less what a 50k-row softmax spends on
tokens that never occur. Runs go two at a time, one thread each (faster than one at a time with two).

"Steps to reach" is where a Muon run's val curve first crosses the mean final val loss of the AdamW
runs (linear between evaluations). It is conservative: at that point a Muon run has not finished its
cooldown, and a run scheduled to stop there would have, and would be lower still.

Tuning (seed 0, the default shape and schedule: 100 steps of 2,048 tokens, wsd with 15 warmup steps and a
linear cooldown to 0 over the last 40%; final val loss):
  AdamW lr          5e-4: 6.056   1e-3: 5.981   2e-3: 6.071   3e-3: 6.280   6e-3: 6.313   -> 1e-3
  Muon lr / its AdamW-part lr (momentum 0.95, Nesterov):
                    0.03 / 1e-3: 5.722   0.05 / 1e-3: 5.758   0.03 / 3e-3: 5.624   -> 0.03 / 3e-3
Not tried for lack of CPU time: other momenta, a momentum warmup (so model/muon.py has none), other
cooldown fractions, a cosine schedule for both.
"""

from __future__ import annotations

import argparse
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


@dataclasses.dataclass
class Bench:
    """One benchmark's shape; `quick` is the seconds-long one the tests run."""

    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    block_size: int = 128
    batch: int = 16
    steps: int = 100
    eval_every: int = 10
    val_seqs: int = 48  # fixed val sequences, evenly spaced over the val plays
    seeds: tuple = (0, 1, 2)
    seed_stride: int = 400_000  # seed s starts reading the training shard at token s * stride
    # the schedule, shared by both optimizers
    schedule: str = "wsd"
    warmup_steps: int = 15
    cooldown_frac: float = 0.4
    min_lr_ratio: float = 0.0
    adamw_lr: float = 1e-3  # the AdamW runs' lr
    muon_lr: float = 0.03  # the Muon runs: lr of the block matrices
    muon_momentum: float = 0.95
    muon_adam_lr: float = 3e-3  # the Muon runs: lr of their AdamW part (embedding/head, biases, LayerNorm)


QUICK = dict(n_layer=2, n_embd=32, n_head=2, block_size=32, batch=4, steps=8, eval_every=4, val_seqs=4,
             seed_stride=500, warmup_steps=2, cooldown_frac=0.5)


def remap_corpus(data_dir: Path, work: Path) -> tuple[int, Path, Path]:
    """(vocabulary size, train shard, val shard) with ids relabelled densely (0..K-1, in id order)."""
    train, val = find_shards(data_dir)
    if not val:
        raise SystemExit(f"error: {data_dir} has no val shard")
    train_t = np.concatenate([read_shard(p) for p in train])
    val_t = np.concatenate([read_shard(p) for p in val])
    ids = np.unique(np.concatenate([train_t, val_t]))
    table = np.zeros(int(ids.max()) + 1, dtype=np.uint16)
    table[ids] = np.arange(ids.size, dtype=np.uint16)
    write_shard(work / "bench_train.bin", table[train_t])
    write_shard(work / "bench_val.bin", table[val_t])
    return int(ids.size), work / "bench_train.bin", work / "bench_val.bin"


def train_config(b: Bench, optimizer: str, seed: int, vocab: int) -> TrainConfig:
    padded = (vocab + 63) // 64 * 64
    model = GPTConfig(n_layer=b.n_layer, n_head=b.n_head, n_embd=b.n_embd, block_size=b.block_size,
                      vocab_size=vocab, padded_vocab_size=padded)
    lr = b.muon_adam_lr if optimizer == "muon" else b.adamw_lr  # cfg.lr: the lr of every AdamW group
    return TrainConfig(model=model, tokens_per_step=b.batch * b.block_size, micro_batch=b.batch, steps=b.steps,
                       seed=seed, lr=lr, min_lr_ratio=b.min_lr_ratio, warmup_steps=b.warmup_steps,
                       optimizer=optimizer, muon_lr=b.muon_lr, muon_momentum=b.muon_momentum,
                       schedule=b.schedule, cooldown_frac=b.cooldown_frac, compile=False, dtype="fp32",
                       device="cpu")


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
    """Train one (optimizer, seed); return its val curve [(step, loss), ...] and timing."""
    b, optimizer, seed, vocab, train_path, val_path, threads = args
    torch.set_num_threads(threads)
    cfg = train_config(b, optimizer, seed, vocab)
    s = setup_training(cfg, "cpu")
    loader = TokenLoader([Path(train_path)], cfg.micro_batch, b.block_size, 0, 1, 1)
    n_train = len(loader.tokens)
    start = (seed * b.seed_stride) % max(1, n_train - cfg.tokens_per_step - 1)
    loader.set_state({"shard": Path(train_path).name, "position": start})
    val = np.asarray(read_shard(val_path))
    t0 = time.perf_counter()
    curve = []
    for step in range(cfg.steps):
        train_step(s.model, s.optimizer, s.scaler, loader, 1, s.amp, cfg.grad_clip, get_lr(step, cfg), False, "cpu")
        if (step + 1) % b.eval_every == 0 or step + 1 == cfg.steps:
            curve.append((step + 1, val_loss(s.model, val, b.val_seqs, b.block_size)))
    return {"optimizer": optimizer, "seed": seed, "curve": curve, "final": curve[-1][1],
            "seconds": time.perf_counter() - t0}


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


def summarize(b: Bench, runs: list[dict]) -> dict:
    out = {}
    for opt in ("adamw", "muon"):
        finals = [r["final"] for r in runs if r["optimizer"] == opt]
        if finals:
            m, sd = mean_sd(finals)
            out[opt] = {"final_mean": m, "final_sd": sd, "final_min": min(finals), "final_max": max(finals)}
    if "adamw" in out and "muon" in out:
        target = out["adamw"]["final_mean"]
        reach = [steps_to_reach(r["curve"], target) for r in runs if r["optimizer"] == "muon"]
        got = [x for x in reach if x is not None]
        out["target"] = target
        out["muon_steps_each"] = reach
        if len(got) == len(reach):
            m, sd = mean_sd(got)
            out["muon"].update(steps_mean=m, steps_sd=sd, steps_min=min(got), steps_max=max(got),
                               ratio_mean=m / b.steps, ratio_sd=sd / b.steps)
    return out


def table(b: Bench, s: dict, wall: float, vocab: int) -> str:
    lines = [f"GPT-2 {b.n_layer}L/{b.n_embd}d/{b.n_head}h, context {b.block_size}, batch {b.batch} "
             f"({b.batch * b.block_size:,} tokens/step), {b.steps} steps, {len(b.seeds)} seeds; "
             f"vocabulary relabelled to the {vocab:,} ids in the corpus",
             f"schedule {b.schedule}: warmup {b.warmup_steps}, cooldown {b.cooldown_frac:g} of the steps to "
             f"{b.min_lr_ratio:g} x peak; AdamW lr {b.adamw_lr:g}; Muon lr {b.muon_lr:g}, momentum "
             f"{b.muon_momentum:g} (its AdamW part at lr {b.muon_adam_lr:g})",
             "",
             f"{'optimizer':<10}{'final val loss (mean ± sd)':>30}{'range':>18}{'steps to AdamW final':>24}"
             f"{'ratio':>16}"]
    for opt in ("adamw", "muon"):
        if opt not in s:
            continue
        r = s[opt]
        steps, ratio = f"{b.steps}", "1.00"
        if opt == "muon":
            if "steps_mean" in r:
                steps = f"{r['steps_mean']:.0f} ± {r['steps_sd']:.0f}"
                ratio = f"{r['ratio_mean']:.2f} ± {r['ratio_sd']:.2f}"
            elif "target" in s:
                steps, ratio = "not reached", "> 1"
            else:
                steps, ratio = "-", "-"
        lines.append(f"{opt:<10}{r['final_mean']:>22.4f} ± {r['final_sd']:.4f}"
                     f"{r['final_min']:>10.4f}-{r['final_max']:.4f}{steps:>24}{ratio:>16}")
    lines.append(f"\nwall time {wall:.0f} s")
    return "\n".join(lines)


def plot(b: Bench, runs: list[dict], s: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = {"adamw": "tab:blue", "muon": "tab:orange"}
    for r in runs:
        steps, losses = zip(*r["curve"])
        ax.plot(steps, losses, color=colors[r["optimizer"]], alpha=0.8, lw=1.2,
                label=r["optimizer"] if r["seed"] == b.seeds[0] else None)
    if "target" in s:
        ax.axhline(s["target"], color="gray", ls="--", lw=1, label="AdamW final (mean)")
        if "steps_mean" in s.get("muon", {}):
            ax.axvline(s["muon"]["steps_mean"], color=colors["muon"], ls=":", lw=1,
                       label=f"Muon reaches it: {s['muon']['ratio_mean']:.2f}x the steps")
    lows = [r["final"] for r in runs]
    ax.set_ylim(min(lows) - 0.1, min(lows) + 1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("val loss (held-out plays)")
    ax.set_title(f"Muon vs AdamW, GPT-2 {b.n_layer}L/{b.n_embd}d on Shakespeare, {len(b.seeds)} seeds")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=REPO / "data" / "shakespeare",
                   help="llm.c shards with a val shard (default data/shakespeare: `make corpus`)")
    p.add_argument("--quick", action="store_true", help="a tiny model and a few steps (seconds), for tests")
    p.add_argument("--json", type=Path, default=None, help="also write the summary and curves as JSON here")
    p.add_argument("--png", type=Path, default=None, help="draw the val curves to this PNG")
    p.add_argument("--optimizers", default="adamw,muon", help="comma-separated (tuning: one at a time)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once, each with cores/jobs threads")
    types = {"int": int, "float": float, "str": str}  # the field annotations, as strings
    for f in dataclasses.fields(Bench):
        if f.type in types:
            p.add_argument("--" + f.name.replace("_", "-"), type=types[f.type], default=None)
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2)")
    a = p.parse_args()
    b = Bench(**(QUICK if a.quick else {}))
    for f in dataclasses.fields(Bench):
        v = getattr(a, f.name, None)
        if v is not None and f.name != "seeds":
            setattr(b, f.name, v)
    if a.seeds:
        b.seeds = tuple(int(x) for x in a.seeds.split(","))
    if not a.data.is_dir():
        raise SystemExit(f"error: {a.data} does not exist; run `make corpus` first")

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        vocab, train_path, val_path = remap_corpus(a.data, Path(tmp))
        threads = max(1, (os.cpu_count() or 1) // a.jobs)
        jobs = [(b, opt, seed, vocab, str(train_path), str(val_path), threads)
                for seed in b.seeds for opt in a.optimizers.split(",")]
        if a.jobs > 1:
            with mp.get_context("spawn").Pool(a.jobs) as pool:
                runs = pool.map(run_one, jobs, chunksize=1)
        else:
            runs = [run_one(j) for j in jobs]
    wall = time.perf_counter() - t0
    s = summarize(b, runs)
    if a.png:
        plot(b, runs, s, a.png)
    print(table(b, s, wall, vocab))
    if a.png:
        print(f"curves: {a.png}")
    if a.json:
        a.json.write_text(json.dumps({"bench": dataclasses.asdict(b), "vocab": vocab, "wall_seconds": wall,
                                      "summary": s, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
