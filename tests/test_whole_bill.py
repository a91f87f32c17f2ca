"""The whole bill after the run: report compares every phase of the all-in estimate with the node's
timeline, and records the per-launch phases so that later estimates use them."""

from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner

from gpt2cloud.cli import app
from gpt2cloud.cost.estimate import estimate
from gpt2cloud.cost.recipes import load_recipe
from gpt2cloud.home import user_calibration_path
from gpt2cloud.runs import registry
from model.metrics import RunMetrics


def write_run(out, launched: float, steps: int = 30) -> None:
    """A finished local run's OUT: the node came up 2 s after the launch, set up for 3 s, pulled and
    downloaded for 1 s, started training 1 s later; the first step came 8 s after that."""
    up = launched + 2
    timeline = [{"event": "node_up", "time": up}, {"event": "setup", "start": up, "time": up + 3},
                {"event": "pull", "start": up + 3, "time": up + 3.5}, {"event": "data", "start": up + 3.5, "time": up + 4},
                {"event": "train_start", "time": up + 5}]
    t = up + 5 + 8
    rows = [{"event": "start", "world_size": 2, "device": "cpu", "config": {"steps": steps}, "time": up + 6}]
    for s in range(1, steps + 1):
        t += 1.0 if s > 1 else 0
        rows.append({"step": s, "loss": 5.0, "step_seconds": 1.0, "tokens_per_second": 1024.0, "tokens_seen": 1024 * s,
                     "elapsed_seconds": t - up, "time": t})
        if s % 10 == 0:
            t += 0.5
            rows.append({"step": s, "val_loss": 5.0, "seconds": 0.5, "time": t})
    rows.append({"event": "end", "step": steps, "final_loss": 5.0, "time": t + 0.1})
    timeline += [{"event": "train_end", "time": t + 1, "code": 0}, {"event": "final_push", "time": t + 1.2}]
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "timeline.jsonl").write_text("".join(json.dumps(r) + "\n" for r in timeline))


def test_phases_measured_from_the_timeline(tmp_path):
    write_run(tmp_path, launched=1000.0)
    m = RunMetrics.read(tmp_path / "metrics.jsonl", tmp_path / "timeline.jsonl")
    s = m.phase_seconds()
    assert s["setup"] == pytest.approx(3) and s["data"] == pytest.approx(1) and s["training"] == pytest.approx(30)
    assert s["compile"] == pytest.approx(7) and s["evals"] == pytest.approx(1.5)  # 8 s to the first step, 1 s of it the step
    assert m.node_seconds() == pytest.approx(5 + 8 + 29 + 1.5 + 1.2)
    assert m.phase() == "final push, then exit"


def test_report_compares_every_phase_and_calibrates_them(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path / "g2"))
    monkeypatch.chdir(tmp_path)
    launched = time.time() - 3600
    est = estimate(load_recipe("gpt2-tiny"), gpu_type="CPU", gpus_per_node=2, steps=30, local=True)
    spec = registry.RunSpec(run_id="bill1", kind="local", infra="local", run_url="file:///tmp/b/bill1",
                            bucket="file:///tmp/b", data_url="file:///tmp/d", recipe="gpt2-tiny", gpu_type="CPU",
                            gpus_per_node=2, nodes=1, spot=False, price_per_gpu_hour=est.price_per_gpu_hour,
                            total_steps=30, estimate=est)
    registry.save(registry.RunRecord(spec=spec, started_at=launched))
    write_run(tmp_path / "runs" / "bill1", launched)
    r = CliRunner().invoke(app, ["report", "bill1"])
    assert r.exit_code == 0, r.output
    md = (tmp_path / "runs" / "bill1" / "report.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:5]]
            for line in md.split("## The whole bill, phase by phase")[1].splitlines() if line.startswith("| ")}
    assert rows["setup"][1] == "3 s" and rows["provisioning"][1] == "2 s" and rows["compile"][1] == "7 s"
    assert rows["training"][1] == "30 s" and rows["**all-in, without idle**"][1] == "47 s"
    assert rows["training"][2].endswith("%")
    # the per-launch phases feed the next estimate: the local defaults give way to this run's
    points = [json.loads(line) for line in user_calibration_path().read_text().splitlines()]
    phases = {p["phase"]: p.get("hours", p.get("value")) for p in points if p.get("kind") == "phase"}
    assert phases == {"provisioning": pytest.approx(2 / 3600), "setup": pytest.approx(3 / 3600),
                      "compile": pytest.approx(7 / 3600), "finish": pytest.approx(0.9 / 3600)}  # 0.5 s data: too short to time
    again = estimate(load_recipe("gpt2-tiny"), gpu_type="CPU", gpus_per_node=2, steps=30, local=True)
    assert again.breakdown_hours["setup"] == pytest.approx(3 / 3600)
    assert "median of 1 of your runs" in again.phase_sources["setup"]
    assert CliRunner().invoke(app, ["report", "bill1"]).exit_code == 0  # once per run
    assert len(user_calibration_path().read_text().splitlines()) == len(points)


def test_a_damaged_calibration_file_breaks_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path))
    user_calibration_path().write_bytes(b'{"gpu": "H100", "params": 1\n\x00\xff not json\n[1, 2]\n')
    r = CliRunner().invoke(app, ["estimate", "gpt2-124m", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["all_in_hours"] > 0


def test_a_timed_download_calibrates_the_data_rate(tmp_path, monkeypatch):
    from gpt2cloud.cost.phases import defaults
    from gpt2cloud.runs.calibrate import record_phases
    from gpt2cloud.runs.rundata import read_metrics

    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path / "g2"))
    spec = registry.RunSpec(run_id="rate1", kind="local", infra="local", run_url="file:///tmp/b/rate1",
                            bucket="file:///tmp/b", data_url="file:///tmp/d", recipe="gpt2-tiny", gpu_type="CPU",
                            gpus_per_node=2, nodes=1, spot=False, price_per_gpu_hour=0.05, total_steps=30,
                            estimate=None)
    write_run(tmp_path / "out", launched=1000.0)
    with open(tmp_path / "out" / "timeline.jsonl", "a") as f:  # a second attempt downloaded 300 MB in 2 s
        f.write(json.dumps({"event": "data", "start": 5000.0, "time": 5002.0, "bytes": 300_000_000}) + "\n")
    points, _ = record_phases(read_metrics(tmp_path / "out", spec=spec))
    assert [p["value"] for p in points if p["phase"] == "data_mb_per_s"] == [150.0]
    value, source = defaults(local=True)["data_mb_per_s"]
    assert value == 150.0 and "your runs" in source
