"""`gpt2cloud fetch`: checkpoints, metrics and logs from a run's bucket, sha256-verified, resumable."""

from __future__ import annotations

import json

import pytest
from run_helpers import fake_checkpoint, local_record, metrics_lines
from typer.testing import CliRunner

from gpt2cloud.cli import app
from gpt2cloud.store import open_store
from gpt2cloud.store.transfer import upload_dir


@pytest.fixture
def run(tmp_path, monkeypatch):
    """A run in the registry whose bucket holds checkpoints 5 and 10, a partial 15, metrics and a log."""
    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path / "g2"))
    rec = local_record(tmp_path, "f1")
    store = open_store(rec.spec.run_url)
    src = tmp_path / "src"
    for step in (5, 10):
        upload_dir(fake_checkpoint(src, step), store, f"checkpoints/step_{step:06d}", progress=False)
    partial = fake_checkpoint(src, 15, complete=False)
    store.put_file(partial / "model.safetensors", "checkpoints/step_000015/model.safetensors")
    store.put_bytes("metrics.jsonl", metrics_lines(15, 20).encode())
    store.put_bytes("logs/node-0.log", b"step 15/20\n")
    store.put_bytes("run.json", json.dumps({"run_id": "f1"}).encode())
    store.put_bytes("tensorboard/events.out.tfevents.1.node", b"ev")  # --tracker tensorboard's files
    return rec, store, tmp_path


def fetch(*args):
    return CliRunner().invoke(app, ["fetch", *args])


def test_latest_by_run_id(run):
    rec, store, tmp = run
    r = fetch("f1", "--dest", str(tmp / "dl"), "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["checkpoint"] == str(tmp / "dl" / "checkpoints" / "step_000010")
    assert out["available_steps"] == [5, 10] and [c["step"] for c in out["checkpoints"]] == [10]
    assert (tmp / "dl" / "checkpoints" / "step_000010" / "manifest.json").is_file()
    assert not (tmp / "dl" / "checkpoints" / "step_000005").exists()
    assert (tmp / "dl" / "metrics.jsonl").read_text() == metrics_lines(15, 20)
    assert (tmp / "dl" / "tensorboard" / "events.out.tfevents.1.node").read_bytes() == b"ev"
    assert out["logs"] == []
    from gpt2cloud.store.transfer import verify_dir

    verify_dir(out["checkpoint"])  # every file matches the trainer's manifest


def test_step_all_logs_and_url(run):
    rec, store, tmp = run
    out = json.loads(fetch("f1", "--step", "5", "--dest", str(tmp / "a"), "--json").stdout)
    assert out["checkpoint"].endswith("step_000005")
    out = json.loads(fetch(rec.spec.run_url, "--all", "--logs", "--dest", str(tmp / "b"), "--json").stdout)
    assert [c["step"] for c in out["checkpoints"]] == [5, 10] and out["run"] == "f1"
    assert (tmp / "b" / "logs" / "node-0.log").read_text() == "step 15/20\n"
    r = fetch("f1", "--step", "15", "--dest", str(tmp / "c"))
    assert r.exit_code == 2 and "no complete checkpoint of step 15" in r.output and "5, 10" in r.output
    r = fetch("f1", "--all", "--step", "5")
    assert r.exit_code == 2 and "choose one of" in r.output


def test_interrupted_download_resumes(run):
    rec, store, tmp = run
    dest = tmp / "dl"
    assert fetch("f1", "--dest", str(dest)).exit_code == 0
    ck = dest / "checkpoints" / "step_000010"
    # as if interrupted: the manifest (written last) and one file missing, another half-written
    (ck / "manifest.json").unlink()
    (ck / "optimizer.pt").unlink()
    (ck / "model.safetensors").write_bytes(b"partial")
    out = json.loads(fetch("f1", "--dest", str(dest), "--json").stdout)
    (entry,) = out["checkpoints"]
    assert entry["downloaded"] == 2 and entry["skipped"] == 1
    from gpt2cloud.store.transfer import verify_dir

    verify_dir(ck)


def test_corrupt_object_in_the_bucket_is_refused(run):
    rec, store, tmp = run
    store.put_bytes("checkpoints/step_000010/optimizer.pt", b"bit rot")
    r = fetch("f1", "--dest", str(tmp / "dl"))
    assert r.exit_code == 2 and "step_000010" in r.output
    assert not (tmp / "dl" / "checkpoints" / "step_000010" / "manifest.json").exists()


def test_nothing_there(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path / "g2"))
    r = fetch((tmp_path / "nothing" / "r9").as_uri())
    assert r.exit_code == 2 and "nothing to fetch" in r.output


def test_registry_remembers_where_fetch_put_the_run(run, monkeypatch):
    """`fetch RUN --dest DIR` notes DIR in the run's record; plot/report then find the run by its id."""
    from gpt2cloud.runs import registry
    from gpt2cloud.runs.rundata import load_run, run_dir_candidates

    rec, store, tmp = run
    monkeypatch.chdir(tmp)
    assert registry.get("f1").fetched_dir is None
    r = fetch("f1", "--dest", "elsewhere/f1-copy")  # a relative --dest is stored absolute
    assert r.exit_code == 0, r.output
    dest = (tmp / "elsewhere" / "f1-copy").resolve()
    assert registry.get("f1").fetched_dir == str(dest)
    monkeypatch.chdir(tmp / "elsewhere")  # not where ./runs/f1 (fetch's default) would be
    assert run_dir_candidates(registry.get("f1"))[0] == dest
    data = load_run("f1")
    assert data.out_dir == dest and data.record.run_id == "f1" and data.last_step == 15
    # fetching by the run's bucket URL is the same run: noted too
    assert fetch(rec.spec.run_url, "--dest", str(tmp / "by-url")).exit_code == 0
    assert registry.get("f1").fetched_dir == str((tmp / "by-url").resolve())
    # a failed fetch leaves the record as it was
    assert fetch("f1", "--step", "15", "--dest", str(tmp / "bad")).exit_code == 2
    assert registry.get("f1").fetched_dir == str((tmp / "by-url").resolve())
