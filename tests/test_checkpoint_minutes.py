"""checkpoint_minutes: the trainer checkpoints when that many minutes passed since its last checkpoint, so a
preemption loses at most that much at any model size; `train` and `launch` take --checkpoint-minutes, and
the estimate counts the extra checkpoints.

The timer's arithmetic is tests/test_stop_policy.py's; here it runs in the trainer (on a fake clock, and on
two real gloo ranks), reaches the CLI, and the bill.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from typer.testing import CliRunner

from gpt2cloud.cli import app
from gpt2cloud.cost.estimate import estimate
from gpt2cloud.cost.optimizers import checkpoint_bytes
from gpt2cloud.cost.phases import TIMER_MARGIN, checkpoint_count, checkpoint_seconds
from gpt2cloud.cost.recipes import known_recipes, load_recipe
from model.config import DEFAULT_CHECKPOINT_MINUTES, TrainConfig, resume_changes
from model.stop import MARGIN
from trainer_helpers import (TINY_RECIPE, FakeClock, losses, make_shards, read_metrics, run_trainer, tiny_config,
                             train_on_clock, write_config)

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("minutes") / "data")


def _checkpoint_steps(out) -> list[int]:
    return [r["step"] for r in read_metrics(out) if r.get("event") == "checkpoint"]


def test_a_checkpoint_every_m_minutes_between_step_checkpoints_and_each_resumes_exactly(data, tmp_path, monkeypatch):
    """Minute-long steps, checkpoint_minutes 3, checkpoint_every far away: a checkpoint at the check where the
    next step would pass 3 minutes (1.5x margin: every 2 steps), the last step's, and nothing in between.
    The estimate's count is the trainer's. A run resumed from a time-based checkpoint logs the same losses."""
    cfg = tiny_config(steps=10, checkpoint_every=10_000, checkpoint_minutes=3.0, keep_checkpoints=10)
    config = write_config(tmp_path / "c.json", cfg)
    out = tmp_path / "timed"
    train_on_clock(config, data, out, FakeClock(step_seconds=60.0), monkeypatch)
    assert _checkpoint_steps(out) == [2, 4, 6, 8, 10]  # never more than 3 minutes of work unsaved
    assert checkpoint_count(cfg, 60.0) == 5  # the bill counts what the trainer writes
    assert TIMER_MARGIN == MARGIN  # the bill's copy of the policy's margin (cost/ cannot import model.stop)
    # the time-based checkpoints are whole resume points: drop the newer ones, resume, same losses
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    for step in (8, 10):
        shutil.rmtree(resumed / "checkpoints" / f"step_{step:06d}")
    train_on_clock(config, data, resumed, FakeClock(step_seconds=60.0), monkeypatch)
    assert [r["resumed_from"] for r in read_metrics(resumed) if r.get("event") == "start"] == [None, 6]
    assert losses(resumed) == losses(out)  # one process, an exact resume: bitwise equal


def test_off_means_only_the_step_checkpoints(data, tmp_path, monkeypatch):
    config = write_config(tmp_path / "c.json", tiny_config(steps=10, checkpoint_every=5, checkpoint_minutes=0.0))
    out = tmp_path / "off"
    train_on_clock(config, data, out, FakeClock(step_seconds=3600.0), monkeypatch)  # an hour a step
    assert _checkpoint_steps(out) == [5, 10]


def test_two_ranks_agree_on_time_checkpoints_and_train_the_same(data, tmp_path):
    """Real clock, 2 gloo ranks, a timer of 0.12 s: rank 0 decides, both ranks checkpoint at the same
    steps (a disagreement would hang the gather or fail the run), and the losses are those of the same
    run without the timer."""
    base = dict(steps=24, checkpoint_every=1000, keep_checkpoints=30, val_every=1000)
    timed = write_config(tmp_path / "timed.json", tiny_config(checkpoint_minutes=0.002, **base))
    plain = write_config(tmp_path / "plain.json", tiny_config(checkpoint_minutes=0.0, **base))
    run_trainer(timed, data, tmp_path / "timed", 2)
    run_trainer(plain, data, tmp_path / "plain", 2)
    steps = _checkpoint_steps(tmp_path / "timed")
    assert steps[-1] == 24 and len(steps) >= 2, steps  # at least one time-based checkpoint before the last
    assert _checkpoint_steps(tmp_path / "plain") == [24]
    assert losses(tmp_path / "timed") == losses(tmp_path / "plain")  # checkpointing changes nothing trained


def test_checkpoint_minutes_may_change_on_resume_and_reaches_the_config():
    saved = dataclasses.asdict(TrainConfig(checkpoint_minutes=10.0))
    assert resume_changes(saved, TrainConfig(checkpoint_minutes=2.0)) == []
    older = {k: v for k, v in saved.items() if k != "checkpoint_minutes"}  # a checkpoint from before the field
    assert resume_changes(older, TrainConfig(checkpoint_minutes=2.0)) == []
    assert load_recipe("gpt2-124m").to_train_config().checkpoint_minutes == DEFAULT_CHECKPOINT_MINUTES
    assert load_recipe("gpt2-124m").to_train_config(checkpoint_minutes=3.0).checkpoint_minutes == 3.0


def test_launch_takes_checkpoint_minutes_into_config_and_estimate(tmp_path, monkeypatch):
    from gpt2cloud.launch.plan import plan

    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path))
    p = plan("gpt2-tiny", "CPU:2", infra="local", data="file:///tmp/d", bucket="file:///tmp/b", checkpoint_minutes=3)
    assert p.train_cfg.checkpoint_minutes == 3.0 and json.loads(p.job.config_json)["checkpoint_minutes"] == 3.0
    assert "or 3 min" in p.est.phase_sources["evals"]
    default = plan("gpt2-tiny", "CPU:2", infra="local", data="file:///tmp/d", bucket="file:///tmp/b")
    assert default.train_cfg.checkpoint_minutes == DEFAULT_CHECKPOINT_MINUTES
    off = plan("gpt2-tiny", "CPU:2", infra="local", data="file:///tmp/d", bucket="file:///tmp/b",
               checkpoint_minutes=0)  # 0 turns the timer off, as in a recipe
    assert off.train_cfg.checkpoint_minutes == 0


@pytest.mark.parametrize("command", ["launch", "train"])
@pytest.mark.parametrize("value", ["-1", "nan", "inf", "20000"])
def test_bad_checkpoint_minutes_is_one_line_exit_2(command, value, tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path / "g2"))
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    args = {"launch": ["launch", "gpt2-tiny", "--infra", "local", "--gpus", "CPU:2", "--data", "file:///d",
                       "--bucket", "file:///b", "--yes"],
            "train": ["train", str(recipe), "--data", str(make_shards(tmp_path / "d")), "--out", str(tmp_path / "o")]}
    r = CliRunner().invoke(app, [*args[command], "--checkpoint-minutes", value])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --checkpoint-minutes"), r.stderr
    assert not (tmp_path / "o").exists()


def test_a_recipe_with_a_bad_checkpoint_minutes_is_refused_in_one_line(tmp_path):
    for bad in ("-5", ".nan", "20000"):
        path = tmp_path / "r.yaml"
        path.write_text(TINY_RECIPE.replace("checkpoint_every: 3,", f"checkpoint_every: 3, checkpoint_minutes: {bad},"))
        r = CliRunner().invoke(app, ["estimate", str(path)])
        assert r.exit_code == 2 and "eval.checkpoint_minutes" in r.stderr, r.stderr


# ---- the bill ----


def test_the_estimate_counts_the_extra_checkpoints_and_bounds_the_redo(monkeypatch, tmp_path):
    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path))  # no user calibration
    recipe = load_recipe("gpt2-1558m")
    timed = estimate(recipe, gpu_type="H100", gpus_per_node=8, price=3.0, spot=True)
    off = estimate(recipe, gpu_type="H100", gpus_per_node=8, price=3.0, spot=True, checkpoint_minutes=0.0)
    cfg = recipe.to_train_config()
    extra = checkpoint_count(cfg, timed.step_seconds) - checkpoint_count(dataclasses.replace(cfg, checkpoint_minutes=0),
                                                                          timed.step_seconds)
    # ~2.8 s steps: 1,000 steps are 47 min, so 5 checkpoints per 1,000 steps instead of 1
    assert extra == 32 * 4
    per_checkpoint_h = checkpoint_bytes(cfg.model, cfg.optimizer) / 1e9 / 3600  # at 1 GB/s
    assert timed.breakdown_hours["evals"] - off.breakdown_hours["evals"] == pytest.approx(extra * per_checkpoint_h)
    assert "161 checkpoints" in timed.phase_sources["evals"] and "or 10 min" in timed.phase_sources["evals"]
    # a preemption redoes half the interval between checkpoints: 10 min bounds it instead of 47
    assert timed.breakdown_hours["recovery"] < off.breakdown_hours["recovery"]


@pytest.mark.parametrize("name", known_recipes())
@pytest.mark.parametrize("gpus", [("H100", 8), ("H100", 1)])
def test_a_preemption_loses_at_most_the_default_minutes_at_any_size(name, gpus, monkeypatch, tmp_path):
    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path))
    recipe = load_recipe(name)
    est = estimate(recipe, gpu_type=gpus[0], gpus_per_node=gpus[1], check_batch=False, side_by_side=False)
    assert checkpoint_seconds(recipe.to_train_config(), est.step_seconds) <= DEFAULT_CHECKPOINT_MINUTES * 60
