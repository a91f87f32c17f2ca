"""Push failures are never silent (issue 22, part 4): the node's pusher records every push in
OUT/push_status.json and pushes it last; `status` says when pushes fail or stop coming; the final push of
a managed job keeps trying for its bounded window before the job may end."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from run_helpers import local_record

from gpt2cloud.runs import status
from gpt2cloud.store.layout import METRICS, PUSH_STATUS
from model import pushstate, sync


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path / "g2"))
    return tmp_path


def test_the_record_says_since_when_pushes_fail(tmp_path):
    assert pushstate.read(tmp_path) is None and pushstate.failing_seconds(None) == 0
    pushstate.record(tmp_path, True, every=60, now=100.0)
    pushstate.record(tmp_path, False, every=60, error="ConnectTimeout", now=160.0)
    s = pushstate.record(tmp_path, False, every=60, error="x" * 1000, now=220.0)
    assert s["last_ok"] == 100.0 and s["failing_since"] == 160.0 and s["failures"] == 2
    assert len(s["last_error"]) == pushstate.ERROR_CHARS
    assert pushstate.failing_seconds(pushstate.read(tmp_path), now=400.0) == 240.0
    pushstate.record(tmp_path, True, every=60, now=460.0)  # one success ends the failing stretch
    assert pushstate.failing_seconds(pushstate.read(tmp_path), now=999.0) == 0.0


def _out_with_metrics(tmp_path: Path) -> Path:
    out = tmp_path / "node" / "node" / "out"
    (out / "logs").mkdir(parents=True)
    (out / METRICS).write_text(json.dumps({"step": 1, "loss": 5.0}) + "\n")
    return out


def test_a_failing_push_is_recorded_and_status_says_so(home):
    out = _out_with_metrics(home)
    record = local_record(home, "r1")
    bucket = home / "bucket" / "r1"
    bucket.mkdir(parents=True)
    (bucket / METRICS).mkdir()  # a directory where the metrics go: every push fails, as with a bucket down
    pusher = sync.Pusher(str(out), bucket.as_uri(), rank=0, keep=2)
    assert pusher.attempt(every=60)  # the error, in words
    recorded = pushstate.read(out)
    assert recorded["failures"] == 1 and recorded["failing_since"] and recorded["last_ok"] is None
    # a local run: status reads the pusher's own record, error included, while the run is RUNNING
    warning = status.push_warning(record, "RUNNING", now=recorded["failing_since"] + 180)
    assert warning.startswith("pushes to the bucket have failed for 3 min (1 tries; last: ")
    assert status.push_warning(record, "SUCCEEDED") is None  # only while it trains
    # the bucket works again: the next push records it, and pushes the record last
    (bucket / METRICS).rmdir()
    assert pusher.attempt(every=60) == ""
    in_bucket = json.loads((bucket / PUSH_STATUS).read_text())
    assert in_bucket["failures"] == 0 and in_bucket["last_ok"] >= recorded["failing_since"]
    assert status.push_warning(record, "RUNNING") is None


def test_status_warns_when_the_bucket_hears_nothing_from_the_node(home):
    """A cloud node that cannot reach the bucket cannot say so there: its last record grows late."""
    record = local_record(home, "r2", kind="cluster", infra="aws")
    bucket = home / "bucket" / "r2"
    bucket.mkdir(parents=True)
    now = time.time()
    (bucket / PUSH_STATUS).write_text(json.dumps({"time": now - 60, "every": 60, "last_ok": now - 60,
                                                  "failing_since": None, "failures": 0, "last_error": ""}))
    assert status.push_warning(record, "RUNNING", now=now) is None  # on time
    late = status.push_warning(record, "RUNNING", now=now + 120)
    assert late.startswith("no push from the node for 3 min (every 60 s expected)")


class FlakyPusher:
    def __init__(self, fails: int):
        self.fails, self.tries = fails, 0

    def attempt(self, every):
        self.tries += 1
        return "bucket unreachable" if self.tries <= self.fails else ""


def test_the_final_push_keeps_trying_for_its_window_and_no_longer():
    # on-demand (no window): FINAL_TRIES attempts, then the job fails with the copy still on the node
    p = FlakyPusher(fails=99)
    assert sync._final_push(p, every=60, retry_seconds=0.001, final_minutes=0) == sync.EXIT_FINAL_PUSH
    assert p.tries == sync.FINAL_TRIES
    # a managed job: it goes on past FINAL_TRIES while its window lasts, and succeeds when the bucket is back
    p = FlakyPusher(fails=sync.FINAL_TRIES + 3)
    assert sync._final_push(p, every=60, retry_seconds=0.001, final_minutes=0.1) == 0
    assert p.tries == sync.FINAL_TRIES + 4
    # ... and the window is a bound: a bucket that never comes back ends it
    p = FlakyPusher(fails=10**6)
    t0 = time.monotonic()
    assert sync._final_push(p, every=60, retry_seconds=0.001, final_minutes=0.02) == sync.EXIT_FINAL_PUSH
    assert time.monotonic() - t0 < 0.02 * 60 + 2


def test_a_spot_launch_gives_its_final_push_a_window(tmp_path, monkeypatch):
    from gpt2cloud.launch import plan as plans

    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path / "g2"))
    spec = plans.RunSpec(run_id="r1", kind="managed-job", infra="aws", run_url="s3://b/r1", bucket="s3://b",
                         data_url="s3://b/d", recipe="gpt2-124m", gpu_type="H100", gpus_per_node=8, nodes=1,
                         spot=True, price_per_gpu_hour=5.0, total_steps=10, estimate=None)
    envs = dict(plans.node_envs(spec, 60, 3, {}))
    assert envs["GPT2CLOUD_FINAL_PUSH_MINUTES"] == str(plans.SPOT_FINAL_PUSH_MINUTES)
    on_demand = dict(plans.node_envs(plans.dataclasses.replace(spec, spot=False, kind="cluster"), 60, 3, {}))
    assert "GPT2CLOUD_FINAL_PUSH_MINUTES" not in on_demand


def test_a_failed_managed_job_does_not_send_the_user_to_a_node_that_is_gone(home):
    from model.metrics import RunMetrics

    record = local_record(home, "r3", kind="managed-job", infra="aws", spot=True)
    metrics = RunMetrics.from_text(json.dumps({"event": "checkpoint", "step": 40}) + "\n")
    hint = status.node_copy_hint(record, metrics)
    assert "checkpoint step 40 is not in the bucket" in hint and "a copy that was only there is gone" in hint
    assert "rsync" not in hint
    cluster = local_record(home, "r4", kind="cluster", infra="aws")
    assert "rsync -a" in status.node_copy_hint(cluster, metrics)
