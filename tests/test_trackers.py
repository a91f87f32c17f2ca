"""model/trackers.py: metrics.jsonl always, plus every tracker the config names; a failing tracker is
dropped with a note and never stops the run."""

from __future__ import annotations

import argparse
import json

import pytest

from model import trackers
from model.config import TrainConfig
from model.startup import TrainError, load_config


class Recorder:
    def __init__(self, cfg, out, fail_on=None):
        self.records, self.closed, self.fail_on = [], False, fail_on

    def write(self, record):
        if record.get("step") == self.fail_on:
            raise ConnectionError("the tracker's server went away")
        self.records.append(record)

    def close(self):
        self.closed = True


@pytest.fixture
def registry(monkeypatch):
    made = {}

    def factory(fail_on=None):
        def make(cfg, out):
            made.setdefault("all", []).append(Recorder(cfg, out, fail_on))
            return made["all"][-1]
        return make

    monkeypatch.setitem(trackers.TRACKERS, "rec", factory())
    monkeypatch.setitem(trackers.TRACKERS, "flaky", factory(fail_on=2))
    return made


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_every_line_goes_to_the_jsonl_and_to_each_tracker(tmp_path, registry):
    m = trackers.Metrics(tmp_path / "metrics.jsonl", True, TrainConfig(trackers=["rec"]), tmp_path)
    for step in (1, 2):
        m.write({"step": step, "loss": 5.0 - step})
    m.close()
    (rec,) = registry["all"]
    assert [r["step"] for r in rec.records] == [1, 2] and rec.closed
    assert [r["loss"] for r in lines(tmp_path / "metrics.jsonl")] == [4.0, 3.0]


def test_a_failing_tracker_is_dropped_and_training_goes_on(tmp_path, registry, capsys):
    m = trackers.Metrics(tmp_path / "metrics.jsonl", True, TrainConfig(trackers=["flaky", "rec"]), tmp_path)
    for step in (1, 2, 3):
        m.write({"step": step})
    m.close()
    flaky, rec = registry["all"]
    assert [r["step"] for r in flaky.records] == [1] and not flaky.closed  # dropped at step 2
    assert [r["step"] for r in rec.records] == [1, 2, 3]
    assert [r["step"] for r in lines(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert "tracker flaky failed (ConnectionError" in capsys.readouterr().err


def test_only_rank_0_writes_and_an_unknown_tracker_is_refused_on_every_rank(tmp_path, registry):
    m = trackers.Metrics(tmp_path / "metrics.jsonl", False, TrainConfig(trackers=["rec"]), tmp_path)
    m.write({"step": 1})
    m.close()
    assert "all" not in registry and not (tmp_path / "metrics.jsonl").exists()
    # the config's names are checked when it is loaded, on every rank, before OUT is touched
    config = tmp_path / "config.json"
    config.write_text(TrainConfig(trackers=["rec", "nope"]).to_json())
    args = argparse.Namespace(config=str(config), schedule_steps=None, steps=None)
    with pytest.raises(TrainError, match="unknown tracker 'nope'"):
        load_config(args)
    config.write_text(TrainConfig(trackers=["rec"]).to_json())
    assert load_config(args).trackers == ["rec"]


def test_a_tracker_that_cannot_start_is_dropped(tmp_path, monkeypatch, capsys):
    def broken(cfg, out):
        raise PermissionError("not logged in")

    monkeypatch.setitem(trackers.TRACKERS, "broken", broken)
    m = trackers.Metrics(tmp_path / "metrics.jsonl", True, TrainConfig(trackers=["broken"]), tmp_path)
    m.write({"step": 1})
    m.close()
    assert m.trackers == {} and [r["step"] for r in lines(tmp_path / "metrics.jsonl")] == [1]
    assert "tracker broken failed (PermissionError: not logged in)" in capsys.readouterr().err
