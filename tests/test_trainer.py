"""model/train.py end to end on CPU: real torchrun with gloo, a tiny model with a 256-token vocabulary.

The reference runs (1 process with gradient accumulation 2; 2 DDP ranks) are made once per module;
the other tests compare against them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest
from safetensors.torch import load_file

from gpt2cloud.processes import kill_process_tree
from trainer_helpers import (REPO, env, losses, make_shards, read_metrics, run_trainer, tiny_config, trainer_cmd,
                             write_config)

STEPS = 120  # ~2 s; long enough that a kill after step 25 lands well before the end


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    data = make_shards(root / "data")
    config = write_config(root / "config.json", tiny_config(steps=STEPS, val_every=10, checkpoint_every=10,
                                                            keep_checkpoints=3))
    run_trainer(config, data, root / "one", None)  # 1 process: 256 tokens/step = 2 micro-steps of 4 x 32
    run_trainer(config, data, root / "two", 2)  # 2 ranks x 1 micro-step
    return {"root": root, "data": data, "config": config, "one": root / "one", "two": root / "two"}


def _weights(out, step=STEPS):
    return load_file(str(out / "checkpoints" / f"step_{step:06d}" / "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_ranks_equal_one_rank_with_accumulation(runs):
    one, two = losses(runs["one"]), losses(runs["two"])
    assert sorted(one) == list(range(1, STEPS + 1))
    assert max(abs(one[s] - two[s]) for s in one) < 1e-5
    assert _max_diff(_weights(runs["one"]), _weights(runs["two"])) < 1e-5
    assert one[STEPS] < one[1] - 1.0  # it learns the repeating pattern
    # validation reads the same batches on 1 and 2 ranks, so val loss is comparable too
    val_one, val_two = ({r["step"]: r["val_loss"] for r in read_metrics(runs[k]) if "val_loss" in r} for k in ("one", "two"))
    assert val_one.keys() == val_two.keys() and len(val_one) == STEPS // 10
    assert max(abs(val_one[s] - val_two[s]) for s in val_one) < 1e-5


def test_metrics_and_checkpoints_written(runs):
    records = read_metrics(runs["two"])
    start, end = records[0], records[-1]
    assert start["event"] == "start" and start["world_size"] == 2 and start["resumed_from"] is None
    assert start["config"]["tokens_per_step"] == 256 and start["grad_accum"] == 1
    assert end == {"event": "end", "step": STEPS, "final_loss": losses(runs["two"])[STEPS]}
    step = next(r for r in records if r.get("step") == 3 and "loss" in r)
    assert set(step) == {"step", "loss", "lr", "grad_norm", "step_seconds", "tokens_per_second", "mfu",
                         "tokens_seen", "elapsed_seconds"}
    assert step["tokens_seen"] == 3 * 256 and step["mfu"] is None  # no peak FLOPS given, no price
    assert [r["step"] for r in records if "val_loss" in r] == list(range(10, STEPS + 1, 10))
    assert not any("sample" in r for r in records)  # vocabulary 256: no GPT-2 text to sample
    ckpts = sorted(p.name for p in (runs["two"] / "checkpoints").iterdir())
    assert ckpts == ["step_000100", "step_000110", "step_000120"]  # keep_checkpoints 3
    final = runs["two"] / "checkpoints" / "step_000120"
    assert {"rng_rank0.pt", "rng_rank1.pt", "manifest.json"} <= {p.name for p in final.iterdir()}
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["step"] == STEPS and state["data"]["shard"].startswith("tiny_train_")


def test_sigkill_midway_then_resume_is_exact(runs):
    out = runs["root"] / "killed"
    proc = subprocess.Popen(trainer_cmd(runs["config"], runs["data"], out, 2), cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and any('"step": 25,' in line for line in metrics.read_text().splitlines()):
                break
            time.sleep(0.02)
    finally:
        kill_process_tree(proc.pid)  # SIGKILL: torchrun and both workers (they have sessions of their own)
    proc.wait()
    records = read_metrics(out)
    assert not any(r.get("event") == "end" for r in records), "the run finished before it was killed"
    killed_at = max(r["step"] for r in records if "loss" in r)
    assert 25 <= killed_at < STEPS

    run_trainer(runs["config"], runs["data"], out, 2, "--resume", "auto")
    starts = [r for r in read_metrics(out) if r.get("event") == "start"]
    assert [s["resumed_from"] for s in starts] == [None, killed_at // 10 * 10]  # never again from step 1
    reference, resumed = losses(runs["two"]), losses(out)  # losses() also asserts no step is logged twice
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert max(abs(reference[s] - resumed[s]) for s in reference) < 1e-5
    assert _max_diff(_weights(runs["two"]), _weights(out)) < 1e-5


def test_resume_on_another_world_size(runs):
    """A checkpoint of the 1-process run, continued on 2 ranks, follows the 1-process run exactly."""
    out = runs["root"] / "regrown"
    shutil.copytree(runs["one"], out)
    for step in (110, 120):
        shutil.rmtree(out / "checkpoints" / f"step_{step:06d}")
    p = run_trainer(runs["config"], runs["data"], out, 2)
    assert "written by 1 ranks, this run has 2" in p.stdout
    reference, resumed = losses(runs["one"]), losses(out)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert max(abs(reference[s] - resumed[s]) for s in range(101, STEPS + 1)) < 1e-5
    assert _max_diff(_weights(runs["one"]), _weights(out)) < 1e-5


def test_budget_cap_stops_with_a_checkpoint(runs):
    out = runs["root"] / "budget"
    # $1 per second of one process: the $6 cap is reached after ~6 s (start-up included: 1.5-3 s) of a run
    # that would take hours
    cap = 6.0
    config = write_config(runs["root"] / "budget.json",
                          tiny_config(steps=1_000_000, price_per_gpu_hour=3600.0, max_cost_usd=cap,
                                      checkpoint_every=10_000))
    run_trainer(config, runs["data"], out, None)
    records = read_metrics(out)
    stop = records[-1]
    steps = [r for r in records if "loss" in r]
    assert stop["event"] == "budget_stop" and stop["step"] == steps[-1]["step"] >= 1
    # stopped near the cap, not before it and not long after (slack: a step slower than the one before it
    # on a busy machine, and the final checkpoint)
    assert cap - 1.0 < steps[-1]["cost_usd"] <= cap + 0.5
    assert stop["cost_usd"] <= cap + 1.0
    assert (out / "checkpoints" / f"step_{stop['step']:06d}" / "manifest.json").exists()
    assert not any(r.get("event") == "end" for r in records)

    # the resumed run counts the first run's time: the budget is already spent, so no new step
    run_trainer(config, runs["data"], out, None)
    again = read_metrics(out)
    assert again[-1]["event"] == "budget_stop" and again[-1]["step"] == stop["step"]
    assert [r["step"] for r in again if "loss" in r] == [r["step"] for r in steps]


def test_resume_never_refuses_an_existing_run(runs):
    p = run_trainer(runs["config"], runs["data"], runs["one"], None, "--resume", "never", check=False)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("error: ") and "--resume auto" in p.stderr


def test_corrupt_newest_checkpoint_is_refused_by_name(runs):
    out = runs["root"] / "corrupt"
    shutil.copytree(runs["one"], out)
    bad = out / "checkpoints" / "step_000120" / "optimizer.pt"
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    p = run_trainer(runs["config"], runs["data"], out, None, "--steps", str(STEPS + 10), check=False)
    assert p.returncode == 2
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(bad) in last and "sha256" in last and "delete" in last


def test_full_vocabulary_run_samples_and_scores_hellaswag(runs, tmp_path):
    """With GPT-2's vocabulary the trainer also writes text samples and HellaSwag scores."""
    from model.config import GPTConfig

    examples = [{"ctx": "The cat sat on the", "endings": ["mat.", "moon.", "idea.", "sky."], "label": 0},
                {"ctx": "She opened the", "endings": ["door.", "sing.", "blue.", "ran."], "label": 0},
                {"ctx": "Water is", "endings": ["wet.", "dry.", "loud.", "square."], "label": 0}]
    data = tmp_path / "data"
    shutil.copytree(runs["data"], data)
    (data / "hellaswag_val.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    config = write_config(tmp_path / "full.json", tiny_config(
        model=GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32), steps=2, val_every=2, sample_every=2,
        sample_tokens=4, checkpoint_every=2, hellaswag_every=2, sample_prompt="Once upon a time"))
    run_trainer(config, data, tmp_path / "out", None)
    records = read_metrics(tmp_path / "out")
    (sample,) = [r for r in records if "sample" in r]
    assert sample["step"] == 2 and sample["sample"].startswith("Once upon a time")
    (hs,) = [r for r in records if "hellaswag_acc_norm" in r]
    assert hs["step"] == 2 and hs["hellaswag_n"] == 3 and 0 <= hs["hellaswag_acc_norm"] <= 1
