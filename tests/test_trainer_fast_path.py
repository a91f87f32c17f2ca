"""The trainer's GPU fast path, checked on CPU: no DDP for one process, no logits kept in training,
step numbers read one step late, the schedule's own length, val loss and GPU-seconds across world sizes."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from model import train
from model.gpt import GPT
from trainer_helpers import FakeClock, train_on_clock, env, losses, make_shards, read_metrics, run_trainer, tiny_config, write_config



@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("fast") / "data")


def test_one_process_under_torchrun_does_not_wrap_ddp(data, tmp_path):
    config = write_config(tmp_path / "c.json", tiny_config(steps=2, val_every=2, checkpoint_every=2))
    run_trainer(config, data, tmp_path / "one", 1)
    start = read_metrics(tmp_path / "one")[0]
    assert start["event"] == "start" and start["world_size"] == 1 and start["ddp"] is False


def test_training_forward_returns_no_logits():
    model = GPT(tiny_config().model)
    x = torch.randint(0, 256, (2, 8))
    logits, loss = model(x, x)
    assert logits is None and loss.ndim == 0
    full, none = model(x)
    assert none is None and full.shape == (2, 8, 256)
    ref = torch.nn.functional.cross_entropy(full.view(-1, 256), x.view(-1))
    # the same lm_head and cross-entropy on the same tensors: bitwise equal (observed 0); 1e-6 = 2 ulp of a loss
    # of ~5.1. Targets shifted by one position give a loss 0.4 away.
    assert abs(ref.item() - loss.item()) < 1e-6


def test_reads_one_step_late_log_each_steps_own_numbers(data, tmp_path, monkeypatch):
    """GPT2CLOUD_DEFER_READS=1 takes the CUDA path on CPU: the same losses and norms, each step once, in order."""
    config = write_config(tmp_path / "c.json", tiny_config(steps=12, val_every=5, checkpoint_every=6))
    run_trainer(config, data, tmp_path / "now", None)
    monkeypatch.setattr("trainer_helpers.env", lambda: {**env(), "GPT2CLOUD_DEFER_READS": "1"})
    run_trainer(config, data, tmp_path / "late", None)
    now, late = read_metrics(tmp_path / "now"), read_metrics(tmp_path / "late")
    assert losses(tmp_path / "now") == losses(tmp_path / "late")
    assert [r["grad_norm"] for r in now if "loss" in r] == [r["grad_norm"] for r in late if "loss" in r]
    # checkpoint lines come when their background write finishes: compare the order of everything else
    def order(rows):
        return [("val" if "val_loss" in r else r.get("event") or "step", r.get("step")) for r in rows
                if r.get("event") != "checkpoint"]

    assert order(late) == order(now)
    assert [r["step"] for r in late if r.get("event") == "checkpoint"] == [6, 12]
    ck = json.loads((tmp_path / "late" / "checkpoints" / "step_000012" / "trainer_state.json").read_text())
    assert ck["loss"] == losses(tmp_path / "late")[12]


def test_steps_that_fit():
    assert train.steps_that_fit(0.0, 10.0) == 1  # no step time yet: check again after one step
    assert train.steps_that_fit(0.1, math.inf) == int(train.CHECK_SECONDS / 0.1)
    assert train.steps_that_fit(1.5, 9.6) == 1  # CHECK_SECONDS caps it
    assert train.steps_that_fit(0.01, 0.035, math.inf) == 3  # the cap does
    assert train.steps_that_fit(1.0, 0.5) == 0


def test_steps_extend_on_one_schedule_and_a_changed_schedule_is_refused(data, tmp_path):
    config = write_config(tmp_path / "c.json", tiny_config(steps=40, val_every=10, checkpoint_every=10))
    run_trainer(config, data, tmp_path / "whole", None)
    out = tmp_path / "extended"
    run_trainer(config, data, out, None, "--steps", "20")
    run_trainer(config, data, out, None, "--steps", "40")
    lrs = {r["step"]: r["lr"] for r in read_metrics(out) if "loss" in r}
    whole = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "whole") if "loss" in r}
    assert lrs == whole and sorted(lrs) == list(range(1, 41))
    assert lrs[20] > lrs[40]  # still decaying at step 20: a 20-step schedule would have ended there
    # one process both times, resumed from an exact checkpoint: bitwise equal (observed 0); 1e-5 is margin
    assert max(abs(a - b) for a, b in zip(losses(out).values(), losses(tmp_path / "whole").values())) < 1e-5
    manifest = json.loads((out / "checkpoints" / "step_000040" / "manifest.json").read_text())
    assert manifest["config"]["schedule_steps"] == 40 and manifest["config"]["steps"] == 40
    p = run_trainer(config, data, out, None, "--steps", "50", "--schedule-steps", "60", check=False)
    assert p.returncode == 2
    last = p.stderr.strip().splitlines()
    assert len(last) == 1 and "40-step" in last[0] and "--schedule-steps 40" in last[0]


def test_val_loss_reads_the_same_batches_at_any_world_size(data, tmp_path):
    """val_steps 3 over 2 ranks: rank 0 reads batches 0 and 2, rank 1 batch 1 (its batch 3 weighs nothing)."""
    config = write_config(tmp_path / "c.json", tiny_config(steps=2, val_every=1, val_steps=3, checkpoint_every=2))
    run_trainer(config, data, tmp_path / "one", None)
    run_trainer(config, data, tmp_path / "two", 2)
    val = [[r["val_loss"] for r in read_metrics(tmp_path / k) if "val_loss" in r] for k in ("one", "two")]
    # weights bitwise equal (1 x 2 vs 2 x 1, tests/test_trainer.py); l0/3 + l1/3 + l2/3 summed in another order:
    # within 2 ulp of the val loss (~5.4) = 1e-6 (observed 0). Reading another batch instead moves it by 4e-3.
    assert len(val[0]) == 2 and max(abs(a - b) for a, b in zip(*val)) < 1e-5


def test_budget_counts_gpu_seconds_across_world_sizes(data, tmp_path, monkeypatch):
    """A checkpoint of a 2-rank run, resumed on 1 rank: the cost is the 2-rank run's GPU-seconds plus
    this run's seconds x 1, not all elapsed time x 1."""
    config = write_config(tmp_path / "c.json", tiny_config(steps=4, checkpoint_every=4, price_per_gpu_hour=3600.0))
    out = tmp_path / "out"
    run_trainer(config, data, out, 2)
    state = json.loads((out / "checkpoints" / "step_000004" / "trainer_state.json").read_text())
    # they differ by 2 x the time between two clock reads (microseconds; 0.01 allows 5 ms); float error ~1e-15
    assert state["gpu_seconds"] == pytest.approx(2 * state["elapsed_seconds"], abs=0.01)

    more = write_config(tmp_path / "more.json", tiny_config(steps=6, schedule_steps=4, checkpoint_every=6,
                                                            price_per_gpu_hour=3600.0))
    train_on_clock(more, data, out, FakeClock(step_seconds=1.0), monkeypatch)
    resumed = [r for r in read_metrics(out) if "loss" in r and r["step"] > 4]
    # float64 sums and seconds / 3600 * $3600: within a few ulp (approx's default rel 1e-6 is margin)
    assert [r["cost_usd"] for r in resumed] == pytest.approx([state["gpu_seconds"] + 1, state["gpu_seconds"] + 2])


def test_hellaswag_batched_scores_equal_one_by_one():
    """Many examples per forward (padded rows, a 3-ending example among 4-ending ones) score as the
    per-example code: the same acc and acc_norm counts, at any batch size and split over ranks."""
    from model.config import GPTConfig
    from model.eval import ending_logprobs, hellaswag_counts, hellaswag_scores

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)).eval()
    examples = [{"ctx": "The cat sat on the", "endings": ["mat.", "moon.", "idea.", "sky."], "label": 0},
                {"ctx": "She opened the", "endings": ["door slowly and looked.", "sing.", "blue.", "ran."], "label": 1},
                {"ctx": "Water is", "endings": ["wet.", "dry.", "loud, very loud and square."], "label": 2},
                {"ctx": "", "endings": ["a.", "b.", "c.", "d."], "label": 3},
                {"ctx": "A long context " * 30, "endings": ["ends here.", "or here.", "no.", "yes."], "label": 1}]
    correct = correct_norm = 0
    for e in examples:
        sums, counts = ending_logprobs(model, e, "cpu")
        correct += int(sums.argmax().item() == e["label"])
        correct_norm += int((sums / counts).argmax().item() == e["label"])
    for batch in (1, 2, 16):
        got = hellaswag_scores(model, examples, "cpu", batch=batch)
        assert (got["correct"], got["correct_norm"], got["n"]) == (correct, correct_norm, 5)
    parts = sum(hellaswag_counts(model, examples, "cpu", rank=r, world_size=2, batch=2) for r in (0, 1))
    assert parts.tolist() == [correct, correct_norm, 5]
    assert "_rendered" in examples[0]  # tokenized once, kept for the next evaluation


def test_checkpoint_hashes_while_writing(tmp_path):
    """The manifest's sizes and sha256 (computed as the files are written) are those of the files on disk."""
    from gpt2cloud.store.transfer import file_entry
    from model import checkpoint as ckpt

    model = GPT(tiny_config().model)
    opt = torch.optim.AdamW(model.parameters())
    path = ckpt.write_checkpoint(tmp_path, 3, model, {"optimizer": opt.state_dict()}, {"step": 3},
                                 [ckpt.rng_state(), ckpt.rng_state()], {"model": {}}, 2)
    files = ckpt.verify_checkpoint(path)["files"]
    assert [f["name"] for f in files] == sorted(p.name for p in path.iterdir() if p.name != "manifest.json")
    assert all(f == file_entry(path, f["name"]) for f in files)


@pytest.mark.slow
def test_gpu_check_dry_runs_end_to_end(tmp_path):
    """benchmarks/gpu_check.sh --dry: every part on CPU with tiny models (~15 s of CPU on 2 cores), each row printed
    and in the results file as it finishes, then the table; its AdamW rows are CPU stand-ins, never calibration."""
    import os
    import subprocess

    from trainer_helpers import REPO

    results = tmp_path / "out" / "results.jsonl"
    p = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry", "--results", str(results)], cwd=REPO,
                       capture_output=True, text=True, timeout=240, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    table = p.stdout.split("gpt2cloud GPU check: ", 1)[1]
    for row in ("device", "124M AdamW (gpt2-124m", "124M Muon (gpt2-124m-fast", "1558M AdamW (gpt2-1558m",
                "1558M Muon (gpt2-1558m-fast", "Muon step", "(est ", "HellaSwag", "checkpoint"):
        assert row in table, table
    assert "FAILED" not in p.stdout, p.stdout
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["part"] for r in rows] == ["info", "124m-adamw", "124m-muon", "1558m", "1558m-fast", "small"]
    assert all(r["dry"] for r in rows) and rows[2]["optimizer"] == "muon" and rows[2]["estimate"]["optimizer_ms"] > 0
    conv = subprocess.run([sys.executable, "benchmarks/gpu_results_to_calibration.py", str(results)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert conv.returncode == 1 and not conv.stdout and "a dry run on the CPU" in conv.stderr
    assert len(list(tmp_path.glob("gpu_check.*/*.log"))) == 1  # the work directory (its logs) is kept
