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
from gpt2cloud.cost.estimate import estimate, memory_per_gpu
from gpt2cloud.cost.recipes import faithful_recipe, known_recipes, load_recipe
from model import checkpoint as ckpt
from model.config import GPTConfig
from model.metrics import truncate_after
from trainer_helpers import losses, make_shards, read_metrics, run_trainer, tiny_config, write_config

FAST = {"gpt2-124m-fast": "gpt2-124m", "gpt2-1558m-fast": "gpt2-1558m"}
# the token ratio each fast recipe trains on, and the range the evidence supports (docs/training.md#fast-recipes)
RATIOS = {"gpt2-124m-fast": (0.7, (0.65, 0.7)), "gpt2-1558m-fast": (0.75, (0.75, 0.9))}
# what the evidence did not hold fixed against GPT-2's block: every basis names it
NOT_GPT2 = ("RMSNorm", "rotary", "QK-norm", "ReLU^2", "head_dim 128")


@pytest.mark.parametrize("fast, faithful", FAST.items())
def test_fast_recipe_keeps_its_faithful_gpt2(fast, faithful):
    r, f = load_recipe(fast), load_recipe(faithful)
    assert fast in known_recipes() and r.faster_than == faithful and faithful_recipe(r) == f
    # the same GPT-2: model block, data and batch; only the optimizer, schedule and steps change
    assert r.model == f.model and r.data == f.data
    assert (r.train.tokens_per_step, r.train.micro_batch) == (f.train.tokens_per_step, f.train.micro_batch)
    assert r.model.config().param_count() == f.model.config().param_count()
    assert r.train.steps == round(r.token_ratio * f.train.steps) and (r.token_ratio, r.ratio_range) == RATIOS[fast]
    cfg = r.to_train_config()
    assert (cfg.optimizer, cfg.schedule, cfg.cooldown_frac) == ("muon", "wsd", 0.4)
    assert (cfg.muon_lr, cfg.muon_momentum, cfg.muon_weight_decay) == (0.02, 0.95, 0.0)
    # Muon's AdamW part at 3x the faithful lr (benchmarks/bench_optim.py --ablate; the references run it higher)
    assert cfg.lr == pytest.approx(3 * f.optimizer.lr) and (cfg.beta1, cfg.beta2) == tuple(f.optimizer.betas)
    assert cfg.weight_decay == f.optimizer.weight_decay
    plain = f.to_train_config()
    assert (plain.optimizer, plain.schedule) == ("adamw", "cosine")  # the faithful recipes are unchanged


@pytest.mark.parametrize("fast", FAST)
def test_basis_names_what_the_evidence_did_not_hold_fixed(fast):
    r = load_recipe(fast)
    assert "modded-nanogpt" in r.basis and "Wen et al. 2025" in r.basis
    assert all(x in r.basis for x in NOT_GPT2), r.basis
    assert "optimizer-only" not in r.basis and "architecture fixed" not in r.basis  # the old claim, gone
    assert r.measured_token_ratio is None and not r.measured_source  # no GPU comparison at either size yet
    if fast == "gpt2-124m-fast":
        assert all(x in r.basis for x in ("untied embedding and head", "logit softcap", "undertuned", "5,625"))
    else:
        assert all(x in r.basis for x in ("1.5B", "2.7672", "2.7737", "1.2B", "491,520-token batch"))
    text = (Path(__file__).resolve().parents[1] / "recipes" / f"{fast}.yaml").read_text()
    assert "Not held fixed" in text and all(x in text for x in NOT_GPT2)


def _variant(tmp_path, fast, old, new):
    from gpt2cloud.cost.recipes import _bundled_dir

    text = (_bundled_dir() / f"{fast}.yaml").read_text()
    assert old in text
    path = tmp_path / "variant.yaml"
    path.write_text(text.replace(old, new))
    return str(path)


@pytest.mark.parametrize("old, new, message", [
    ("token_ratio_range: [0.75, 0.9]", "token_ratio_range: [0.8, 0.9]", "outside token_ratio_range"),
    ("token_ratio_range: [0.75, 0.9]", "token_ratio_range: [0.9, 0.75]", "low <= high"),
    ("measured_token_ratio: null", "measured_token_ratio: 0.8", "measured_token_ratio and measured_source go together"),
])
def test_fast_recipe_ratio_fields_are_checked(tmp_path, old, new, message):
    from gpt2cloud.errors import UserError

    with pytest.raises(UserError, match=message):
        load_recipe(_variant(tmp_path, "gpt2-1558m-fast", old, new))
    # a measured comparison with its source loads, and the estimate shows it
    path = _variant(tmp_path, "gpt2-1558m-fast", "measured_token_ratio: null\nmeasured_source: null",
                    "measured_token_ratio: 0.8\nmeasured_source: \"run xl-fast-1 vs xl-1\"")
    e = estimate(load_recipe(path), "H100", 8, price=3.0)
    assert (e.measured_token_ratio, e.measured_source) == (0.8, "run xl-fast-1 vs xl-1")


def test_estimate_shows_the_saving_as_a_range_with_its_basis():
    fast = estimate(load_recipe("gpt2-1558m-fast"), "H100", 8, price=3.0)
    faithful = estimate(load_recipe("gpt2-1558m"), "H100", 8, price=3.0)
    assert fast.tokens == 24_000 * 1_048_576 and fast.token_ratio == 0.75 and fast.token_ratio_range == [0.75, 0.9]
    low, high = fast.range_all_in_cost_usd
    assert low == pytest.approx(fast.all_in_cost_usd)  # the recipe trains the low end
    assert low < high < faithful.all_in_cost_usd
    at_high = estimate(load_recipe("gpt2-1558m-fast"), "H100", 8, price=3.0, steps=round(0.9 * 32_000))
    assert high == pytest.approx(at_high.all_in_cost_usd)
    # the faithful recipe carries the same range for its fast sibling
    assert faithful.fast["token_ratio_range"] == [0.75, 0.9]
    assert faithful.fast["range_all_in_cost_usd"] == pytest.approx(fast.range_all_in_cost_usd)
    small = estimate(load_recipe("gpt2-124m-fast"), "H100", 8, price=3.0)
    assert small.token_ratio == 0.7 and small.token_ratio_range == [0.65, 0.7]
    assert small.range_all_in_cost_usd[1] == pytest.approx(small.all_in_cost_usd)  # the conservative end

    runner = CliRunner()
    res = runner.invoke(app, ["estimate", "gpt2-1558m-fast", "--gpus", "H100:8", "--price", "3"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "trains 0.75x gpt2-1558m's tokens" in text and "0.75x-0.9x the tokens" in text
    assert "rests on modded-nanogpt 1.5B scale-up" in text and "RMSNorm" in text and "measured here" in text
    d = json.loads(runner.invoke(app, ["estimate", "gpt2-1558m-fast", "--gpus", "H100:8", "--price", "3",
                                       "--json"]).output)
    # the keys scripts read before stay; the range is added beside them
    assert d["token_ratio"] == 0.75 and "basis" in d and "bench_optim_step_ratio" in d and d["faithful"]
    assert d["token_ratio_range"] == [0.75, 0.9] and len(d["range_all_in_cost_usd"]) == 2
    res = runner.invoke(app, ["estimate", "gpt2-124m", "--gpus", "H100:8", "--price", "3"])
    assert "0.65x-0.7x the tokens" in " ".join(res.output.split())


# ---- Muon's step time: FLOPs and a time per matrix, split over the ranks ----

def test_muon_time_per_matrix_reproduces_modded_nanogpts_sharding_saving():
    from gpt2cloud.cost.optimizers import (MUON_ANCHOR, MUON_SECONDS_PER_MATRIX, OPTIMIZERS,
                                           newton_schulz_matrices)

    a = MUON_ANCHOR
    m = GPTConfig(n_layer=12, n_head=12, n_embd=768)
    rate = a["mfu"] * a["peak_tflops"] * 1e12
    muon = OPTIMIZERS["muon"]
    whole, sharded = muon.step_seconds(m, 1, rate), muon.step_seconds(m, 8, rate)
    # one rank doing every matrix, less one doing an eighth: 178.9 - 153.8 ms per step on 8xH100
    assert (whole - whole / 8) * 1e3 == pytest.approx(178.9 - 153.8, rel=1e-6)
    assert 2e-4 < MUON_SECONDS_PER_MATRIX < 5e-4 and newton_schulz_matrices(m) == 72
    assert newton_schulz_matrices(m, 8) == 9 and sharded == pytest.approx(whole / 8, rel=0.01)
    assert OPTIMIZERS["adamw"].step_seconds(m, 8, rate) == 0


def test_estimate_counts_muon_time_split_over_the_gpus():
    xl = load_recipe("gpt2-1558m").model.config()
    fast8 = estimate(load_recipe("gpt2-1558m-fast"), "H100", 8, price=3.0)
    faithful8 = estimate(load_recipe("gpt2-1558m"), "H100", 8, price=3.0)
    assert fast8.step_seconds == pytest.approx(faithful8.step_seconds + fast8.optimizer_seconds_per_step)
    assert fast8.optimizer_matrices_per_gpu == 48 * 6 // 8
    one = estimate(load_recipe("gpt2-1558m-fast"), "H100", 1, price=3.0, micro_batch=8)
    # each of 8 GPUs orthogonalizes an eighth of the matrices: an eighth of the time (same MFU at 1 and 8 GPUs)
    assert one.optimizer_seconds_per_step == pytest.approx(8 * fast8.optimizer_seconds_per_step, rel=0.01)
    assert one.optimizer_matrices_per_gpu == 288
    flops_only = fast8.optimizer_flops_per_step / 8 / (fast8.mfu * 989e12)
    assert fast8.optimizer_seconds_per_step > 1.5 * flops_only  # the per-matrix time counts, not FLOPs alone
    assert 0.005 < fast8.optimizer_seconds_per_step / fast8.step_seconds < 0.02
    small = estimate(load_recipe("gpt2-124m-fast"), "H100", 1, price=3.0)
    assert small.optimizer_seconds_per_step * 1e3 == pytest.approx((178.9 - 153.8) * 8 / 7, rel=0.05)
    assert xl.n_layer == 48


# ---- gpu_check.sh's results -> calibration points ----

def test_gpu_check_parts_fit_in_its_7_minutes():
    """One timeout of 420 s around everything; each part's own bound; together under it, the dry run's too; every
    part the script runs is one gpu_check.py knows, the four step rows included."""
    import re

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gpu_check

    text = (Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh").read_text()
    assert re.search(r"TOTAL=\$\{GPU_CHECK_TOTAL:-420\}", text) and 'exec timeout -k 5 "$TOTAL"' in text
    calls = [line.split()[1:] for line in text.splitlines() if re.match(r"\s+part \d+ ", line)]
    dry, gpu = calls[0], calls[1:]
    assert sum(int(c[0]) for c in gpu) == int(dry[0]) < 420
    assert [c[1] for c in gpu] == dry[1:] == ["info", "124m-adamw", "124m-muon", "1558m", "1558m-fast", "small"]
    assert set(gpu_check.PARTS) == {"124m-adamw", "124m-muon", "1558m", "1558m-fast"}
    assert {gpu_check.PARTS[p][0] for p in gpu_check.PARTS} == {"gpt2-124m", "gpt2-124m-fast", "gpt2-1558m",
                                                                "gpt2-1558m-fast"}



def test_gpu_check_results_become_measured_calibration_points(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gpu_results_to_calibration as conv

    from gpt2cloud.cost.hardware import default_mfu
    from gpt2cloud.home import user_calibration_path

    step = {"recipe": "gpt2-124m", "params": 124_439_808, "gpu": "H100", "device": "NVIDIA H100 80GB HBM3",
            "compile": True, "micro_batch": 64, "accum": 1, "dry": False, "time": "2026-12-06T19:00:00"}
    rows = [{"part": "info", "gpu": "H100"},
            dict(step, part="124m-adamw", mfu=0.52, tokens_per_second=620_000.0),
            dict(step, part="124m-muon", mfu=0.49, tokens_per_second=590_000.0, recipe="gpt2-124m-fast"),
            dict(step, part="1558m", mfu=0.47, tokens_per_second=29_000.0, params=1_557_611_200, recipe="gpt2-1558m"),
            {"part": "1558m-fast", "failed": "not done within its 65 s"},
            dict(step, part="124m-adamw", dry=True, gpu="CPU", mfu=0.001, tokens_per_second=90.0)]
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows) + "a torn last line")
    points, skipped = conv.points(rows)
    assert [(p["params"], p["mfu"], p["kind"], p["gpu"], p["nodes"]) for p in points] == \
        [(124_439_808, 0.52, "measured", "H100", 1), (1_557_611_200, 0.47, "measured", "H100", 1)]
    assert any("124m-muon" in w and "Newton-Schulz" in w for w in skipped)
    assert any("1558m-fast: " in w for w in skipped) and any("dry run" in w for w in skipped)
    # one command appends them where `gpt2cloud estimate` reads its calibration, once
    assert conv.main([str(results), "--append"]) == 0 and conv.main([str(results), "--append"]) == 0
    lines = user_calibration_path().read_text().splitlines()
    assert len(lines) == 2
    assert default_mfu("H100", 124_439_808).mfu != pytest.approx(0.407)  # the measured point now counts
    assert conv.main([str(tmp_path / "missing.jsonl")]) == 2


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
