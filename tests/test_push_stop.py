"""On a node, pushes to the bucket that keep failing for longer than the checkpoint interval stop the
trainer with a checkpoint rather than let it train on work that exists only on the node.

The pusher is faked: its status file (model/pushstate.py, what model/sync.py writes after every push) is
written from inside the training loop at chosen steps, on a fake clock where each step takes a minute.
The rule's arithmetic is tests/test_stop_policy.py's.
"""

from __future__ import annotations

import pytest

from model import pushstate
from trainer_helpers import FakeClock, train_on_clock, make_shards, read_metrics, tiny_config, write_config



@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("push") / "data")


def _train_with_pusher(tmp_path, data, monkeypatch, pushes: dict, node: bool = True, before=None):
    """10 one-minute steps, checkpoint_minutes 3, no step checkpoints before the end. `pushes`: step -> the
    push attempt the fake pusher records once that step has run (True: it worked, else its error; a step
    not listed repeats the last outcome, True before the first);
    before(out, clock): what OUT holds before the trainer starts."""
    clock = FakeClock(step_seconds=60.0)
    out = tmp_path / "out"
    out.mkdir()
    if before is not None:
        before(out, clock)
    config = write_config(tmp_path / "c.json", tiny_config(steps=10, checkpoint_every=1000, checkpoint_minutes=3.0,
                                                           keep_checkpoints=10, val_every=1000))
    counter = {"step": 0, "last": True}

    def push():  # a real pusher records an attempt every interval: the listed outcome, else the last one again
        counter["step"] += 1
        outcome = counter["last"] = pushes.get(counter["step"], counter["last"])
        pushstate.record(out, outcome is True, 60.0, "" if outcome is True else outcome, now=clock.now)

    train_on_clock(config, data, out, clock, monkeypatch, after_step=push, node_up=clock.now if node else None)
    return out, read_metrics(out)


def test_pushes_failing_past_the_interval_stop_with_a_checkpoint(tmp_path, data, monkeypatch, capsys):
    # pushes work, then fail from step 4 on: at the check before step 7, 2 minutes of failures + a 1.5-minute
    # step would pass the 3-minute interval
    out, records = _train_with_pusher(tmp_path, data, monkeypatch, {2: True, 4: "bucket unreachable", 5: "again"})
    stop = records[-1]
    assert stop["event"] == "push_stop" and stop["step"] == 6 and stop["last_error"] == "again"
    assert stop["push_failing_seconds"] == pytest.approx(120.0)
    assert max(r["step"] for r in records if "loss" in r) == 6  # not one step trained on unsaved work
    assert (out / "checkpoints" / "step_000006" / "manifest.json").exists()  # the stop's checkpoint
    assert not any(r.get("event") == "end" for r in records)
    log = capsys.readouterr().out
    assert "push: stopping at step 6 with a checkpoint" in log and "last error: again" in log


def test_pushes_that_recover_stop_nothing(tmp_path, data, monkeypatch):
    out, records = _train_with_pusher(tmp_path, data, monkeypatch, {4: "bucket unreachable", 5: True})
    assert records[-1]["event"] == "end" and records[-1]["step"] == 10
    assert not any(r.get("event") == "push_stop" for r in records)


def test_a_local_run_has_no_pusher_and_no_push_rule(tmp_path, data, monkeypatch):
    """The same failing status in OUT, without a node: `gpt2cloud train` runs no pusher, the rule is off."""
    out, records = _train_with_pusher(tmp_path, data, monkeypatch, {1: "bucket unreachable"}, node=False)
    assert records[-1]["event"] == "end" and records[-1]["step"] == 10


def test_a_status_an_earlier_job_left_counts_only_once_this_pusher_writes(tmp_path, data, monkeypatch):
    """A relaunch on the same cluster finds the last job's status in OUT: failing for two hours, written before
    this trainer started. Read as this run's it would stop the run at step 2; it stops nothing until this
    node's pusher records an attempt of its own, and then counts from this trainer's start."""
    def stale(out, clock):
        pushstate.record(out, False, 60.0, "the last job's", now=clock.now - 7200)

    out, records = _train_with_pusher(tmp_path, data, monkeypatch, {}, before=stale)
    assert records[-1]["event"] == "end" and records[-1]["step"] == 10
    again = tmp_path / "again"
    again.mkdir()
    out, records = _train_with_pusher(again, data, monkeypatch, {1: "still unreachable"}, before=stale)
    # failing since the last job's time, counted from this trainer's start: 2 min + a 1.5-minute step > 3 min
    assert records[-1]["event"] == "push_stop" and records[-1]["step"] == 2
    assert records[-1]["push_failing_seconds"] == pytest.approx(120.0)


def test_a_pusher_that_never_writes_or_goes_quiet_counts_as_failing(tmp_path, data, monkeypatch):
    """A pusher that died at its start (no status from this job) or hangs (its status stops moving) saves
    nothing either: the same stop, with a checkpoint."""
    monkeypatch.setattr(pushstate, "record", lambda *a, **k: None)  # the pusher never started
    out, records = _train_with_pusher(tmp_path, data, monkeypatch, {})
    assert records[-1]["event"] == "push_stop" and records[-1]["step"] == 2
    # it pushed once, after step 1, then hangs: quiet for longer than its 60 s interval from then on
    monkeypatch.undo()
    real_record, calls = pushstate.record, []

    def only_once(*args, **kwargs):
        calls.append(1)
        return real_record(*args, **kwargs) if len(calls) == 1 else None

    monkeypatch.setattr(pushstate, "record", only_once)
    quiet = tmp_path / "quiet"
    quiet.mkdir()
    out, records = _train_with_pusher(quiet, data, monkeypatch, {})
    assert records[-1]["event"] == "push_stop" and 3 <= records[-1]["step"] <= 4
