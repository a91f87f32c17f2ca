"""`gpt2cloud down RUN --graceful` (issue 22, part 10), the parts that need neither SkyPilot nor a trainer:

- the node's pusher (`python -m model.sync push`, as the run script starts it) turns a stop request in the
  run's bucket into OUT/stop_requested, the marker the trainer's stop rule reads (model/stoprequest.py);
  a request older than the node, and a marker an earlier job left in OUT, are not this job's;
- the default wait, and the bad inputs of `down`.

`down --graceful` itself is tested against SkyPilot's fake in tests/test_launch_sdk.py and on a local
run in tests/test_local_run.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpt2cloud.cli import app
from gpt2cloud.store import open_store
from gpt2cloud.store.layout import STOP_REQUEST
from model import stoprequest

REPO = Path(__file__).resolve().parents[1]
EVERY = 0.2  # the pusher's interval here: it looks at the bucket this often


def _pusher(out: Path, url: str, node_up: float) -> subprocess.Popen:
    env = {**os.environ, "GPT2CLOUD_NODE_UP": f"{node_up:.3f}", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "model.sync", "push", str(out), url, "--every", str(EVERY)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)  # as the run script does once the trainer exits: the final push
    try:
        _out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _out, err = proc.communicate(timeout=10)
        pytest.fail(f"the pusher did not end after SIGTERM: {err[-2000:]}")
    assert proc.returncode == 0, err[-2000:]
    return err


def test_the_pusher_turns_a_bucket_stop_request_into_the_marker(tmp_path):
    out, bucket = tmp_path / "out", tmp_path / "bucket" / "r1"
    out.mkdir()
    bucket.mkdir(parents=True)
    store = open_store(bucket.as_uri())
    (out / stoprequest.MARKER).write_text("{}\n")  # an earlier job's, on a node used again
    proc = _pusher(out, bucket.as_uri(), node_up=time.time())
    try:
        assert _wait_for(lambda: not (out / stoprequest.MARKER).exists()), "the earlier job's marker stayed"
        time.sleep(5 * EVERY)  # several intervals without a request: no marker
        assert stoprequest.requested(out) is None
        stoprequest.write(store, stoprequest.make(now=time.time()))
        assert _wait_for(lambda: stoprequest.requested(out) is not None), "the request never reached OUT"
    finally:
        err = _stop(proc)
    line = stoprequest.requested(out)
    assert line.startswith(f"stop requested by {stoprequest.who()} at ") and line.endswith("(gpt2cloud down --graceful)")
    assert f"{line}: the trainer stops at its next check, with a checkpoint" in err  # in the node's log
    assert json.loads((out / stoprequest.MARKER).read_text())["who"] == stoprequest.who()
    assert err.count("stop requested by") == 1  # relayed once, not at every interval


def test_a_request_older_than_the_node_is_a_leftover_and_ignored(tmp_path):
    """A `down --graceful` killed before it removed its request must not stop a later node's trainer; one
    written after the node came up (the user's clock a little behind the node's) must."""
    out, bucket = tmp_path / "out", tmp_path / "bucket" / "r1"
    out.mkdir()
    bucket.mkdir(parents=True)
    store = open_store(bucket.as_uri())
    node_up = time.time()
    stoprequest.write(store, stoprequest.make(now=node_up - stoprequest.CLOCK_SKEW_S - 600))  # an earlier attempt's
    proc = _pusher(out, bucket.as_uri(), node_up=node_up)
    try:
        time.sleep(10 * EVERY)
        assert stoprequest.requested(out) is None
        stoprequest.write(store, stoprequest.make(now=node_up - 30))  # 30 s of clock skew: this node's
        assert _wait_for(lambda: stoprequest.requested(out) is not None)
    finally:
        _stop(proc)


def test_relay_and_requested_directly(tmp_path):
    store = open_store((tmp_path / "b").as_uri())
    out = tmp_path / "out"
    out.mkdir()
    said: list = []
    assert stoprequest.relay(store, out, said.append, node_up=0.0) is None and not said  # nothing asked
    store.put_bytes(STOP_REQUEST, b'{"not": "ours"}')  # an object of another shape is no request
    assert stoprequest.relay(store, out, said.append, node_up=0.0) is None
    stoprequest.write(store, {**stoprequest.make(now=0.0), "who": "alice@laptop"})
    assert stoprequest.relay(store, out, said.append, node_up=0.0) == (
        "stop requested by alice@laptop at 1970-01-01 00:00:00 UTC (gpt2cloud down --graceful)")
    assert stoprequest.requested(out) == said[0].split(": the trainer")[0]
    (out / stoprequest.MARKER).write_text("not json")  # a marker is a request whatever it holds
    assert stoprequest.requested(out) == "stop requested"
    stoprequest.withdraw(store)
    assert stoprequest.read(store) is None
    stoprequest.withdraw(store)  # twice: nothing there is not an error


def test_the_default_wait_counts_a_push_interval_two_steps_the_checkpoint_and_its_push(tmp_path, monkeypatch):
    from run_helpers import local_record

    from gpt2cloud.cost.estimate import Estimate
    from gpt2cloud.runs import logs

    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path / "g2"))
    rec = local_record(tmp_path, "r1")
    base = logs.default_wait_minutes(rec)  # no task file, no estimate: 60 s + 10 min + the slack
    assert base == pytest.approx((60 + 600 + logs.GRACE_SLACK_S) / 60, abs=0.1)
    build = Path(os.environ["GPT2CLOUD_HOME"]) / "builds" / "r1"
    build.mkdir(parents=True)
    (build / "task.yaml").write_text("name: r1\nenvs:\n  GPT2CLOUD_PUSH_EVERY: '300'\n")
    assert logs.default_wait_minutes(rec) == pytest.approx(base + 4, abs=0.1)  # 300 s instead of 60
    est = Estimate.from_dict({**_estimate_dict(), "step_seconds": 30.0, "breakdown_hours": {"finish": 0.1}})
    rec.spec = dataclasses.replace(rec.spec, estimate=est)
    from gpt2cloud.cost.estimate import GIB
    from gpt2cloud.cost.phases import defaults

    ckpt_bytes = (est.memory["weights_gib"] + est.memory["optimizer_gib"]) * GIB
    write_s = ckpt_bytes / (defaults(rec.spec.local)["checkpoint_gb_per_s"][0] * 1e9)
    expected = (300 + 2 * 30 + write_s + 360 + logs.GRACE_SLACK_S) / 60
    assert logs.default_wait_minutes(rec) == pytest.approx(expected, abs=0.1)


def _estimate_dict() -> dict:
    from gpt2cloud.cost.estimate import estimate
    from gpt2cloud.cost.recipes import load_recipe

    return estimate(load_recipe("gpt2-tiny"), gpu_type="H100", gpus_per_node=1).to_dict()


@pytest.mark.parametrize("args, needle", [
    (["down"], "name the RUN to stop"),
    (["down", "--graceful", "--controller"], "down --graceful: name the RUN"),
    (["down", "r1", "--wait-minutes", "5"], "add --graceful"),
    (["down", "r1", "--graceful", "--wait-minutes", "0"], "--wait-minutes 0"),
    (["down", "r1", "--graceful", "--wait-minutes", "nan"], "finite number"),
    (["down", "r1", "--graceful", "--wait-minutes", "100000"], "at most"),
], ids=["no run", "graceful without run", "wait without graceful", "wait 0", "wait nan", "wait too long"])
def test_bad_down_input_is_one_line_exit_2(tmp_path, monkeypatch, args, needle):
    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path / "g2"))
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, r.output
    out = r.output.strip()
    assert out.startswith("error: ") and "\n" not in out and needle in out, out
    assert not (tmp_path / "g2").exists()  # refused before anything was read or written
