"""benchmarks/bench_optim.py: both optimizers tuned alike (the same grid around each one's default), on seeds that
are never scored; one run covers several horizons exactly; every run is bounded in time. Tiny configs: the whole
file runs in a few seconds."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_optim as bo  # noqa: E402

from model.shards import write_shard  # noqa: E402

TINY = dict(bo.PRESETS["quick"], horizons=(10, 20), eval_every=5, seeds=(0,), tune_seeds=(100,))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A patterned token stream with noise (something to learn), llm.c shards with a val shard."""
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    base = np.tile(np.arange(50), 300)
    write_shard(d / "x_train_000000.bin",
                np.where(rng.random(base.size) < 0.2, rng.integers(0, 300, base.size), base).astype(np.uint16))
    write_shard(d / "x_val_000000.bin", np.tile(np.arange(50), 20).astype(np.uint16))
    return d


def test_tuning_and_scored_seeds_are_apart():
    b = bo.Bench()
    assert not set(b.seeds) & set(b.tune_seeds) and b.seeds == (0, 1, 2) and b.tune_seeds == (100, 101)
    assert {j["seed"] for j in bo.tuning_jobs(b)} == set(b.tune_seeds)
    assert all(j["purpose"] == "tune" for j in bo.tuning_jobs(b))
    chosen = {opt: {100: {"scale": 1.0}} for opt in bo.OPTIMIZERS}
    scored = bo.scoring_jobs(b, chosen)
    assert {j["seed"] for j in scored} == set(b.seeds) and len(scored) == 2 * len(b.seeds)
    assert {j["seed"] for j in bo.ablation_jobs(b, chosen)} == set(b.tune_seeds)  # a choice is never scored on its seeds
    with pytest.raises(ValueError, match="both tuning and scored"):
        bo.Bench(seeds=(0, 1), tune_seeds=(1, 2))


def test_both_optimizers_get_the_same_grid_centred_on_their_own_default():
    b = bo.Bench()
    adamw, muon = bo.grid(b, "adamw"), bo.grid(b, "muon")
    assert len(adamw) == len(muon) == 3 and [p["scale"] for p in adamw] == [p["scale"] for p in muon]
    centre = len(adamw) // 2
    assert adamw[centre]["lr"] == b.adamw_lr
    assert (muon[centre]["muon_lr"], muon[centre]["lr"]) == (b.muon_lr, b.muon_adam_lr)
    assert [p["lr"] / b.adamw_lr for p in adamw] == [p["muon_lr"] / b.muon_lr for p in muon] == [0.5, 1.0, 2.0]
    jobs = bo.tuning_jobs(b)
    assert sum(j["optimizer"] == "adamw" for j in jobs) == sum(j["optimizer"] == "muon" for j in jobs) == 6
    with pytest.raises(ValueError, match="odd number"):
        bo.Bench(grid=(0.5, 1.0))


def test_choice_reads_only_the_tuning_runs():
    b = bo.Bench(horizons=(50, 100))

    def run(opt, scale, purpose, finals, seed=100):
        return {"optimizer": opt, "scale": scale, "seed": seed, "variant": "grid", "purpose": purpose, "finals": finals}

    runs = [run(o, s, "tune", {50: 5.0 + abs(s - 1), 100: 4.0 + abs(s - 2)}, seed) for o in bo.OPTIMIZERS
            for s in b.grid for seed in b.tune_seeds]
    runs.append(run("adamw", 0.5, "score", {50: 0.1, 100: 0.1}, seed=0))  # a scored run never chooses
    chosen = bo.choose(b, runs)
    assert chosen["adamw"][50]["scale"] == 1.0 and not chosen["adamw"][50]["edge"]
    assert chosen["adamw"][100]["scale"] == 2.0 and chosen["adamw"][100]["edge"]  # each horizon its own; edge flagged
    assert bo.steps_to_reach([(10, 5.0), (20, 4.0), (30, 3.0)], 3.5) == pytest.approx(25.0)
    assert bo.steps_to_reach([(10, 5.0)], 4.0) is None


def test_one_run_covers_each_horizon_exactly(corpus, tmp_path):
    """The 10-step horizon inside a 10-and-20 run is the run scheduled for 10 steps: the same curve."""
    b = bo.Bench(**TINY)
    vocab, train, val = bo.remap_corpus(corpus, tmp_path, b.vocab)
    job = {"optimizer": "muon", "seed": 0, "scale": 1.0, "variant": "grid", "purpose": "tune"}
    both = bo.run_one((b, job, vocab, str(train), str(val), 1, time.time() + 60))
    alone = bo.run_one((dataclasses.replace(b, horizons=(10,)), job, vocab, str(train), str(val), 1, time.time() + 60))
    assert both["finished"] and sorted(both["curves"]) == [10, 20]
    assert [s for s, _ in both["curves"][10]] == [s for s, _ in alone["curves"][10]] == [5, 10]
    assert [v for _, v in both["curves"][10]] == pytest.approx([v for _, v in alone["curves"][10]], abs=1e-5)
    assert both["curves"][20][0] == pytest.approx(both["curves"][10][0])  # shared until the cooldown starts
    assert both["finals"][20] < both["curves"][20][0][1]  # it learns


def test_tiny_benchmark_end_to_end_and_bounded(corpus):
    b = bo.Bench(**TINY)
    out = bo.run_benchmark(b, corpus, n_jobs=1, max_minutes=2, ablate=True, log=lambda m: None, threads=1)
    assert not out["unfinished"]
    s = out["summary"]
    assert sorted(s) == [10, 20] and all("final_mean" in s[h]["adamw"] and "final_mean" in s[h]["muon"] for h in s)
    assert {r["seed"] for r in out["runs"] if r["purpose"] == "score"} == {0}
    assert {r["seed"] for r in out["runs"] if r["purpose"] != "score"} == {100}
    text = bo.table(b, s, out["chosen"], out["ablation"], out["wall_seconds"], out["vocab"], 1, "")
    assert "token ratio" in text and "tuned on seeds 100, scored on 0" in text and "adam_part_at_adamw_lr" in text
    # past its deadline a benchmark ends at once with what finished, and says what did not
    late = bo.run_benchmark(b, corpus, n_jobs=1, max_minutes=1e-6, log=lambda m: None, threads=1)
    assert late["unfinished"] and late["wall_seconds"] < 30


def test_command_line_writes_table_json_and_png(corpus, tmp_path):
    png, js = tmp_path / "curves.png", tmp_path / "bench.json"
    cmd = [sys.executable, str(Path(bo.__file__)), "--preset", "quick", "--data", str(corpus), "--jobs", "1",
           "--threads", "1", "--ablate", "--png", str(png), "--json", str(js)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for text in ("needs at most ~1 min", "final val loss", "steps to AdamW final", "token ratio", "ablation",
                 "wall time"):
        assert text in out.stdout, out.stdout
    rows = [line.split()[:2] for line in out.stdout.splitlines() if line.split()[1:2] in (["adamw"], ["muon"])]
    assert rows == [["20", "adamw"], ["20", "muon"], ["40", "adamw"], ["40", "muon"]]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    d = json.loads(js.read_text())
    scored = sorted((r["optimizer"], r["seed"]) for r in d["runs"] if r["purpose"] == "score")
    assert scored == [(o, s) for o in ("adamw", "muon") for s in (0, 1)]
    assert all(r["curves"]["40"][-1][0] == 40 for r in d["runs"] if r["finished"])
    assert "steps_each" in d["summary"]["40"]["muon"] and d["load"]
    # each run is also kept as it ends: a benchmark killed midway leaves what it finished
    assert len((tmp_path / "bench.runs.jsonl").read_text().splitlines()) == len(d["runs"])
