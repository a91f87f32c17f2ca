"""model/trackers.py: metrics.jsonl always, plus every tracker the config names; a failing or hung tracker is
dropped with a note and never stops or holds the run; the tracker run id lives in the checkpoint.

These use a recording tracker registered for the test (no tracker package needed); the real TensorBoard,
wandb and Trackio sinks are tests/test_tracker_sinks.py's."""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import time

import pytest
from trainer_helpers import make_shards, tiny_config, write_config

from model import trackers
from model.config import TrainConfig
from model.startup import TrainError, load_config


class Recorder:
    def __init__(self, cfg, out, run, fail_on=None, gate=None):
        self.run, self.records, self.closed, self.fail_on, self.gate = run, [], False, fail_on, gate

    def write(self, record):
        if self.gate is not None:
            self.gate.wait()  # a client that hangs until the test lets it go
        if self.fail_on is not None and record.get("step") == self.fail_on:
            raise ConnectionError("the tracker's server went away")
        self.records.append(record)

    def close(self):
        self.closed = True


@pytest.fixture
def registry(monkeypatch):
    made = {}

    def register(name, **kw):
        def make(cfg, out, run):
            made.setdefault("all", []).append(Recorder(cfg, out, run, **kw))
            return made["all"][-1]
        monkeypatch.setitem(trackers.TRACKERS, name, trackers.Tracker(make))

    register("rec")
    register("flaky", fail_on=2)
    made["register"] = register
    return made


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_every_line_goes_to_the_jsonl_and_to_each_tracker(tmp_path, registry):
    m = trackers.Metrics(tmp_path / "metrics.jsonl", True, TrainConfig(trackers=["rec"]), tmp_path)
    for step in (1, 2):
        m.write({"step": step, "loss": 5.0 - step})
    assert m.close() is True
    (rec,) = registry["all"]
    assert [r["step"] for r in rec.records] == [1, 2] and rec.closed
    assert [r["loss"] for r in lines(tmp_path / "metrics.jsonl")] == [4.0, 3.0]


def test_a_failing_tracker_is_dropped_and_training_goes_on(tmp_path, registry, capsys):
    m = trackers.Metrics(tmp_path / "metrics.jsonl", True, TrainConfig(trackers=["flaky", "rec"]), tmp_path)
    for step in (1, 2, 3):
        m.write({"step": step})
    m.close()
    flaky, rec = sorted(registry["all"], key=lambda r: r.fail_on is None)
    assert [r["step"] for r in flaky.records] == [1] and flaky.closed  # dropped at step 2, and still closed
    assert [r["step"] for r in rec.records] == [1, 2, 3] and rec.closed
    assert [r["step"] for r in lines(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    err = capsys.readouterr().err
    assert err.count("tracker flaky failed (ConnectionError") == 1  # noted once


def test_only_rank_0_writes_and_an_unknown_tracker_is_refused_on_every_rank(tmp_path, registry):
    m = trackers.Metrics(tmp_path / "metrics.jsonl", False, TrainConfig(trackers=["rec"]), tmp_path)
    m.write({"step": 1})
    m.close()
    assert "all" not in registry and not (tmp_path / "metrics.jsonl").exists()
    # the config's names are checked when it is loaded, on every rank, before OUT is touched
    config = tmp_path / "config.json"
    config.write_text(TrainConfig(trackers=["rec", "nope"]).to_json())
    args = argparse.Namespace(config=str(config), schedule_steps=None, steps=None)
    with pytest.raises(TrainError, match="tracker nope: not a tracker the trainer knows"):
        load_config(args)
    config.write_text(TrainConfig(trackers=["rec"]).to_json())
    assert load_config(args).trackers == ["rec"]


def test_a_tracker_that_cannot_start_is_dropped(tmp_path, monkeypatch, capsys):
    def broken(cfg, out, run):
        raise PermissionError("not logged in")

    monkeypatch.setitem(trackers.TRACKERS, "broken", trackers.Tracker(broken))
    m = trackers.Metrics(tmp_path / "metrics.jsonl", True, TrainConfig(trackers=["broken"]), tmp_path)
    m.write({"step": 1})
    assert m.close() is True  # nothing was made: nothing to close
    assert m.trackers == {} and [r["step"] for r in lines(tmp_path / "metrics.jsonl")] == [1]
    assert "tracker broken failed (PermissionError: not logged in)" in capsys.readouterr().err


def test_a_hung_tracker_never_holds_a_step_and_is_dropped_when_far_behind(tmp_path, registry, monkeypatch,
                                                                           capsys):
    gate = threading.Event()
    registry["register"]("hung", gate=gate)
    monkeypatch.setattr(trackers, "QUEUE_RECORDS", 3)
    monkeypatch.setattr(trackers, "CLOSE_SECONDS", 0.2)
    m = trackers.Metrics(tmp_path / "metrics.jsonl", True, TrainConfig(trackers=["hung", "rec"]), tmp_path)
    hung = m.trackers["hung"]
    writing = 0.0
    for step in range(1, 11):  # the hung client takes the first record and blocks on it until the test's end
        t0 = time.monotonic()
        m.write({"step": step})
        writing += time.monotonic() - t0
        rec_feed, deadline = m.trackers["rec"], time.monotonic() + 10
        while rec_feed.queue.qsize() and time.monotonic() < deadline:  # a client that keeps up stays
            time.sleep(0.001)
    assert writing < 2.0  # the writes only enqueue: none waits for the client that hangs for good
    assert "hung" not in m.trackers and "rec" in m.trackers
    assert m.close() is False  # the hung client is still in its write: not closed
    gate.set()  # the client comes back: its thread closes it (it was dropped) and ends
    hung.thread.join(5)
    rec = next(r for r in registry["all"] if r.gate is None)
    assert [r["step"] for r in rec.records] == list(range(1, 11)) and rec.closed
    assert next(r for r in registry["all"] if r.gate is gate).closed and hung.closed
    assert len(lines(tmp_path / "metrics.jsonl")) == 10
    assert "tracker hung fell 3 records behind" in capsys.readouterr().err


def test_a_tracker_slow_to_close_is_waited_for_a_bounded_time(tmp_path, registry, monkeypatch, capsys):
    gate = threading.Event()
    registry["register"]("slow", gate=gate)
    monkeypatch.setattr(trackers, "CLOSE_SECONDS", 0.3)
    m = trackers.Metrics(tmp_path / "metrics.jsonl", True, TrainConfig(trackers=["slow"]), tmp_path)
    m.write({"step": 1})
    t0 = time.monotonic()
    assert m.close() is False
    assert 0.25 < time.monotonic() - t0 < 2.0
    gate.set()
    assert "tracker slow did not finish within 0.3 s" in capsys.readouterr().err


def test_what_a_tracker_charts_of_each_line():
    step, values, sample = trackers.chart_points(
        {"step": 7, "loss": 3.5, "lr": 6e-4, "grad_norm": 1.2, "tokens_per_second": 1e6, "mfu": None,
         "cost_usd": 1.25, "step_seconds": 0.5, "tokens_seen": 100, "elapsed_seconds": 9.0})
    assert step == 7 and sample is None
    assert values == {"train/loss": 3.5, "train/lr": 6e-4, "train/grad_norm": 1.2, "perf/tokens_per_second": 1e6,
                      "cost/usd": 1.25, "perf/step_seconds": 0.5, "train/tokens_seen": 100.0,
                      "perf/elapsed_seconds": 9.0}  # an unknown MFU (None) is not charted
    assert trackers.chart_points({"step": 8, "val_loss": 3.1, "seconds": 2.0})[1] == {"val/loss": 3.1}
    assert trackers.chart_points({"step": 8, "hellaswag_acc_norm": 0.3, "hellaswag_acc": 0.29, "hellaswag_n": 10}
                                 )[1] == {"eval/hellaswag_acc_norm": 0.3, "eval/hellaswag_acc": 0.29}
    assert trackers.chart_points({"step": 8, "sample": "Hello"}) == (8, {}, "Hello")
    for event in ({"event": "start", "config": {}}, {"event": "budget_stop", "step": 9, "cost_usd": 2.0}):
        assert trackers.chart_points(event) == (None, {}, None)


def test_names_a_launch_or_train_refuses_in_one_line(monkeypatch):
    assert trackers.refusal(["tensorboard", "wandb", "trackio"], "--tracker") is None
    assert trackers.refusal(["tensorboard", "nope"], "--tracker") == (
        "--tracker nope: not a tracker the trainer knows (known: tensorboard, wandb, trackio)")
    monkeypatch.setitem(trackers.TRACKERS, "absent", trackers.Tracker(None, requirement="absent-pkg",
                                                                       module="no_such_module_here"))
    assert trackers.refusal(["absent"], "--tracker") is None  # a node installs it
    assert trackers.refusal(["absent"], "--tracker", here=True) == (
        "--tracker absent: the trainer runs on this machine and no_such_module_here is not installed here; "
        "pip install 'gpt2cloud[absent]' (or absent-pkg)")


# ---- through the real trainer (in this process) ----


@pytest.fixture
def data(tmp_path):
    return make_shards(tmp_path / "data")


def _train(config, data, out, *extra):
    from model import train

    train.main(["--config", str(config), "--data", str(data), "--out", str(out), *extra])


def test_the_tracker_run_id_survives_a_resume_through_a_real_checkpoint(tmp_path, data, registry):
    out = tmp_path / "out"
    config = write_config(tmp_path / "config.json", tiny_config(steps=6, checkpoint_every=4, val_every=100,
                                                                 sample_every=100, trackers=["rec"]))
    _train(config, data, out)
    first = registry["all"][-1]
    state = json.loads((out / "checkpoints" / "step_000004" / "trainer_state.json").read_text())
    assert state["tracker_run_id"] == first.run.id and first.run.resumed_step is None
    assert json.loads((out / "checkpoints" / "step_000006" / "trainer_state.json").read_text()
                      )["tracker_run_id"] == first.run.id
    # killed after step 6 was logged but before its checkpoint: the resume redoes 5 and 6 in the same run
    shutil.rmtree(out / "checkpoints" / "step_000006")
    _train(config, data, out, "--steps", "8")
    second = registry["all"][-1]
    assert second is not first and second.run.id == first.run.id and second.run.resumed_step == 4
    assert [r["step"] for r in second.records if "loss" in r] == [5, 6, 7, 8]
    assert json.loads((out / "checkpoints" / "step_000008" / "trainer_state.json").read_text()
                      )["tracker_run_id"] == first.run.id
    # a new run (another OUT) is another tracker run
    _train(config, data, tmp_path / "other", "--steps", "1")
    assert registry["all"][-1].run.id != first.run.id


def test_a_tracker_failing_mid_run_does_not_fail_the_run(tmp_path, data, registry, capsys):
    out = tmp_path / "out"
    config = write_config(tmp_path / "config.json", tiny_config(steps=4, val_every=100, sample_every=100,
                                                                 trackers=["flaky"]))
    _train(config, data, out)  # returns: no exit, no exception
    assert [r["step"] for r in lines(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]
    assert lines(out / "metrics.jsonl")[-1]["event"] == "end"
    assert "tracker flaky failed (ConnectionError" in capsys.readouterr().err


def test_a_run_that_fails_midway_still_closes_its_trackers(tmp_path, data, registry, monkeypatch):
    from model import train

    def broken(t):  # a bug, a CUDA error: anything but a divergence
        t.metrics.write({"step": 1, "loss": 5.0})
        raise RuntimeError("boom")

    monkeypatch.setattr(train, "train_loop", broken)
    config = write_config(tmp_path / "config.json", tiny_config(steps=4, trackers=["rec", "flaky"]))
    with pytest.raises(RuntimeError, match="boom"):
        _train(config, data, tmp_path / "out")
    assert all(r.closed for r in registry["all"]) and len(registry["all"]) == 2


# ---- a tracker whose client holds the exit: the trainer ends the process itself ----

# A sink that hangs as a client can: its close never returns (wandb's finish, Trackio's), it leaves a thread
# that never ends (interpreter shutdown joins it) and an atexit hook that never returns (wandb's joins its
# service process without a timeout). Registered, with a 1 s close bound, in a trainer process of its own.
HANGING_TRAINER = """
import atexit, sys, threading, time
from model import trackers, train

class Hangs:
    def __init__(self, cfg, out, run):
        atexit.register(time.sleep, 600)
        threading.Thread(target=time.sleep, args=(600,), name="client").start()
    def write(self, record):
        pass
    def close(self):
        time.sleep(600)

trackers.CLOSE_SECONDS = 1.0
trackers.TRACKERS["hangs"] = trackers.Tracker(Hangs)
train.main(sys.argv[1:])
"""


@pytest.mark.parametrize("how, code", [("finished", 0), ("diverged", 65)])
def test_a_tracker_that_hangs_at_the_end_never_holds_the_trainers_exit(tmp_path, data, how, code):
    import subprocess
    import sys

    from trainer_helpers import REPO, env

    bad = dict(lr=1e3, warmup_steps=10, loss_spike_factor=0.0) if how == "diverged" else {}  # test_divergence's
    config = write_config(tmp_path / "config.json", tiny_config(steps=20 if bad else 4, val_every=100,
                                                                 sample_every=100, trackers=["hangs"], **bad))
    out = tmp_path / "out"
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", HANGING_TRAINER, "--config", str(config), "--data", str(data),
                        "--out", str(out)], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    took = time.monotonic() - t0
    assert p.returncode == code, p.stderr[-3000:]
    assert took < 60, took  # the run, its 1 s close bound and slack: not the client's 600 s
    assert "tracker hangs did not finish within 1 s" in p.stderr
    assert f"the trainer exits ({code}) without waiting for it" in p.stderr
    assert lines(out / "metrics.jsonl")[-1]["event"] == ("end" if code == 0 else "diverged")
    if code:
        assert "error: diverged:" in p.stderr  # its one line came out before the exit
