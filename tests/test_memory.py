"""The memory estimate (gpt2cloud/cost/estimate.py memory_per_gpu) against a trace of the real training
step (benchmarks/bench_memory.py: model/train.py's train_step on fake tensors), and the tracer itself
against the allocations of a real (tiny) CPU step."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_memory

from gpt2cloud.cost.estimate import estimate, memory_per_gpu
from gpt2cloud.cost.recipes import load_recipe


# the two ends of the range the estimate is used for (its terms are per layer, per width and per token: the
# sizes between follow; `benchmarks/bench_memory.py --recipe gpt2-350m --estimate` checks any one by hand)
@pytest.mark.parametrize("recipe,micro_batch", [("gpt2-124m", 2), ("gpt2-1558m", 1)])
def test_estimate_agrees_with_the_trace(recipe, micro_batch):
    cfg = load_recipe(recipe).to_train_config(micro_batch=micro_batch)
    traced = bench_memory.trace_step(cfg, accum=2, steps=2)
    est = memory_per_gpu(cfg.model, micro_batch)
    assert est.traced_gib == pytest.approx(traced["peak_gib"], rel=0.10)
    kinds = traced["by_kind"]
    assert kinds["weights"] == pytest.approx(est.weights_gib, rel=0.01)
    assert kinds["optimizer"] == pytest.approx(est.optimizer_gib, rel=0.01)
    assert kinds["gradients"] == pytest.approx(est.gradients_gib, rel=0.01)
    assert kinds["activations"] == pytest.approx(est.activations_gib, rel=0.10)
    assert kinds["logits"] == pytest.approx(est.logits_gib, rel=0.10)


def test_the_flagship_recipe_fits_an_h100_and_llmc_micro_batch_16_does_not():
    # traced: 77.7 GiB of tensors at micro-batch 16 (an 80 GB H100 holds 79.6 GiB), 51.9 GiB at 8
    xl = load_recipe("gpt2-1558m")
    assert memory_per_gpu(xl.model.config(), 16).total_gib > 80
    e = estimate(xl, "H100", 8, price=3.0)
    assert e.fits and e.micro_batch == 8 and e.micro_batch_note == ""


def test_the_fake_trace_matches_real_cpu_allocations():
    """The tiny model's step on real CPU tensors: the profiler's allocator events give the true peak."""
    from torch.profiler import ProfilerActivity, profile

    cfg = load_recipe("gpt2-tiny").to_train_config(micro_batch=2)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_layer=1))
    fake = bench_memory.trace_step(cfg, fake=True)
    real = bench_memory.trace_step(cfg, fake=False)
    assert fake["peak_bytes"] == real["peak_bytes"] and fake["by_kind"] == real["by_kind"]

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        bench_memory.trace_step(cfg, fake=False)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    # the tracer rounds each storage up to CUDA's 512-byte blocks; the CPU allocator does not
    assert peak == pytest.approx(fake["peak_bytes"], rel=0.02)
