"""`gpt2cloud status RUN --watch` (gpt2cloud/runs/watch.py, gpt2cloud/cli/status.py) and `runs`' total spend.

The watch is driven through its plain functions with a fake clock and sleep: each "sleep" changes the run's
file:// bucket (or its backend's state), and the next refresh must show the change. No test waits for a
real interval.
"""

from __future__ import annotations

import io
import json
import threading
import time

import pytest
from rich.console import Console
from run_helpers import local_record, metrics_lines
from typer.testing import CliRunner

from gpt2cloud.backends.skypilot import SkyHandle
from gpt2cloud.cli import app
from gpt2cloud.cli.runs import parse_since
from gpt2cloud.cli.status import watch_json, watch_line, watch_status, watch_view
from gpt2cloud.errors import UserError
from gpt2cloud.runs import watch
from gpt2cloud.store import StorageError, open_store

END = json.dumps({"event": "end", "step": 20, "final_loss": 8.0}) + "\n"


def timeline(*events: str) -> bytes:
    return "".join(json.dumps({"event": e, "time": 100.0 + i, "rank": 0}) + "\n" for i, e in enumerate(events)).encode()


class FakeRun:
    """A run whose bucket and backend state move one stage on at every `sleep`, with a clock that ticks."""

    STAGES = [  # (state, timeline events, metrics)
        ("RUNNING", ("node_up", "setup", "pull"), None),
        ("RUNNING", ("node_up", "setup", "pull", "data", "train_start"), metrics_lines(12, 20)),
        ("RUNNING", ("node_up", "setup", "pull", "data", "train_start", "train_end"), metrics_lines(20, 20) + END),
        ("SUCCEEDED", ("node_up", "setup", "pull", "data", "train_start", "train_end", "final_push"),
         metrics_lines(20, 20) + END),
    ]

    def __init__(self, tmp_path, monkeypatch, run_id="w1"):
        monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path / "g2"))
        self.record = local_record(tmp_path, run_id, max_cost_usd=5.0)
        self.store = open_store(self.record.spec.run_url)
        self.stage, self.now, self.sleeps = 0, 1_700_000_000.0, []
        monkeypatch.setattr("gpt2cloud.runs.status.state_of", lambda record: self.STAGES[self.stage][0])
        self.write()

    def write(self):
        _state, events, metrics = self.STAGES[self.stage]
        self.store.put_bytes("timeline.jsonl", timeline(*events))
        if metrics is not None:
            self.store.put_bytes("metrics.jsonl", metrics.encode())

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds
        self.stage += 1
        self.write()

    def clock(self):
        return self.now


def test_the_watch_shows_each_refresh_and_ends_when_the_run_ends(tmp_path, monkeypatch):
    run = FakeRun(tmp_path, monkeypatch)
    frames = []
    final = watch.watch("w1", 30.0, frames.append, sleep=run.sleep, clock=run.clock)
    assert [f.phase for f in frames] == ["data", "training", "final push", "ended"]
    assert [f.status["step"] for f in frames] == [None, 12, 20, 20]
    assert frames[1].status["loss"] == pytest.approx(8.8) and len(frames[1].losses) == 12
    assert [f.ended for f in frames] == [False, False, False, True] and final is frames[-1]
    assert run.sleeps == [30.0, 30.0, 30.0]  # three waits between four refreshes, none after the end
    assert [f.at for f in frames] == [1_700_000_000.0 + 30 * i for i in range(4)]
    assert all(f.error is None for f in frames)


def test_without_a_terminal_each_refresh_is_one_line_then_the_final_status(tmp_path, monkeypatch):
    run = FakeRun(tmp_path, monkeypatch)
    out = io.StringIO()
    watch_status("w1", 30.0, False, Console(file=out, width=200), sleep=run.sleep, clock=run.clock)
    lines = out.getvalue().splitlines()
    assert "RUNNING  data  step -/20" in lines[0]
    assert "step 12/20" in lines[1] and "loss 8.8000" in lines[1] and "512 tokens/s" in lines[1]
    assert "final push  step 20/20" in lines[2] and "SUCCEEDED  ended" in lines[3]
    assert len([line for line in lines if "tokens/s" in line and "step " in line]) == 4
    rest = "\n".join(lines[4:])  # then status's own view of the run, once
    assert "SUCCEEDED finished" in rest and "of a $5.00 cap" in rest


def test_on_a_terminal_the_live_view_gives_way_to_the_final_status(tmp_path, monkeypatch):
    run = FakeRun(tmp_path, monkeypatch)
    out = io.StringIO()
    watch_status("w1", 30.0, False, Console(file=out, width=120, force_terminal=True), sleep=run.sleep,
                 clock=run.clock)
    text = out.getvalue()
    assert "12 / 20" in text and "final push" in text and "every 30 s" in text
    assert text.count("of a $5.00 cap") == 1  # the final status, printed once after the view
    assert "\x1b[?25l" in text and "\x1b[?25h" in text  # Live hid the cursor and gave it back


def test_the_view_shows_the_curve_the_phase_and_dollars_against_the_estimate(tmp_path, monkeypatch):
    run = FakeRun(tmp_path, monkeypatch)
    run.stage = 1
    run.write()
    frame = watch.read_frame("w1", run.clock)
    frame.status["cost_estimated_usd"] = 0.1
    out = io.StringIO()
    Console(file=out, width=160).print(watch_view(frame, 15.0))
    text = out.getvalue()
    curve = watch.sparkline(frame.losses)
    assert len(curve) == 12 and curve[0] == "█" and curve[-1] == "▁"  # the loss falls
    assert curve in text and "training" in text and "12 / 20" in text and "60%" in text
    so_far = frame.status["cost_so_far_usd"]
    assert f"of ~$0.10 estimated ({so_far / 0.1:.0%})" in text and "cap $5.00" in text and "every 15 s" in text
    assert "error" not in text and "failed" not in text


def test_when_the_run_is_over_and_the_nodes_phase():
    for state in ("SUCCEEDED", "TERMINATED", "FAILED (exit code 3)", "CANCELLED", "STOPPED", "CLUSTER_STOPPED", "UP"):
        assert watch.is_over(state), state
    for state in ("RUNNING", "PENDING", "RECOVERING", "LAUNCHING", "CLUSTER_INIT", "UNKNOWN (API server: timeout)"):
        assert not watch.is_over(state), state  # an UNKNOWN state may pass: the watch goes on
    running = {"state": "RUNNING", "step": None}
    assert watch.node_phase({**running, "phase": None}) == "setup"  # SkyPilot provisions, no event yet
    assert watch.node_phase({**running, "phase": "pulling the newest checkpoint"}) == "pulling"
    assert watch.node_phase({**running, "phase": "starting the trainer"}) == "training"
    assert watch.node_phase({**running, "phase": "finished"}) == "final push"  # the trainer's stop is in
    assert watch.node_phase({**running, "phase": "some new step"}) == "some new step"
    assert watch.node_phase({"state": "FAILED (exit code 5)", "phase": "final push"}) == "ended"


def test_sparkline():
    assert watch.sparkline([]) == "" and watch.sparkline([3.0, 3.0]) == "▅▅"
    assert watch.sparkline([10, 5, 0]) == "█▅▁"
    assert watch.sparkline([float("nan"), 2.0, 1.0]) == "█▁"  # a diverging step's nan is left out
    assert len(watch.sparkline(list(range(1000)), width=40)) == 40


def test_a_failing_refresh_is_shown_and_the_watch_goes_on(tmp_path, monkeypatch):
    run = FakeRun(tmp_path, monkeypatch)
    calls = []

    def flaky_read(run_id, clock):
        calls.append(run.stage)
        if len(calls) == 2:
            raise StorageError("file:///bucket/w1/metrics.jsonl: read failed (disk gone)")
        return watch.read_frame(run_id, clock)

    frames = []
    watch.watch("w1", 10.0, frames.append, sleep=run.sleep, clock=run.clock, read=flaky_read)
    assert len(frames) == 4 and frames[-1].ended and frames[-1].error is None
    failed = frames[1]
    assert failed.error == "file:///bucket/w1/metrics.jsonl: read failed (disk gone)" and not failed.ended
    assert failed.status is frames[0].status and failed.at == frames[0].at + 10  # the last figures, now
    assert "refresh failed: file:///bucket/w1/metrics.jsonl: read failed (disk gone)" in watch_line(failed)
    assert watch_json(failed) == {"run": "w1", "refreshed_at": failed.at, "ended": False,
                                  "refresh_error": "file:///bucket/w1/metrics.jsonl: read failed (disk gone)"}
    out = io.StringIO()
    Console(file=out, width=200).print(watch_view(failed, 10.0))
    view = out.getvalue()
    assert "failed: file:///bucket/w1/metrics.jsonl" in view and "figures from the last good refresh" in view


def test_a_refresh_that_does_not_answer_is_bounded_and_not_started_twice():
    release, calls, frames = threading.Event(), [], []

    def stuck_read(run_id, clock):
        calls.append(1)
        release.wait(10)
        return watch.Frame(run=run_id, at=clock(), status={"state": "SUCCEEDED"}, phase="ended", ended=True)

    def sleep(seconds):
        if len(frames) == 2:  # two rounds waited on the first call, which is still running
            assert len(calls) == 1
            release.set()

    start = time.monotonic()
    final = watch.watch("w2", 5.0, frames.append, sleep=sleep, clock=lambda: 7.0, bound=0.05, read=stuck_read)
    assert time.monotonic() - start < 5
    assert [f.error for f in frames[:2]] == [frames[0].error] * 2 and "no answer within 0.05 s" in frames[0].error
    assert final.ended and final.error is None and len(calls) <= 2


def test_watch_with_json_prints_one_object_a_line(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path / "g2"))
    rec = local_record(tmp_path, "j1")
    (tmp_path / "node").mkdir()
    (tmp_path / "node" / "exit_code").write_text("0\n")  # the local backend: SUCCEEDED
    open_store(rec.spec.run_url).put_bytes("metrics.jsonl", (metrics_lines(20, 20) + END).encode())
    r = CliRunner().invoke(app, ["status", "j1", "--watch", "--json", "--interval", "5"])
    assert r.exit_code == 0, r.output
    (line,) = r.stdout.splitlines()  # the run has ended: one refresh, and its line is the final status
    d = json.loads(line)
    assert d["state"] == "SUCCEEDED" and d["ended"] and d["node_phase"] == "ended" and d["step"] == 20
    r = CliRunner().invoke(app, ["status", "j1", "--watch"])  # piped (no terminal): a line, then the status
    assert r.exit_code == 0 and r.stdout.splitlines()[0].endswith("SUCCEEDED  ended  step 20/20  loss 8.0000  "
                                                                  "512 tokens/s  $0.07 (no estimate)  ETA 0 s")
    assert "finished" in r.stdout


def test_ctrl_c_ends_the_watch_quietly_with_exit_0(tmp_path, monkeypatch):
    run = FakeRun(tmp_path, monkeypatch)

    def interrupted(seconds):
        raise KeyboardInterrupt

    out = io.StringIO()
    with pytest.raises(KeyboardInterrupt):  # the Live view is left with the cursor given back
        watch_status("w1", 30.0, False, Console(file=out, width=120, force_terminal=True), sleep=interrupted,
                     clock=run.clock)
    assert out.getvalue().rstrip("\r\n").endswith("\x1b[?25h")

    def watch_interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("gpt2cloud.cli.status.watch_status", watch_interrupted)
    r = CliRunner().invoke(app, ["status", "w1", "--watch"])
    assert r.exit_code == 0 and r.output == "" and r.exception is None


@pytest.mark.parametrize("args,needle", [
    (["--watch", "--interval", "1"], "--interval 1: must be at least 5 s"),
    (["--watch", "--interval", "0"], "--interval 0.0: must be a finite number greater than 0"),
    (["--watch", "--interval", "nan"], "must be a finite number greater than 0"),
    (["--watch", "--interval", "86400"], "must be at most 3600"),
    (["--watch", "--interval", "soon"], "'--interval': Input should be a valid number"),
    (["--interval", "10"], "--interval 10 is for --watch"),
])
def test_a_bad_interval_is_one_line_and_exit_2(tmp_path, monkeypatch, args, needle):
    FakeRun(tmp_path, monkeypatch)
    r = CliRunner().invoke(app, ["status", "w1", *args])
    assert r.exit_code == 2 and r.output.startswith("error: ") and needle in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output


def test_watch_needs_one_known_run(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path / "g2"))
    for args, needle in ((["status", "--watch"], "--watch follows one run"),
                         (["status", "nope", "--watch"], "unknown run 'nope'")):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 2 and needle in r.output and len(r.output.strip().splitlines()) == 1, r.output


# ---- `gpt2cloud runs`: dollars so far, their total, --since


def spend_world(tmp_path, monkeypatch):
    """Three runs: one in a file:// bucket (launched 2020-01-15), one as fetched here (launched an hour ago),
    one whose metrics are only in an s3:// bucket."""
    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path / "g2"))
    monkeypatch.chdir(tmp_path)  # fetch's default --dest (./runs/RUN) is looked at too
    old = time.mktime(time.strptime("2020-01-15 12:00", "%Y-%m-%d %H:%M"))
    a = local_record(tmp_path, "a1", started_at=old)
    open_store(a.spec.run_url).put_bytes("metrics.jsonl", metrics_lines(10, 20).encode())  # 20 s x 2 GPUs x $3
    fetched = tmp_path / "fetched"
    fetched.mkdir()
    (fetched / "metrics.jsonl").write_text(metrics_lines(20, 20) + END)  # 40 s x 2 GPUs x $3
    local_record(tmp_path, "b1", kind="cluster", infra="lambda", handle=SkyHandle(cluster="b1"),
                 run_url="s3://bkt/runs/b1", started_at=time.time() - 3600, fetched_dir=str(fetched))
    local_record(tmp_path, "c1", kind="cluster", infra="lambda", handle=SkyHandle(cluster="c1"),
                 run_url="s3://bkt/runs/c1", started_at=time.time() - 1800)


def test_runs_shows_each_runs_dollars_so_far_and_their_total(tmp_path, monkeypatch):
    spend_world(tmp_path, monkeypatch)
    from gpt2cloud.runs import status

    def local_only(url):
        assert url.startswith("file://"), f"a network read of {url}"
        return open_store(url)

    monkeypatch.setattr(status, "open_store", local_only)
    r = CliRunner().invoke(app, ["runs", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    runs = {row["run_id"]: row for row in d["runs"]}
    assert runs["a1"]["cost_so_far_usd"] == pytest.approx(20 / 3600 * 6, abs=1e-4)
    assert runs["a1"]["cost_source"] == "the bucket (on this disk)"
    assert runs["b1"]["cost_so_far_usd"] == pytest.approx(40 / 3600 * 6, abs=1e-4)
    assert runs["b1"]["cost_source"].startswith(str(tmp_path / "fetched") + " as of ")
    assert runs["c1"]["cost_so_far_usd"] is None and "only in the bucket" in runs["c1"]["cost_source"]
    assert d["total"]["cost_so_far_usd"] == pytest.approx(60 / 3600 * 6, abs=1e-4)
    assert d["total"]["runs"] == 3 and d["total"]["without_figure"] == ["c1"] and d["total"]["since"] is None
    r = CliRunner().invoke(app, ["runs"], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    total_row = next(line for line in r.stdout.splitlines() if "total" in line and "3 runs" in line)
    assert "$0.10+?" in total_row  # $0.0333 + $0.0667; c1's dollars are only in its bucket
    assert "$0.07*" in r.stdout and "not in the total" in r.stdout and "c1" in r.stdout.split("not in the total")[1]


def test_runs_since_filters_by_launch_time(tmp_path, monkeypatch):
    spend_world(tmp_path, monkeypatch)

    def listed(*since):
        r = CliRunner().invoke(app, ["runs", "--json", "--since", *since])
        assert r.exit_code == 0, r.output
        d = json.loads(r.stdout)
        return [row["run_id"] for row in d["runs"]], d["total"]

    assert listed("2020-01-15")[0] == ["a1", "b1", "c1"]
    ids, total = listed("2020-01-16")
    assert ids == ["b1", "c1"] and total["runs"] == 2
    assert total["cost_so_far_usd"] == pytest.approx(40 / 3600 * 6, abs=1e-4)
    assert total["since"] == time.mktime(time.strptime("2020-01-16", "%Y-%m-%d"))
    assert listed("50h")[0] == ["b1", "c1"] and listed("1h")[0] == ["c1"]  # b1 was launched 1 h ago
    assert listed("7d")[0] == ["b1", "c1"]
    r = CliRunner().invoke(app, ["runs", "--since", "2020-01-16"], env={"COLUMNS": "250"})
    assert r.exit_code == 0 and "launched since 2020-01-16 00:00" in r.stdout and "a1" not in r.stdout
    r = CliRunner().invoke(app, ["runs", "--since", "3000-01-01"])
    assert r.exit_code == 0 and "no runs launched since 3000-01-01 00:00" in r.stdout


@pytest.mark.parametrize("text", ["yesterday", "7", "2020-13-01", "-3d", "7 days"])
def test_a_bad_since_is_one_line_and_exit_2(tmp_path, monkeypatch, text):
    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path / "g2"))
    r = CliRunner().invoke(app, ["runs", "--since", text])
    assert r.exit_code == 2 and f"--since '{text}': give a date" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1


def test_parse_since():
    assert parse_since("12h", 100_000.0) == 100_000 - 12 * 3600
    assert parse_since("2w", 2e6) == 2e6 - 14 * 86400 and parse_since("1.5d", 2e5) == 2e5 - 1.5 * 86400
    assert parse_since("2024-03-01", 0) == time.mktime((2024, 3, 1, 0, 0, 0, 0, 0, -1))
    with pytest.raises(UserError):
        parse_since("1y", 0)
