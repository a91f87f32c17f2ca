"""The fast recipes (Muon + AdamW, a WSD schedule, fewer tokens) train the same GPT-2 as their faithful
siblings: they load with the sibling's architecture, resume exactly under 2 ranks with gradient
accumulation like AdamW runs, and their checkpoints export to transformers and evaluate like any other.
(What `estimate` says of them is in test_estimate.py; bad recipe fields in test_bad_input.py.)"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from gpt2cloud.cli import app
from gpt2cloud.cost.estimate import memory_per_gpu
from gpt2cloud.cost.recipes import faithful_recipe, known_recipes, load_recipe
from model import checkpoint as ckpt
from model.config import GPTConfig
from model.metrics import truncate_after
from trainer_helpers import losses, make_shards, read_metrics, run_trainer, tiny_config, write_config

FAST = {"gpt2-124m-fast": "gpt2-124m", "gpt2-1558m-fast": "gpt2-1558m"}


@pytest.mark.parametrize("fast, faithful", FAST.items())
def test_fast_recipe_keeps_its_faithful_gpt2(fast, faithful):
    r, f = load_recipe(fast), load_recipe(faithful)
    assert fast in known_recipes() and r.faster_than == faithful and faithful_recipe(r) == f
    # the same GPT-2: model block, data and batch; only the optimizer, schedule and steps change
    assert r.model == f.model and r.data == f.data
    assert (r.train.tokens_per_step, r.train.micro_batch) == (f.train.tokens_per_step, f.train.micro_batch)
    assert r.model.config().param_count() == f.model.config().param_count()
    assert r.train.steps == round(r.token_ratio * f.train.steps) and r.token_ratio == 0.6
    assert "modded-nanogpt" in r.basis and "5,600" in r.basis and "3,250-3,600" in r.basis
    cfg = r.to_train_config()
    assert (cfg.optimizer, cfg.schedule, cfg.cooldown_frac) == ("muon", "wsd", 0.4)
    assert (cfg.muon_lr, cfg.muon_momentum, cfg.muon_weight_decay) == (0.02, 0.95, 0.0)
    assert cfg.lr == f.optimizer.lr and (cfg.beta1, cfg.beta2) == tuple(f.optimizer.betas)
    plain = f.to_train_config()
    assert (plain.optimizer, plain.schedule) == ("adamw", "cosine")  # the faithful recipes are unchanged


def test_fast_recipe_memory_matches_a_trace_of_its_real_step(monkeypatch):
    """memory_per_gpu(..., "muon") against bench_memory's trace of the fast recipe's step with the optimizer
    setup_training builds (model/muon.py build_optimizer), on real CPU tensors: the 124M fast recipe cut
    to 2 layers of width 256, context 64 and a 4,096-token vocabulary (the embedding's AdamW moments and
    the matrices' Muon momentum then weigh about alike), a step in well under a second. What Muon changes
    is the optimizer state;
    at this size the backward's temporaries set the peak, so the whole peak is compared at full size only
    (the fast recipes' traced peaks agree within 0.1%, docs/estimate.md)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_memory
    from model.gpt import GPT
    from model.optim import build_optimizer

    cfg = load_recipe("gpt2-124m-fast").to_train_config(micro_batch=1)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_layer=2, n_head=4, n_embd=256,
                                                             block_size=64, vocab_size=4096, padded_vocab_size=4096))
    # the trace builds GPT.configure_optimizer's AdamW; the fast recipe's step uses build_optimizer's
    monkeypatch.setattr(GPT, "configure_optimizer", lambda self, *a: build_optimizer(self, cfg, "cuda"))
    traced = bench_memory.trace_step(cfg, accum=1, steps=2, fake=False)  # step 2: the optimizer state exists
    muon, adamw = memory_per_gpu(cfg.model, 1, "muon"), memory_per_gpu(cfg.model, 1)
    assert traced["by_kind"]["optimizer"] == pytest.approx(muon.optimizer_gib, rel=0.01)
    assert muon.optimizer_gib < adamw.optimizer_gib  # one momentum buffer for the hidden matrices, not two moments
    assert traced["by_kind"]["weights"] == pytest.approx(muon.weights_gib, rel=0.01)


# ---- Muon under DDP: 2 ranks with accumulation, and exact resume (as test_trainer.py does for AdamW) ----

STEPS = 20


def muon_config(**overrides):
    """The trainer tests' tiny model, trained like a fast recipe: Muon + AdamW, warmup-stable-decay."""
    return tiny_config(optimizer="muon", muon_lr=0.02, muon_momentum=0.95, schedule="wsd", cooldown_frac=0.4,
                       min_lr_ratio=0.0, **overrides)


@pytest.fixture(scope="module")
def muon_runs(tmp_path_factory):
    """1024 tokens per step of 4 x 32-token micro-batches: 1 process x 8 micro-steps, 2 ranks x 4."""
    root = tmp_path_factory.mktemp("muon")
    data = make_shards(root / "data", train_tokens=(12000, 12000), val_tokens=1000)
    config = write_config(root / "config.json", muon_config(steps=STEPS, tokens_per_step=1024, val_every=10,
                                                            checkpoint_every=10, keep_checkpoints=3))
    run_trainer(config, data, root / "one", None)
    run_trainer(config, data, root / "two", 2)
    return {"root": root, "data": data, "config": config, "one": root / "one", "two": root / "two"}


def _weights(out, step=STEPS):
    return load_file(str(out / "checkpoints" / f"step_{step:06d}" / "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    """The largest weight difference, the attention key biases aside: their gradient is exactly zero (a
    bias on the keys shifts all of a query's scores alike), so AdamW turns rounding noise into lr-sized
    steps there (test_trainer.py explains it); they change nothing the model computes."""
    def comparable(key, t):
        return torch.cat([t[: t.shape[0] // 3], t[2 * t.shape[0] // 3:]]) if key.endswith("attn.c_attn.bias") else t

    assert a.keys() == b.keys()
    return max((comparable(k, a[k]) - comparable(k, b[k])).abs().max().item() for k in a)


def test_muon_two_ranks_accumulating_4_equal_one_rank_accumulating_8(muon_runs):
    one, two = losses(muon_runs["one"]), losses(muon_runs["two"])
    starts = [read_metrics(muon_runs[k])[0] for k in ("one", "two")]
    assert [(s["world_size"], s["grad_accum"]) for s in starts] == [(1, 8), (2, 4)]
    assert [s["config"]["optimizer"] for s in starts] == ["muon", "muon"]
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    assert max(abs(one[s] - two[s]) for s in one) < 1e-5
    assert _max_diff(_weights(muon_runs["one"]), _weights(muon_runs["two"])) < 1e-5
    assert one[STEPS] < one[1] - 1.0  # it learns


def test_muon_checkpoint_holds_the_momentum(muon_runs):
    opt = torch.load(muon_runs["two"] / "checkpoints" / f"step_{STEPS:06d}" / "optimizer.pt",
                     weights_only=True)["optimizer"]
    groups, per_param = opt["param_groups"], list(opt["state"].values())
    assert any(g.get("muon") for g in groups) and any(not g.get("muon") for g in groups)
    assert any("momentum_buffer" in s for s in per_param) and any("exp_avg" in s for s in per_param)


@pytest.mark.parametrize("resume_on", [2, None])
def test_muon_resume_from_two_ranks_is_exact(muon_runs, tmp_path, resume_on):
    """The 2-rank run stopped after its step-10 checkpoint, resumed on 2 ranks (and on 1 process, which
    accumulates 8 micro-steps where each rank took 4), equals the uninterrupted runs: the checkpoint
    carries Muon's momentum, AdamW's moments, the lr schedule's position and the data position."""
    out = tmp_path / "resumed"
    shutil.copytree(muon_runs["two"], out)
    shutil.rmtree(out / "checkpoints" / f"step_{STEPS:06d}")  # as if stopped after step 10's checkpoint
    truncate_after(out / "metrics.jsonl", 13)  # having logged a few more steps before it died
    run_trainer(muon_runs["config"], muon_runs["data"], out, resume_on)
    starts = [r for r in read_metrics(out) if r.get("event") == "start"]
    assert [s["resumed_from"] for s in starts] == [None, 10]
    resumed = losses(out)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for reference in ("two", "one"):
        expected = losses(muon_runs[reference])
        assert max(abs(expected[s] - resumed[s]) for s in range(11, STEPS + 1)) < 1e-5, reference
        assert _max_diff(_weights(muon_runs[reference]), _weights(out)) < 1e-5, reference


# ---- a fast-recipe checkpoint is a plain GPT-2: export to transformers, evaluate ----

def test_muon_checkpoint_exports_to_transformers_and_evaluates(tmp_path):
    transformers = pytest.importorskip("transformers")
    data = make_shards(tmp_path / "data")  # token ids below 256: valid GPT-2 tokens
    config = write_config(tmp_path / "config.json", muon_config(
        model=GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32), steps=4, val_every=4, val_steps=2,
        sample_every=100, checkpoint_every=4))
    run_trainer(config, data, tmp_path / "out", None)
    runner = CliRunner()
    r = runner.invoke(app, ["export", str(tmp_path / "out"), "--hf", str(tmp_path / "hf"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["step"] == 4

    ours = ckpt.load_model(tmp_path / "out").eval()
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.tensor([[15496, 11, 314, 1101, 257, 3303, 2746, 11, 50256, 0]])
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx)[0][..., :50257], atol=1e-5, rtol=0)

    # `eval` scores the checkpoint and the exported directory alike, and as the trainer did at step 4
    val = {}
    for target in ("out", "hf"):
        r = runner.invoke(app, ["eval", str(tmp_path / target), "--val", str(data), "--val-steps", "2",
                                "--val-batch", "4", "--device", "cpu", "--json"])
        assert r.exit_code == 0, r.output
        val[target] = json.loads(r.output)["val"]["loss"]
    trained = [m["val_loss"] for m in read_metrics(tmp_path / "out") if m.get("step") == 4 and "val_loss" in m]
    assert val["out"] == pytest.approx(val["hf"], rel=1e-5) and val["out"] == pytest.approx(trained[-1], rel=1e-4)
