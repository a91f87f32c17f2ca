"""Shared by the trainer tests: a tiny config, synthetic shards, running the trainer, killing trees."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from model.config import GPTConfig, TrainConfig
from model.shards import write_shard

REPO = Path(__file__).resolve().parents[1]
VOCAB = 256


def tiny_config(**overrides) -> TrainConfig:
    """2 layers, width 32, context 32, vocabulary 256: a step takes milliseconds on a CPU."""
    cfg = TrainConfig(
        model=GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=VOCAB, padded_vocab_size=VOCAB),
        recipe_name="test-tiny", tokens_per_step=256, micro_batch=4, steps=12, seed=1337,
        lr=1e-2, min_lr_ratio=0.1, warmup_steps=2, val_every=4, val_steps=2, sample_every=4,
        checkpoint_every=4, keep_checkpoints=2,
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def make_shards(data_dir: Path, train_tokens=(3000, 3000), val_tokens=1000, seed=0) -> Path:
    """A val shard and train shards of a learnable pattern (a noisy repeating sequence)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, VOCAB, size=97)

    def tokens(n):
        t = np.resize(base, n).copy()
        noise = rng.random(n) < 0.1
        t[noise] = rng.integers(0, VOCAB, size=noise.sum())
        return t

    write_shard(data_dir / "tiny_val_000000.bin", tokens(val_tokens))
    for i, n in enumerate(train_tokens, start=1):
        write_shard(data_dir / f"tiny_train_{i:06d}.bin", tokens(n))
    return data_dir


def write_config(path: Path, cfg: TrainConfig) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(cfg.to_json())
    return path


def env() -> dict:
    # one thread per process, as torchrun sets: equal arithmetic in 1-rank and 2-rank runs
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def trainer_cmd(config: Path, data: Path, out: Path, nproc: int | None, *extra) -> list[str]:
    """`python -m model.train` for one plain process (nproc None), else under torchrun."""
    launch = [sys.executable, "-m", "model.train"] if nproc is None else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "model.train"]
    return [*launch, "--config", str(config), "--data", str(data), "--out", str(out), *extra]


def run_trainer(config, data, out, nproc=None, *extra, check=True, timeout=180) -> subprocess.CompletedProcess:
    p = subprocess.run(trainer_cmd(config, data, out, nproc, *extra), cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"trainer exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> dict[int, float]:
    """step -> train loss; asserts each step was logged once."""
    steps = [r for r in read_metrics(out) if "loss" in r]
    by_step = {r["step"]: r["loss"] for r in steps}
    assert len(by_step) == len(steps), "a step was logged twice"
    return by_step


class FakeClock:
    """Stands in for the `time` module of model.train and model.clock (train_on_clock patches both): time()
    moves only when advance() is called, by step_seconds; every other attribute is the real time module's."""

    def __init__(self, step_seconds: float, start: float = 1.7e9):
        self.now, self.step_seconds = start, step_seconds

    def time(self) -> float:
        return self.now

    def advance(self) -> None:
        self.now += self.step_seconds

    def __getattr__(self, name):
        return getattr(time, name)


def train_on_clock(config, data, out, clock: FakeClock, monkeypatch, after_step=None, node_up=None) -> None:
    """model.train.main in this process on `clock`: each optimizer step takes clock.step_seconds, then
    after_step(), if given, runs (a fake pusher, say). node_up: the node's start (a trainer on a node),
    else none (the trainer's own clock counts)."""
    from model import clock as run_clock
    from model import train

    # the real step, not one this test already patched in (a test that trains on its clock twice)
    real_step = getattr(train.train_step, "real_step", train.train_step)

    def timed_step(*args, **kwargs):
        clock.advance()
        result = real_step(*args, **kwargs)
        if after_step is not None:
            after_step()
        return result

    if node_up is None:
        monkeypatch.delenv("GPT2CLOUD_NODE_UP", raising=False)
    else:
        monkeypatch.setenv("GPT2CLOUD_NODE_UP", str(node_up))
    monkeypatch.setattr(train, "time", clock)
    monkeypatch.setattr(run_clock, "time", clock)  # the run's clock: cost and time caps, elapsed_seconds
    timed_step.real_step = real_step
    monkeypatch.setattr(train, "train_step", timed_step)
    train.main(["--config", str(config), "--data", str(data), "--out", str(out)])


# A recipe for CLI tests: a 256-token vocabulary model that trains 6 steps in seconds.
TINY_RECIPE = """\
name: test-tiny
description: a 256-token vocabulary model for CLI tests
source: tests
model: {n_layer: 2, n_head: 2, n_embd: 32, block_size: 32, vocab_size: 256, padded_vocab_size: 256}
train: {tokens_per_step: 256, micro_batch: 4, steps: 6, seed: 1337, compile: false}
optimizer: {lr: 1.0e-2, min_lr_ratio: 0.1, warmup_steps: 2, weight_decay: 0.1, betas: [0.9, 0.95]}
data: {dataset: synthetic}
eval: {val_every: 3, val_steps: 2, sample_every: 3, checkpoint_every: 3, keep_checkpoints: 2}
"""
