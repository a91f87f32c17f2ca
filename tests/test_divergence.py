"""The divergence guard end to end: a run whose loss goes non-finite (a huge lr) stops within a step or two,
writes no checkpoint of its bad weights, keeps its good ones, says so in one line and exits EXIT_DIVERGED
(65: not the 75 a spot job recovers from), on one rank, on two (both stop at the same step), and through
`gpt2cloud train`. A loss held above its bound stops it the same way, and a looser bound resumes it.

The guard's rules are tests/test_stop_policy.py's; the checkpoint side (non-finite weights refused,
rotation only after a newer one reads back) tests/test_checkpoint.py's.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from model import checkpoint as ckpt
from model.config import DIVERGED_MARKER, EXIT_DIVERGED
from trainer_helpers import REPO, TINY_RECIPE, env, make_shards, read_metrics, run_trainer, tiny_config, write_config

# A huge peak lr reached through a warmup: the first steps still leave finite weights (checkpointed), then
# the gradient norm overflows to inf (observed at step 4 on one rank: losses 5.5, 1.8e5, 7.2e6, 3.3e8), and
# the update it feeds makes the weights, and the next loss, NaN. The spike rule is off here (factor 0) so
# that the non-finite check is what stops the run.
HUGE = dict(lr=1e3, warmup_steps=10, loss_spike_factor=0.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("diverge") / "data")


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)  # metrics.jsonl holds a non-finite number as null


def _first_non_finite(records) -> int:
    """The first step whose loss or gradient norm is not finite."""
    return min(r["step"] for r in records if "loss" in r and not (_finite(r["loss"]) and _finite(r["grad_norm"])))


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


def _check_good_checkpoints(out, first_bad: int, keep: int) -> list[int]:
    """Every complete checkpoint is from before the first bad step, intact and finite; the newest `keep`
    of the steps before it are all there (checkpoint_every 1: none was rotated out by a bad one)."""
    steps = [s for s, _ in ckpt.local_checkpoints(out)]
    assert steps == list(range(first_bad - keep, first_bad)), steps
    for _, path in ckpt.local_checkpoints(out):
        ckpt.verify_checkpoint(path)
        assert all(torch.isfinite(v).all() for v in load_file(str(path / "model.safetensors")).values()), path
    return steps


@pytest.mark.parametrize("deferred", [False, True], ids=["reads-at-once", "reads-one-step-late"])
def test_a_huge_lr_run_stops_within_3_steps_of_its_first_nan_and_keeps_its_good_checkpoints(data, tmp_path,
                                                                                          monkeypatch, deferred):
    """One rank. Read at once (CPU) it stops at the bad step; one step late (CUDA's path) one step after."""
    if deferred:
        monkeypatch.setattr("trainer_helpers.env", lambda: {**env(), "GPT2CLOUD_DEFER_READS": "1"})
    config = write_config(tmp_path / "c.json", tiny_config(steps=40, checkpoint_every=1, keep_checkpoints=2,
                                                           val_every=1000, **HUGE))
    out = tmp_path / "out"
    p = run_trainer(config, data, out, None, check=False)
    assert p.returncode == EXIT_DIVERGED, p.stderr[-3000:]
    records = read_metrics(out)
    bad = _first_non_finite(records)
    assert bad >= 3  # good checkpoints came first: the test would prove nothing otherwise
    stop = records[-1]
    assert stop["event"] == "diverged" and stop["step"] == bad  # the first bad step is the one judged
    assert max(r["step"] for r in records if "loss" in r) == bad  # nothing logged after it
    (line,) = _error_lines(p.stderr)
    assert line.startswith("error: diverged: ") and f"at step {bad}" in line and "is kept" in line
    assert (out / DIVERGED_MARKER).read_text().strip() == line.removeprefix("error: ")
    _check_good_checkpoints(out, bad, keep=2)
    assert stop["checkpoint"].endswith(f"step_{bad - 1:06d}")


def test_two_ranks_stop_together_and_train_exits_65_in_one_line(data, tmp_path):
    """`gpt2cloud train --nproc 2`: both ranks stop at the same step (else one would wait in the next
    all-reduce until a timeout), the CLI shows the trainer's line without torchrun's traceback, exit 65."""
    recipe = tmp_path / "huge.yaml"
    recipe.write_text(TINY_RECIPE.replace("lr: 1.0e-2, min_lr_ratio: 0.1, warmup_steps: 2",
                                          "lr: 1.0e+3, min_lr_ratio: 0.1, warmup_steps: 10")
                      .replace("steps: 6,", "steps: 40,")
                      .replace("compile: false}", "compile: false, loss_spike_factor: 0}")
                      .replace("checkpoint_every: 3", "checkpoint_every: 1"))
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "gpt2cloud", "train", str(recipe), "--data", str(data), "--out",
                        str(out), "--nproc", "2"], cwd=REPO, env=env(), capture_output=True,
                       text=True, timeout=240)
    assert p.returncode == EXIT_DIVERGED, p.stdout[-2000:] + p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: diverged: "), p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    records = read_metrics(out)
    bad = _first_non_finite(records)
    assert [r["step"] for r in records if r.get("event") == "diverged"] == [bad]
    assert read_metrics(out)[0]["world_size"] == 2
    _check_good_checkpoints(out, bad, keep=2)


def test_a_loss_held_above_its_bound_stops_as_a_spike_and_a_looser_bound_resumes(data, tmp_path):
    """loss_spike_factor 1.001 for 1 step: the first step whose loss rises above its best stops the run (a
    noisy loss does within a few steps); the line says how to resume if it was a passing spike, and a
    resume with the guard's spike part off (a setting a resume may change) trains on from the kept
    checkpoint."""
    base = dict(steps=30, checkpoint_every=1, keep_checkpoints=2, val_every=1000, loss_spike_steps=1)
    strict = write_config(tmp_path / "strict.json", tiny_config(loss_spike_factor=1.001, **base))
    out = tmp_path / "out"
    p = run_trainer(strict, data, out, None, check=False)
    assert p.returncode == EXIT_DIVERGED, p.stderr[-3000:]
    stop = read_metrics(out)[-1]
    assert stop["event"] == "diverged" and stop["why"].startswith("loss above 1.001x its best")
    losses = {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}
    assert losses[stop["step"]] > 1.001 * min(v for s, v in losses.items() if s < stop["step"])
    (line,) = _error_lines(p.stderr)
    assert "resume with a higher loss_spike_factor" in line
    kept = [s for s, _ in ckpt.local_checkpoints(out)]
    assert kept and kept[-1] == stop["step"] - 1  # checkpoint_every 1: everything up to the spike
    loose = write_config(tmp_path / "loose.json", tiny_config(loss_spike_factor=0.0, **base))
    run_trainer(loose, data, out, None)
    again = read_metrics(out)
    assert again[-1]["event"] == "end" and again[-1]["step"] == 30
    assert [r["resumed_from"] for r in again if r.get("event") == "start"][-1] == kept[-1]
    assert not (out / DIVERGED_MARKER).exists()  # the resumed run's start cleared the old verdict
    assert json.loads((out / "checkpoints" / "step_000030" / "manifest.json").read_text())["step"] == 30


def test_a_node_whose_run_diverges_exits_65_which_spot_does_not_retry(data, tmp_path):
    """The node's run script: under torchrun the trainer's own code is lost, so the marker it leaves maps
    the job's exit to EXIT_DIVERGED, a code a managed job does not recover from."""
    from node_helpers import node_env, run_script, uploaded_data, workdir

    from gpt2cloud.launch import scripts
    from gpt2cloud.launch.task import JOB_RECOVERY

    run_dir = tmp_path / "bucket" / "r1"
    run_dir.mkdir(parents=True)
    cfg = tiny_config(steps=12, checkpoint_every=1, keep_checkpoints=2, **HUGE)
    wd = workdir(tmp_path, cfg.to_json())
    e = node_env(tmp_path, uploaded_data(tmp_path, data), run_dir.as_uri(), GPT2CLOUD_MASTER_PORT="29741")
    setup, _ = run_script(scripts.SETUP_SCRIPT, wd, e)
    assert setup.returncode == 0, setup.stdout + setup.stderr
    p, _ = run_script(scripts.RUN_SCRIPT, wd, e)
    log = p.stdout + p.stderr
    assert p.returncode == EXIT_DIVERGED, log[-3000:]
    assert "gpt2cloud: the run diverged (" in log and EXIT_DIVERGED not in JOB_RECOVERY["recover_on_exit_codes"]
    assert (tmp_path / "node" / "out" / DIVERGED_MARKER).is_file()
