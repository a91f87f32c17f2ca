"""Progress from metrics.jsonl, and `gpt2cloud status` / `runs` for a local run (no SkyPilot needed)."""

from __future__ import annotations

import json

import pytest
from run_helpers import local_record, metrics_lines
from sky_offline import sky_home, sky_mod  # noqa: F401  (fixtures)
from typer.testing import CliRunner

from gpt2cloud.backends.skypilot import SkyHandle
from gpt2cloud.cli import app
from gpt2cloud.runs.status import progress
from gpt2cloud.store import open_store
from model.metrics import RunMetrics


def summarize(text, total_steps, gpus, price_per_gpu_hour, max_cost_usd=0.0):
    return progress(RunMetrics.from_text(text), total_steps, gpus, price_per_gpu_hour, max_cost_usd)


def test_summary_of_a_running_run():
    p = summarize(metrics_lines(10, 20, price=3.0, gpus=2), 99, gpus=2, price_per_gpu_hour=3.0)
    assert p["step"] == 10 and p["total_steps"] == 20 and p["loss"] == pytest.approx(9.0)
    assert p["tokens_per_second"] == 512.0 and p["eta_hours"] == pytest.approx(10 * 2.0 / 3600)
    assert p["cost_so_far_usd"] == pytest.approx(20 / 3600 * 2 * 3, abs=1e-4)
    assert p["cost_projected_usd"] == pytest.approx(40 / 3600 * 2 * 3, abs=1e-4)
    assert not p["finished"] and p["restarts"] == 0


def test_resumed_run_budget_stop_and_broken_lines():
    text = (metrics_lines(8, 20) + '{"step": 9, "loss": 1.0, "step_seconds"\n'  # cut short by a kill
            + metrics_lines(12, 20, start=6)  # the resumed run redoes 6..8
            + json.dumps({"step": 12, "val_loss": 8.5}) + "\n"
            + json.dumps({"event": "budget_stop", "step": 12, "cost_usd": 0.05}) + "\n")
    p = summarize(text, 20, gpus=2, price_per_gpu_hour=3.0, max_cost_usd=0.05)
    assert p["step"] == 12 and p["restarts"] == 1 and p["val_loss"] == 8.5 and p["budget_stopped"]
    assert p["eta_hours"] == 0 and p["cost_projected_usd"] == p["cost_so_far_usd"]


def test_no_metrics_yet():
    p = summarize("", 20, gpus=8, price_per_gpu_hour=3.0)
    assert p["step"] is None and p["cost_so_far_usd"] == 0 and p["eta_hours"] is None


def test_status_of_a_finished_local_run(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path / "g2"))
    rec = local_record(tmp_path, "loc1", max_cost_usd=5.0)
    (tmp_path / "node").mkdir()
    (tmp_path / "node" / "exit_code").write_text("0\n")
    text = metrics_lines(20, 20) + json.dumps({"event": "end", "step": 20, "final_loss": 8.0}) + "\n"
    open_store(rec.spec.run_url).put_bytes("metrics.jsonl", text.encode())
    r = CliRunner().invoke(app, ["status", "loc1", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    for key in ("run", "state", "step", "total_steps", "loss", "tokens_per_second", "eta_hours",
                "cost_so_far_usd", "cost_projected_usd"):
        assert key in d
    assert d["state"] == "SUCCEEDED" and d["finished"] and d["step"] == 20 and d["max_cost_usd"] == 5.0
    r = CliRunner().invoke(app, ["status", "loc1"])
    assert r.exit_code == 0 and "of a $5.00 cap" in r.stdout and "finished" in r.stdout
    (tmp_path / "node" / "exit_code").unlink()
    assert json.loads(CliRunner().invoke(app, ["status", "--json"]).stdout)[0]["state"] == "STOPPED"
    r = CliRunner().invoke(app, ["runs", "--json"])
    assert json.loads(r.stdout)["runs"][0]["run_id"] == "loc1"


def test_status_of_a_gone_cluster_only_reads(sky_mod, tmp_path, monkeypatch):
    """A finished GPU run whose cluster autostop removed: TERMINATED, its progress, and nothing written
    (calibration is `gpt2cloud report`'s job)."""
    from gpt2cloud.backends import sky_sdk

    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path / "g2"))
    rec = local_record(tmp_path, "gpu1", kind="cluster", infra="lambda", handle=SkyHandle(cluster="gpu1"))
    monkeypatch.setattr(sky_sdk, "cluster_status", lambda name: None)  # autostop took the cluster down
    model = {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024, "vocab_size": 50257,
             "padded_vocab_size": 50304}
    rows = [{"event": "start", "world_size": 2, "device": "cuda",
             "config": {"steps": 60, "model": model, "peak_flops_per_gpu": 989e12}}]
    rows += [{"step": s, "loss": 5.0, "step_seconds": 1.0, "tokens_per_second": 9.2e5, "mfu": 0.4,
              "elapsed_seconds": float(s)} for s in range(1, 61)]
    rows.append({"event": "end", "step": 60, "final_loss": 5.0})
    open_store(rec.spec.run_url).put_bytes("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    d = json.loads(CliRunner().invoke(app, ["status", "gpu1", "--json"]).stdout)
    assert d["state"] == "TERMINATED" and d["finished"] and d["tokens_per_second"] == 9.2e5
    assert "calibration" not in d and not (tmp_path / "g2" / "calibration.jsonl").exists()
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_status_report_and_train_show_one_speed(tmp_path, monkeypatch):
    """One finished run, one tokens/s: status, report and train all read model/metrics.py's RunMetrics."""
    from gpt2cloud.runs.rundata import load_run
    from gpt2cloud.train import summarize as train_summary

    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path / "g2"))
    rec = local_record(tmp_path, "speed1")
    out = tmp_path / "out"
    out.mkdir()
    rows = [{"event": "start", "world_size": 2, "device": "cpu", "config": {"steps": 40}}]
    for s in range(1, 41):  # slow warm-up, a resume at step 21 whose first step is slow again
        if s == 21:
            rows.append({"event": "start", "world_size": 2, "device": "cpu", "config": {"steps": 40}})
        tok_s = 100.0 if s in (1, 2, 21) else 1000.0 + s
        rows.append({"step": s, "loss": 5.0, "step_seconds": 1024 / tok_s, "tokens_per_second": tok_s,
                     "tokens_seen": 1024 * s, "elapsed_seconds": float(s), "cost_usd": s * 0.001})
    rows.append({"event": "end", "step": 40, "final_loss": 5.0})
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (out / "metrics.jsonl").write_text(text)
    open_store(rec.spec.run_url).put_bytes("metrics.jsonl", text.encode())

    status = json.loads(CliRunner().invoke(app, ["status", "speed1", "--json"]).stdout)["tokens_per_second"]
    trained = train_summary(out)["tokens_per_second"]
    reported = load_run(str(out)).steady_tokens_per_second()  # what report and plot show
    assert status == trained == reported
    steady = sorted(1000.0 + s for s in range(6, 41) if s != 21)  # warm-up and the resume's first step dropped
    assert status == pytest.approx((steady[len(steady) // 2 - 1] + steady[len(steady) // 2]) / 2)


def test_a_failed_job_says_how_to_save_the_checkpoint_left_on_the_node(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path / "g2"))
    rec = local_record(tmp_path, "fail1", kind="cluster", infra="lambda", handle=SkyHandle(cluster="fail1"),
                       idle_minutes=10)
    rows = metrics_lines(10, 20) + json.dumps({"event": "checkpoint", "step": 10, "path": "x"}) + "\n"
    open_store(rec.spec.run_url).put_bytes("metrics.jsonl", rows.encode())  # metrics pushed, the checkpoint not
    monkeypatch.setattr("gpt2cloud.runs.status.state_of", lambda r: "FAILED")
    d = json.loads(CliRunner().invoke(app, ["status", "fail1", "--json"]).stdout)
    assert "checkpoint step 10 is not in the bucket" in d["note"] and "within 10 min" in d["note"]
    assert "rsync -a fail1:~/.gpt2cloud-node/out/ runs/fail1/" in d["note"]
