"""The run registry, what you own in it, and the runs it points at (issue 20; docs/ownership.md).

A table of rows, each one command the way a user runs it (the Typer app in-process) against a world of
records, node directories and buckets: the exit code, one line naming what is wrong (or, for a command
that acts, what it found), no traceback, and the user's files (registry records, the bucket) byte-for-byte
as they were. Then the races: launches with one name started together, through the registry's API
(threads) and through the real CLI (processes, `--infra local`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from owned_helpers import assert_refused, cli, error_line, fingerprint
from run_helpers import local_record
from sky_offline import sky_home, sky_mod  # noqa: F401  (fixtures)
from test_launch_sdk import FakeSky
from trainer_helpers import make_shards

from gpt2cloud import home, processes
from gpt2cloud.backends.local import LocalHandle
from gpt2cloud.backends.skypilot import SkyHandle
from gpt2cloud.runs import registry
from gpt2cloud.store.layout import RUN_JSON

LOCAL = ["--infra", "local", "--gpus", "CPU:1"]


# ---------------------------------------------------------------- the world


class World:
    """A temp GPT2CLOUD_HOME, a file:// bucket, a data set, and the processes standing in for local runs."""

    def __init__(self, tmp_path: Path, monkeypatch):
        self.tmp, self.mp = tmp_path, monkeypatch
        self.home = tmp_path / "g2"
        monkeypatch.setenv("GPT2CLOUD_HOME", str(self.home))
        monkeypatch.chdir(tmp_path)
        from gpt2cloud.store import open_store
        from gpt2cloud.store.transfer import upload_dir

        self.data = tmp_path / "data"  # a published set: shards and their manifest
        upload_dir(make_shards(tmp_path / "shards"), open_store(self.data.as_uri()), progress=False)
        self.procs: list[subprocess.Popen] = []

    def record(self, run_id="r1", **kw) -> registry.RunRecord:
        rec = local_record(self.tmp, run_id, handle=LocalHandle(local_dir=str(home.local_node_dir(run_id))), **kw)
        bucket_run = Path(rec.spec.run_url[len("file://"):])
        bucket_run.mkdir(parents=True, exist_ok=True)
        (bucket_run / RUN_JSON).write_text(json.dumps(rec.spec.to_dict(), indent=2) + "\n")
        build = home.build_dir(run_id)
        build.mkdir(parents=True, exist_ok=True)
        (build / "task.yaml").write_text(f"name: {run_id}\nenvs:\n  GPT2CLOUD_RUN_URL: {rec.spec.run_url}\n"
                                         f"  GPT2CLOUD_RECIPE: {rec.spec.recipe}\n")
        return rec

    def node(self, run_id="r1", running=True, exit_code=None) -> Path:
        """The local node's directory; running: a real process (a sleep, in its own session) as its driver."""
        d = home.local_node_dir(run_id)
        d.mkdir(parents=True, exist_ok=True)
        if running:
            p = subprocess.Popen(["sleep", "120"], start_new_session=True)
            self.procs.append(p)
            (d / "driver.pid").write_text(f"{p.pid} {processes.process_create_time(p.pid)!r}\n")
        else:
            (d / "driver.pid").write_text("999999 1.0\n")
        if exit_code is not None:
            (d / "exit_code").write_text(f"{exit_code}\n")
        return d

    def alive(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def owned(self) -> dict:
        """What the user owns here: the registry's records and the bucket."""
        return fingerprint(self.home / "runs", self.tmp / "bucket")

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)


@pytest.fixture
def world(tmp_path, monkeypatch):
    w = World(tmp_path, monkeypatch)
    yield w
    w.close()


def launch_args(w: World, name="r1", recipe="gpt2-tiny", *extra):
    return ["launch", recipe, *LOCAL, "--data", w.data.as_uri(), "--bucket", (w.tmp / "bucket").as_uri(),
            "--name", name, "--steps", "2", "--yes", *extra]


# ---------------------------------------------------------------- setups, one per row


def deleted_record_running(w):
    w.record("r1")
    w.node("r1")
    registry.path_for("r1").unlink()


def damaged_record_running(w):
    w.record("r1")
    w.node("r1")
    registry.path_for("r1").write_text("{not json")


def missing_field(w):
    rec = w.record("r1")
    d = rec.to_dict()
    del d["spec"]["recipe"]
    registry.path_for("r1").write_text(json.dumps(d))


def running(w):
    w.record("r1")
    w.node("r1")


def launching_now(w):
    import time as t

    w.record("r1", state="LAUNCHING", started_at=t.time())


def finished(w, **kw):
    w.record("r1", state="LAUNCHED", **kw)
    w.node("r1", running=False, exit_code=0)


def data_failed(w):
    w.record("r1")
    w.node("r1", running=False, exit_code=3)


def bucket_gone(w):
    import shutil

    w.record("r1")
    w.node("r1", running=False, exit_code=0)
    shutil.rmtree(w.tmp / "bucket")


def already_down(w):
    w.record("r1", state="DOWN")
    w.node("r1", running=False)


def no_logs(w):
    w.record("r1")


def foreign_record(w):
    (w.home / "runs").mkdir(parents=True, exist_ok=True)
    (w.home / "runs" / "r1.json").write_text(json.dumps([1, 2, 3]))


def home_under_a_file(w):
    w.record("r1")
    (w.tmp / "afile").write_text("not a directory")
    w.mp.setenv("GPT2CLOUD_HOME", str(w.tmp / "afile" / "g2"))


def home_is_a_file(w):
    w.record("r1")
    (w.tmp / "afile").write_text("not a directory")
    w.mp.setenv("GPT2CLOUD_HOME", str(w.tmp / "afile"))


def home_in_proc(w):
    w.mp.setenv("GPT2CLOUD_HOME", "/proc/gpt2cloud-home")


def home_unset_home_unwritable(w):
    (w.tmp / "afile").write_text("not a directory")
    w.mp.delenv("GPT2CLOUD_HOME")
    w.mp.setenv("HOME", str(w.tmp / "afile" / "home"))


def nothing(w):
    pass


# (name, setup, command (a function of the world), exit code, needle in the error line / the output)
ROWS = [
    # 1. launches with one name: the loser leaves the winner's record alone
    ("launch while another launch of the name is under way", launching_now, lambda w: launch_args(w), 2,
     "being launched by another gpt2cloud process"),
    ("launch a running run's name", running, lambda w: launch_args(w), 2, "still running"),
    # 2. a run whose record is missing or damaged is still found from what exists
    ("launch a running run whose record was deleted", deleted_record_running, lambda w: launch_args(w), 2,
     "is missing; found the run from"),
    ("status of a running run whose record was deleted", deleted_record_running, lambda w: ["status", "r1"], 0,
     "is missing; found the run from the bucket's run.json, its build, its local node"),
    ("down of a running run whose record was deleted", deleted_record_running, lambda w: ["down", "r1"], 0,
     "killed its local process tree"),
    ("status of a running run whose record is damaged", damaged_record_running, lambda w: ["status", "r1"], 0,
     "is damaged (left as it is)"),
    ("down of a running run whose record is damaged", damaged_record_running, lambda w: ["down", "r1"], 0,
     "killed its local process tree"),
    ("launch over a damaged record", damaged_record_running, lambda w: launch_args(w), 2,
     "not a readable run record"),
    # 4. a home that cannot hold the registry: refused before anything is written anywhere
    ("launch, GPT2CLOUD_HOME below a file", home_under_a_file, lambda w: launch_args(w), 2, "$GPT2CLOUD_HOME"),
    ("launch, GPT2CLOUD_HOME in /proc", home_in_proc, lambda w: launch_args(w), 2, "$GPT2CLOUD_HOME"),
    ("launch, GPT2CLOUD_HOME unset and HOME unwritable", home_unset_home_unwritable, lambda w: launch_args(w), 2,
     "~/.gpt2cloud"),
    ("status, GPT2CLOUD_HOME is a file", home_is_a_file, lambda w: ["status"], 2, "not a directory"),
    ("runs, GPT2CLOUD_HOME is a file", home_is_a_file, lambda w: ["runs"], 2, "$GPT2CLOUD_HOME"),
    ("status, GPT2CLOUD_HOME below a file", home_under_a_file, lambda w: ["status", "r1"], 2, "not a directory"),
    ("down, GPT2CLOUD_HOME below a file", home_under_a_file, lambda w: ["down", "r1"], 2, "$GPT2CLOUD_HOME"),
    ("logs, GPT2CLOUD_HOME is a file", home_is_a_file, lambda w: ["logs", "r1"], 2, "$GPT2CLOUD_HOME"),
    # 5. what the node's exit codes mean
    ("status of a run whose data failed to verify", data_failed, lambda w: ["status", "r1"], 0,
     "data download or its sha256 verification failed"),
    # more: records, buckets, names
    ("status of a record with a missing field", missing_field, lambda w: ["status", "r1"], 0,
     "is damaged (left as it is); found the run from the bucket's run.json"),
    ("down of a record with a missing field", missing_field, lambda w: ["down", "r1"], 0, "it was not running"),
    ("status of a foreign file in the registry", foreign_record, lambda w: ["status", "r1"], 2,
     "not a readable run record"),
    ("status of a run whose bucket vanished", bucket_gone, lambda w: ["status", "r1"], 0, "no metrics"),
    ("down of a run already down", already_down, lambda w: ["down", "r1"], 0, "it was not running"),
    ("relaunch a finished run with another recipe", finished, lambda w: launch_args(w, "r1", "gpt2-124m"), 2,
     "was launched with recipe gpt2-tiny, not gpt2-124m"),
    ("relaunch a finished run into another bucket", finished,
     lambda w: [*launch_args(w)[:-5], "--bucket", (w.tmp / "elsewhere").as_uri(), "--name", "r1", "--yes"], 2,
     "takes the same recipe and --bucket"),
    ("logs of a run with no logs yet", no_logs, lambda w: ["logs", "r1"], 2, "no logs in"),
    ("logs of an unknown run", nothing, lambda w: ["logs", "nope"], 2, "unknown run 'nope'"),
    ("status of an unknown run", nothing, lambda w: ["status", "nope"], 2, "unknown run 'nope'"),
    ("down of an unknown run", nothing, lambda w: ["down", "nope"], 2, "unknown run 'nope'"),
    ("launch with an invalid --name", nothing, lambda w: launch_args(w, "Bad_Name"), 2, "is not valid"),
]


@pytest.mark.parametrize("name,setup,command,code,needle", ROWS, ids=[r[0] for r in ROWS])
def test_row(world, name, setup, command, code, needle):
    setup(world)
    args = command(world)
    before = world.owned()
    r = cli(args)
    after = world.owned()
    if code:
        assert_refused(r, needle, before, after, exit_code=code)
    else:
        assert r.exit_code == 0, r.output
        assert "Traceback" not in r.output and needle in " ".join(r.output.split()), r.output
        assert before == after, "the user's files changed"
    if args[0] == "down" and code == 0 and "killed" in needle:
        deadline = time.monotonic() + 10
        while world.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not world.alive(), "down left the run's process running"


def test_table_size():
    assert len(ROWS) >= 26


# ---------------------------------------------------------------- SkyPilot runs whose record is gone


@pytest.fixture
def fake(sky_mod, tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path / "g2"))
    return FakeSky(monkeypatch)


def _sky_build(tmp_path, spot=False):
    build = home.build_dir("r1")
    build.mkdir(parents=True)
    run_url = (tmp_path / "bucket" / "r1").as_uri()
    (build / "task.yaml").write_text(f"name: r1\nresources:\n  use_spot: {str(spot).lower()}\n"
                                     f"envs:\n  GPT2CLOUD_RUN_URL: {run_url}\n")


def test_down_finds_a_cluster_whose_record_was_deleted(fake, tmp_path):
    _sky_build(tmp_path)
    before = fingerprint(tmp_path / "g2" / "runs", tmp_path / "bucket")
    r = cli(["down", "r1"])
    assert r.exit_code == 0, r.output
    assert "tore down cluster r1" in r.output and "is missing" in r.output
    assert ("down", {"cluster_name": "r1"}) in fake.calls and fake.cluster is None
    assert fingerprint(tmp_path / "g2" / "runs", tmp_path / "bucket") == before


def test_status_and_down_find_a_managed_job_whose_record_was_deleted(fake, tmp_path):
    _sky_build(tmp_path, spot=True)
    fake.jobs = {7: "RUNNING"}  # SkyPilot's managed job of the run's name
    r = cli(["status", "r1", "--json"])
    assert r.exit_code == 0, r.output
    assert "is missing" in json.loads(r.stdout)["note"]
    r = cli(["down", "r1"])
    assert r.exit_code == 0 and "cancelled managed job 7" in r.output, r.output


# ---------------------------------------------------------------- races: one name, launched together


def _record(run_id="race", **kw) -> registry.RunRecord:
    spec = registry.RunSpec(run_id=run_id, kind="local", infra="local", run_url="file:///b/race", bucket="file:///b",
                            data_url="file:///d", recipe="gpt2-tiny", gpu_type="CPU", gpus_per_node=1, nodes=1,
                            spot=False, price_per_gpu_hour=0.0, total_steps=2, estimate=None)
    return registry.RunRecord(spec=spec, started_at=time.time(), **kw)


def _race(n, fn) -> list:
    """fn(i) on n threads released together; [result or the exception] per thread."""
    barrier, out = threading.Barrier(n), [None] * n

    def run(i):
        barrier.wait(timeout=10)
        try:
            out[i] = fn(i)
        except Exception as e:  # noqa: BLE001 - collected, asserted on by the test
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return out


@pytest.mark.parametrize("relaunch", [False, True], ids=["create", "relaunch"])
def test_one_claim_wins_and_losers_write_nothing(tmp_path, monkeypatch, relaunch):
    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path / "g2"))
    old = None
    if relaunch:
        old = _record(state="DOWN")
        registry.claim(old, None)
    records = [_record(state="LAUNCHING", history=[{"event": f"launch {i}"}]) for i in range(8)]
    results = _race(8, lambda i: registry.claim(records[i], old))
    winners = [i for i, x in enumerate(results) if not isinstance(x, Exception)]
    assert len(winners) == 1, results
    assert all(isinstance(x, registry.RunTaken) for i, x in enumerate(results) if i != winners[0]), results
    on_disk = registry.find("race")
    assert on_disk.owner == records[winners[0]].owner and on_disk.history == records[winners[0]].history
    # a loser's failure is never written over the winner's record
    loser = records[(winners[0] + 1) % 8]
    with pytest.raises(registry.RunTaken):
        registry.note(loser, "launch failed", state="LAUNCH_FAILED")
    assert registry.find("race").state == "LAUNCHING"
    assert not list((tmp_path / "g2" / "runs").glob(".*tmp*")), "a temporary file was left"


@pytest.mark.parametrize("kind", ["local", "cluster", "managed-job"])
def test_a_record_of_the_version_before_handles_still_loads(tmp_path, monkeypatch, kind):
    """Records written before backends kept handles had their fields at the top level: each backend's
    become its handle (the others' are dropped), and the record is saved in today's shape."""
    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path / "g2"))
    rec = _record("old1", state="LAUNCHED")
    d = rec.to_dict()
    del d["handle"]
    d["spec"]["kind"] = kind
    flat = {"cluster": "old1" if kind == "cluster" else None, "job_id": 7, "request_id": "req-1",
            "pid": 4242 if kind == "local" else None, "local_dir": "/n/old1" if kind == "local" else None}
    registry.check_writable(registry.path_for("old1").parent)
    registry.path_for("old1").write_text(json.dumps({**d, **flat}))
    old = registry.get("old1")
    assert not old.recovered and old.state == "LAUNCHED" and old.spec.kind == kind
    if kind == "local":
        assert old.handle == LocalHandle(pid=4242, local_dir="/n/old1") and old.node_dir == Path("/n/old1")
    else:
        assert old.handle == SkyHandle(cluster=flat["cluster"], job_id=7, request_id="req-1")
    registry.save(old)
    on_disk = json.loads(registry.path_for("old1").read_text())
    assert not set(flat) & set(on_disk) and registry.find("old1").handle == old.handle
    assert on_disk["handle"] == dataclasses.asdict(old.handle)


@pytest.mark.parametrize("kind", ["cluster", "managed-job"])
def test_a_handle_written_before_it_kept_every_attempt_still_loads(tmp_path, monkeypatch, kind):
    """A SkyPilot handle of the version that kept one request id and one job id (before issue 22): it
    loads, its one request and job count as the run's every one (status, the relaunch check and `down`
    ask about them), and a relaunch keeps them beside its own."""
    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path / "g2"))
    d = _record("old2", state="LAUNCHING").to_dict()
    d["spec"]["kind"] = kind
    d["handle"] = {"cluster": "old2" if kind == "cluster" else None, "job_id": 7, "request_id": "req-1"}
    registry.check_writable(registry.path_for("old2").parent)
    registry.path_for("old2").write_text(json.dumps(d))
    old = registry.get("old2")
    assert old.handle.every_request() == ["req-1"] and old.handle.every_job() == [7]
    nxt = old.handle.next_attempt(cluster=old.handle.cluster)
    nxt.got_request("req-2")
    nxt.got_jobs(8)
    assert (nxt.request_id, nxt.job_id) == ("req-2", None)
    assert nxt.every_request() == ["req-1", "req-2"] and nxt.every_job() == [7, 8]
    old.handle = nxt
    registry.save(old)
    on_disk = json.loads(registry.path_for("old2").read_text())["handle"]
    assert on_disk["request_ids"] == ["req-1", "req-2"] and on_disk["job_ids"] == [7, 8]
    assert registry.find("old2").handle == nxt


def test_a_record_with_no_handle_yet_round_trips(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path / "g2"))
    registry.claim(_record(state="LAUNCHING"), None)
    assert json.loads(registry.path_for("race").read_text())["handle"] is None
    rec = registry.find("race")
    assert rec.handle is None and rec.node_dir == home.local_node_dir("race")


def test_a_damaged_record_is_never_written_over(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path / "g2"))
    rec = _record()
    registry.claim(rec, None)
    registry.path_for("race").write_text("{torn")
    with pytest.raises(registry.UserError, match="left as it is"):
        registry.save(rec)
    assert registry.path_for("race").read_text() == "{torn"


def test_four_launches_with_one_name_through_the_cli(world):
    """The real start path in four processes at once (`--infra local`): one launches, three refuse with
    one line, and the record is the winner's, never LAUNCH_FAILED."""
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "gpt2cloud", *launch_args(world, "race"), "--json"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        try:
            cli(["down", "race"])
        except Exception:  # noqa: BLE001 - best effort: the node is killed below too
            pass
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2, 2, 2], list(zip(codes, outs))
    for (out, err), code in zip(outs, codes):
        assert "Traceback" not in err, err
        if code == 2:
            line = error_line(err)
            # it lost the race for the record, or came after the winner had started: the run is running
            assert "another gpt2cloud process" in line or "is still running" in line, line
    rec = json.loads(registry.path_for("race").read_text())
    winner = json.loads(outs[codes.index(0)][0])
    assert rec["handle"]["pid"] == winner["pid"] and rec["state"] in ("LAUNCHED", "DOWN"), rec
    assert [h["event"] for h in rec["history"]][:2] == ["launch", "launched"], rec["history"]
