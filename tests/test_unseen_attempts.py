"""A spot run's attempts preempted before their first push (gpt2cloud/runs/attempts.py): counted from
SkyPilot's managed-job records against what the bucket saw, shown and written by `status`, pulled by the
next node and counted by its budget stop.

SkyPilot is faked at its own SDK: `sky.jobs.queue_v2` and `sky.get`, autospec'd from the real functions
(a call with a wrong argument fails as it would for real), answering with SkyPilot's own ManagedJobRecord
and ManagedJobStatus, or raising its real ClusterNotUpError; everything of gpt2cloud above them is real.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from unittest import mock

import pytest
from run_helpers import local_record
from sky_offline import sky_home, sky_mod  # noqa: F401  (fixtures)
from trainer_helpers import FakeClock, make_shards, read_metrics, tiny_config, train_on_clock, write_config
from typer.testing import CliRunner

from gpt2cloud.backends.skypilot import SkyHandle
from gpt2cloud.cli import app
from gpt2cloud.runs import attempts
from gpt2cloud.store import open_store
from gpt2cloud.store.layout import UNSEEN_ATTEMPTS
from model import deadman, sync

# the deadman's bounds of everything before the pusher starts (model/deadman.py), plus a 60 s push interval
BOUND = 120 + 600 + 2700 + 900 + 600 + 300 + 2400 + 1800 + 60


def job(status, recoveries=0, ran_s=3000.0, submitted=1000.0, began=None) -> dict:
    """One managed job as sky_sdk.managed_job_records gives it."""
    return {"status": status, "recovery_count": recoveries, "job_duration": ran_s, "submitted_at": submitted,
            "last_recovered_at": began}


def node_up(t: float, rank: int = 0) -> dict:
    return {"event": "node_up", "time": t, "rank": rank}


def test_the_bound_is_the_deadmans_phases_before_the_first_push_and_one_interval():
    assert attempts.bound_seconds(60.0) == BOUND  # ~2.6 h
    assert attempts.bound_seconds(600.0) - attempts.bound_seconds(60.0) == 540.0


def test_the_push_interval_is_read_once_for_the_bound_and_down():
    """registry.push_every: the run's task as launched (the build's, else a local node's copy) says it; the
    launch's default where it is gone or unreadable. This bound and `down --graceful`'s wait both read it."""
    from gpt2cloud import home
    from gpt2cloud.runs import logs, registry

    assert registry.push_every("r1") == registry.DEFAULT_PUSH_EVERY_S == 60.0
    node = home.local_node_dir("r1") / "sky_workdir"
    node.mkdir(parents=True)
    (node / "task.yaml").write_text("envs:\n  GPT2CLOUD_PUSH_EVERY: '300'\n")
    assert registry.push_every("r1") == 300.0
    (node / "task.yaml").write_text("envs:\n  GPT2CLOUD_PUSH_EVERY: soon\n")
    assert registry.push_every("r1") == 60.0
    assert not hasattr(attempts, "push_interval") and not hasattr(logs, "push_every")  # one reader
    assert BOUND - 60 == sum(deadman.SETUP_BOUNDS.values()) + deadman.PULL_BOUND + deadman.DATA_BOUND


def test_the_bucket_saw_one_of_three_attempts_so_two_are_charged():
    # three attempts over (two recoveries, the third preempted too): only the first pushed anything
    rows = [node_up(1100.0), {"event": "pull", "time": 1200.0}, {"step": 1, "loss": 9.0, "time": 1500.0}]
    (c,) = attempts.count_unseen({7: job("RECOVERING", recoveries=2)}, rows)
    assert (c["ran"], c["seen"], c["unseen"]) == (3, 1, 2)
    # another node's node_up is not another attempt (rank 0's timeline alone is pushed)
    (c,) = attempts.count_unseen({7: job("FAILED", recoveries=2)}, [*rows, node_up(1103.0, rank=1)])
    assert (c["ran"], c["seen"], c["unseen"]) == (3, 1, 2)
    # a job that never reached a node ran no attempt
    (c,) = attempts.count_unseen({7: job("CANCELLED", ran_s=0.0)}, [])
    assert (c["ran"], c["unseen"]) == (0, 0)


def test_the_attempt_on_a_node_now_is_not_counted_whether_or_not_it_pushed():
    """Attempts 1 and 3 of three: 1 pushed, 2 was preempted in setup, 3 runs now (since 5000)."""
    job7 = job("RUNNING", recoveries=2, began=5000.0)
    first = [node_up(1100.0), {"event": "pull", "time": 1200.0}]
    for rows in (first, [*first, node_up(4900.0), {"event": "pull", "time": 5100.0}]):  # 3 not pushed yet, pushed
        (c,) = attempts.count_unseen({7: job7}, rows)
        assert (c["ran"], c["seen"], c["unseen"]) == (2, 1, 1), rows


def test_each_job_counts_the_node_ups_since_its_own_submission():
    """An earlier launch's job (7, seen once) does not hide the unseen attempts of the run's next job (8)."""
    jobs = {7: job("SUCCEEDED", submitted=1000.0), 8: job("RECOVERING", recoveries=1, submitted=9000.0)}
    counts = attempts.count_unseen(jobs, [node_up(1100.0), {"step": 5, "loss": 5.0, "time": 8000.0}])
    assert [(c["job_id"], c["ran"], c["seen"], c["unseen"]) for c in counts] == [(7, 1, 1, 0), (8, 2, 0, 2)]


# ---- `status`: SkyPilot's SDK faked, the rest real ----


@pytest.fixture
def skypilot(sky_mod, monkeypatch):
    """SkyPilot's jobs controller: `records` are what queue_v2 answers, `raises` what sky.get raises instead."""
    import sky

    controller = SimpleNamespace(records=[], raises=None)

    def get(request_id):
        if controller.raises is not None:
            raise controller.raises
        return controller.records, len(controller.records), {}, len(controller.records)

    controller.queue_v2 = mock.create_autospec(sky.jobs.queue_v2, return_value="request-1")
    monkeypatch.setattr(sky.jobs, "queue_v2", controller.queue_v2)
    monkeypatch.setattr(sky, "get", mock.create_autospec(sky.get, side_effect=get))
    return controller


def spot_run(tmp_path, monkeypatch):
    """A spot run of 8 GPUs at $2/GPU-hour whose bucket saw one attempt (up at 1100, last line at 4000)."""
    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path / "g2"))
    rec = local_record(tmp_path, "spot1", kind="managed-job", infra="aws", spot=True, gpus_per_node=8,
                       price_per_gpu_hour=2.0, handle=SkyHandle(job_id=7))
    store = open_store(rec.spec.run_url)
    store.put_bytes("timeline.jsonl", (json.dumps(node_up(1100.0)) + "\n").encode())
    store.put_bytes("metrics.jsonl", (json.dumps({"event": "start", "time": 1400.0, "config": {"steps": 20}}) + "\n" +
                                      json.dumps({"step": 1, "loss": 9.0, "time": 4000.0}) + "\n").encode())
    return rec, store


def test_status_charges_them_in_the_dollars_and_writes_them_to_the_bucket(skypilot, tmp_path, monkeypatch):
    import sky
    from sky.schemas.api.responses import ManagedJobRecord

    rec, store = spot_run(tmp_path, monkeypatch)
    status = sky.jobs.ManagedJobStatus
    # job 7 ran three attempts (two recoveries) and is recovering from the third; the bucket saw the first
    skypilot.records = [ManagedJobRecord(job_id=7, task_id=0, job_name="spot1", status=status.RECOVERING,
                                         recovery_count=2, job_duration=2900.0, submitted_at=1000.0),
                        ManagedJobRecord(job_id=9, job_name="spot1-other", recovery_count=5, job_duration=1.0,
                                         status=status.FAILED)]  # another run's (name_match is a substring)
    d = json.loads(CliRunner().invoke(app, ["status", "spot1", "--json"]).stdout)
    charged = 2 * BOUND / 3600 * 8 * 2.0
    assert d["unseen_attempts"]["attempts"] == 2 and d["unseen_attempts"]["usd"] == pytest.approx(charged, abs=1e-3)
    assert d["cost_so_far_usd"] == pytest.approx((4000 - 1100) / 3600 * 8 * 2.0 + charged, abs=1e-3)
    assert skypilot.queue_v2.call_args.kwargs["name_match"] == "spot1"
    assert "recovery_count" in skypilot.queue_v2.call_args.kwargs["fields"]
    written = json.loads(store.get_bytes(UNSEEN_ATTEMPTS))
    assert (written["attempts"], written["seconds"]) == (2, 2 * BOUND)
    r = CliRunner().invoke(app, ["status", "spot1"], env={"COLUMNS": "200"})
    assert (f"2 attempts preempted before their first push: +${charged:,.2f}, from SkyPilot's managed-job records"
            in r.stdout), r.stdout
    # SkyPilot's controller stopped (10 idle minutes): the figure last written to the bucket still counts
    skypilot.raises = sky.exceptions.ClusterNotUpError("Managed jobs controller is not up.")
    d = json.loads(CliRunner().invoke(app, ["status", "spot1", "--json"]).stdout)
    assert d["unseen_attempts"]["attempts"] == 2 and "as last counted" in d["unseen_attempts"]["source"]
    assert d["cost_so_far_usd"] == pytest.approx((4000 - 1100) / 3600 * 8 * 2.0 + charged, abs=1e-3)


# ---- the node: the pull brings the figure, the trainer's budget stop counts it ----


def test_the_next_node_pulls_the_figure_and_its_budget_stop_counts_it(tmp_path, monkeypatch):
    """$1 of budget at $1/GPU-hour on 1 GPU: a fresh node has spent nothing and trains; the same node after
    two unseen attempts (2 x ~2.6 h of node time) has passed the cap and stops before its first step."""
    data = make_shards(tmp_path / "data")
    config = write_config(tmp_path / "c.json", tiny_config(steps=6, max_cost_usd=1.0, price_per_gpu_hour=1.0,
                                                           val_every=1000, sample_every=0))
    bucket = open_store((tmp_path / "bucket").as_uri())
    for name, figure in (("counted", {"format": attempts.FORMAT, "attempts": 2, "seconds": 2.0 * BOUND}),
                         ("fresh", None)):
        out = tmp_path / name
        out.mkdir()
        (out / UNSEEN_ATTEMPTS).write_text(json.dumps({"seconds": 99.0}))  # an earlier job's copy: replaced
        if figure is not None:
            bucket.put_bytes(UNSEEN_ATTEMPTS, json.dumps(figure).encode())
        else:
            bucket.delete(UNSEEN_ATTEMPTS)
        assert sync.pull(bucket.url_for(""), out) == 0
        clock = FakeClock(step_seconds=1.0)
        train_on_clock(config, data, out, clock, monkeypatch, node_up=clock.now)
        records = read_metrics(out)
        if figure is None:
            assert not (out / UNSEEN_ATTEMPTS).exists() and records[-1]["event"] == "end"
        else:
            (stop,) = [r for r in records if r.get("event") == "budget_stop"]
            assert stop["step"] == 0 and stop["cost_usd"] == pytest.approx(2 * BOUND / 3600, rel=1e-3)


def test_attempts_are_counted_by_their_job_and_attempt_tags_not_their_times():
    """In a container node_up is floored at the launch (the host booted long before), earlier than the job's
    submission and the same for every attempt: the run script's job and attempt tags count them."""
    jobs = {7: job("RECOVERING", recoveries=2, submitted=2000.0)}
    floored = [{**node_up(1500.0), "job": "7", "attempt": a} for a in ("a1", "a2")]
    assert [c["seen"] for c in attempts.count_unseen(jobs, floored)] == [2]
    assert [c["unseen"] for c in attempts.count_unseen(jobs, floored)] == [1]  # 3 attempts over, 2 seen
    other_job = [{**node_up(2500.0), "job": "6", "attempt": "b1"}]  # another job's attempt in the window
    assert [c["seen"] for c in attempts.count_unseen(jobs, other_job)] == [0]
