"""`--infra local`: the generated setup and run scripts on this machine, storage on a real S3 server.

- the whole flow: prepare -> upload -> launch (gpt2-tiny, 2 CPU ranks) -> status -> fetch -> sample;
- preemption: kill a run's whole process tree midway, launch the same run id again: it resumes from
  the bucket's newest checkpoint and its losses equal those of an uninterrupted run.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from gpt2cloud.backends.local import LocalBackend, node_state
from gpt2cloud.runs import registry
from gpt2cloud.cli import app
from gpt2cloud.processes import alive, kill_process_tree
from gpt2cloud.store import open_store
from model import sync
from model.metrics import parse_metrics

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240
SECRET = "local-run-secret-must-not-leak-0123"


@pytest.fixture
def local_env(tmp_path, monkeypatch, s3_server, s3_bucket):
    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path / "g2"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIALOCALRUNTEST0001")  # moto's server takes any credentials
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    yield tmp_path, f"s3://{s3_bucket}"
    for rec in registry.all_runs():  # never leave a run behind
        if rec.spec.local:
            LocalBackend(graceful_seconds=0).stop(rec)


def cli(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


def launch(recipe, name, data, bucket, *extra):
    return cli("launch", recipe, "--infra", "local", "--gpus", "H100:2", "--data", data, "--bucket", bucket,
               "--name", name, "--yes", "--push-every", "1", *extra)


def wait_done(run_id: str, timeout: float = TIMEOUT_S) -> str:
    rec = registry.get(run_id)
    d = Path(rec.handle.local_dir)
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = node_state(d)
        if state != "RUNNING":
            return state
        time.sleep(0.5)
    LocalBackend(graceful_seconds=0).stop(rec)
    pytest.fail(f"run {run_id} did not finish in {timeout} s; log:\n{(d / 'driver.log').read_text()[-3000:]}")


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def log_of(run_id: str) -> str:
    return (Path(registry.get(run_id).handle.local_dir) / "driver.log").read_text()


def test_whole_flow_prepare_launch_status_fetch_sample(local_env):
    tmp, bucket = local_env
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from tiny_corpus import write_corpus
    finally:
        sys.path.pop(0)
    write_corpus(tmp / "corpus.jsonl", docs=150)
    cli("data", "prepare", tmp / "corpus.jsonl", "--out", tmp / "shards", "--shard-tokens", "20000",
        "--val-tokens", "2048", "--workers", "1", "--json")
    cli("data", "upload", tmp / "shards", f"{bucket}/data", "--json")

    r = launch("gpt2-tiny", "flow", f"{bucket}/data", f"{bucket}/runs", "--steps", "6", "--max-cost", "5", "--json")
    out = json.loads(r.stdout)
    assert out["kind"] == "local" and out["pid"] > 0 and out["run_url"] == f"{bucket}/runs/flow"
    assert wait_done("flow") == "SUCCEEDED", log_of("flow")

    d = json.loads(cli("status", "flow", "--json").stdout)
    assert d["state"] == "SUCCEEDED" and d["finished"] and d["step"] == d["total_steps"] == 6
    assert d["loss"] < 11 and d["val_loss"] is not None and d["tokens_per_second"] > 0
    assert d["eta_hours"] == 0 and 0 < d["cost_so_far_usd"] < 5 and d["max_cost_usd"] == 5
    assert "node 0 of 1, 2 GPUs" in log_of("flow")

    f = json.loads(cli("fetch", "flow", "--dest", tmp / "fetched", "--logs", "--json").stdout)
    assert f["checkpoint"].endswith("step_000006") and f["metrics"] and f["logs"]
    from model.checkpoint import verify_checkpoint

    verify_checkpoint(f["checkpoint"])
    r = cli("sample", f["checkpoint"], "--max-new-tokens", "8")
    assert r.stdout.strip()
    # the node got the credentials (it reached the bucket), but no file or log holds them
    assert SECRET not in registry.path_for("flow").read_text() and SECRET not in log_of("flow")
    for p in (tmp / "fetched").rglob("*"):
        if p.is_file() and p.suffix in (".log", ".jsonl", ".json"):
            assert SECRET not in p.read_text(errors="replace"), p
    node = Path(registry.get("flow").handle.local_dir)
    assert all(SECRET not in p.read_text(errors="replace") for p in node.glob("*.sh"))


RECIPE = """name: sync-test
description: a small-vocabulary model whose CPU steps take milliseconds, for the preemption test
source: gpt2cloud tests
model: {n_layer: 2, n_head: 4, n_embd: 64, block_size: 64, vocab_size: 256, padded_vocab_size: 256}
train: {tokens_per_step: 1024, micro_batch: 8, steps: 120, seed: 1337, compile: false}
optimizer: {lr: 1.0e-2, min_lr_ratio: 0.1, warmup_steps: 5, weight_decay: 0.1}
data: {dataset: synthetic}
eval: {val_every: 40, val_steps: 1, sample_every: 1000, checkpoint_every: 10, keep_checkpoints: 2}
"""


def _losses(bucket: str, run_id: str) -> dict:
    text = open_store(f"{bucket}/runs/{run_id}").get_bytes("metrics.jsonl").decode()
    return {r["step"]: r["loss"] for r in parse_metrics(text) if "loss" in r and "step" in r}


def test_preempted_run_resumes_with_the_same_losses_and_budget_cap_stops(local_env):
    from trainer_helpers import make_shards

    from gpt2cloud.store.transfer import upload_dir

    tmp, bucket = local_env

    upload_dir(make_shards(tmp / "shards", train_tokens=(30000,), val_tokens=2000),
               open_store(f"{bucket}/data"), progress=False)
    recipe = tmp / "sync-test.yaml"
    recipe.write_text(RECIPE)
    args = (f"{bucket}/data", f"{bucket}/runs")
    launch(recipe, "victim", *args)
    launch(recipe, "reference", *args)
    # Alongside: a run that cannot finish within its budget. $1000 per GPU-hour on 2 "GPUs" is
    # $0.56/s, start-up included, so the $3 cap is hit within seconds (maybe before the first step).
    launch(recipe, "capped", *args, "--steps", "100000", "--price", "1000", "--max-cost", "3")

    # Kill the victim's whole tree (torchrun workers included) once the bucket has a checkpoint.
    store = open_store(f"{bucket}/runs/victim")
    deadline = time.time() + TIMEOUT_S
    while time.time() < deadline:
        complete, _ = sync.remote_checkpoints(store)
        if complete and complete[-1][0] >= 10:
            break
        assert node_state(Path(registry.get("victim").handle.local_dir)) == "RUNNING", log_of("victim")
        time.sleep(0.2)
    rec = registry.get("victim")
    tree = psutil.Process(rec.handle.pid).children(recursive=True)
    assert len([c for c in map(_cmdline, tree) if "model.train" in c and "torch.distributed.run" not in c]) == 2
    kill_process_tree(rec.handle.pid)  # SIGKILL, no goodbye: like a preempted VM
    assert node_state(Path(rec.handle.local_dir)) == "STOPPED"
    assert not [p.pid for p in tree if alive(p.pid, p.create_time())]
    killed_at = max(_losses(bucket, "victim"))
    resumable = sync.remote_checkpoints(store)[0][-1][0]
    assert resumable < 120 and killed_at < 120, "the victim finished before it was killed; make steps slower"

    # Same run id again: a fresh node, which pulls the newest complete checkpoint from the bucket.
    launch(recipe, "victim", *args)
    assert wait_done("victim") == "SUCCEEDED", log_of("victim")
    assert wait_done("reference") == "SUCCEEDED", log_of("reference")
    assert f"resuming from checkpoint step {resumable}" in log_of("victim")
    assert registry.get("victim").launches == 2

    resumed, reference = _losses(bucket, "victim"), _losses(bucket, "reference")
    assert sorted(resumed) == sorted(reference) == list(range(1, 121))
    # 2 ranks both, resumed from an exactly restored state: bitwise equal (observed 0). rel 1e-5 (5e-5 on a loss
    # of ~5) is margin over a reduction-order change (~1 ulp, 5e-7); a wrong data position moves a loss by ~4e-3.
    for step in reference:
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step
    d = json.loads(cli("status", "victim", "--json").stdout)
    assert d["restarts"] == 1 and d["step"] == 120 and d["finished"]

    # The budget: the trainer stopped cleanly before a step could pass the cap, with a checkpoint.
    assert wait_done("capped") == "SUCCEEDED", log_of("capped")
    d = json.loads(cli("status", "capped", "--json").stdout)
    assert d["budget_stopped"] and not d["finished"] and d["max_cost_usd"] == 3 and d["eta_hours"] == 0
    text = open_store(f"{bucket}/runs/capped").get_bytes("metrics.jsonl").decode()
    assert all(r["cost_usd"] <= 3 for r in parse_metrics(text) if "loss" in r)
    assert sync.remote_checkpoints(open_store(f"{bucket}/runs/capped"))[0][-1][0] == (d["step"] or 0)
    assert "budget: stopping at step" in log_of("capped")



# ---- down --graceful (issue 22, part 10) ----


def _training(bucket: str, run_id: str, step: int = 10) -> None:
    """Until the bucket holds a checkpoint of at least `step`: the run trains and its pusher pushes."""
    store = open_store(f"{bucket}/runs/{run_id}")
    deadline = time.time() + TIMEOUT_S
    while time.time() < deadline:
        complete, _ = sync.remote_checkpoints(store)
        if complete and complete[-1][0] >= step:
            return
        assert node_state(Path(registry.get(run_id).handle.local_dir)) == "RUNNING", log_of(run_id)
        time.sleep(0.2)
    pytest.fail(f"no checkpoint of step {step} in the bucket; log:\n{log_of(run_id)[-3000:]}")


def _graceful_setup(local_env, name: str, steps: int):
    from trainer_helpers import make_shards

    from gpt2cloud.store.transfer import upload_dir

    tmp, bucket = local_env
    upload_dir(make_shards(tmp / "shards", train_tokens=(30000,), val_tokens=2000),
               open_store(f"{bucket}/data"), progress=False)
    recipe = tmp / "sync-test.yaml"
    recipe.write_text(RECIPE)
    launch(recipe, name, f"{bucket}/data", f"{bucket}/runs", "--steps", str(steps))
    _training(bucket, name)
    return bucket


def _ends_with_a_checkpoint_at_its_last_step(bucket: str, run_id: str, d: dict) -> int:
    """What every graceful down that ended must leave: the job over, its node gone, the bucket's newest
    checkpoint at the last step its metrics know, nothing said lost, the request withdrawn."""
    rec = registry.get(run_id)
    store = open_store(f"{bucket}/runs/{run_id}")
    assert d["graceful"]["asked"] and d["graceful"]["ended"] and d["graceful"]["state"] == "SUCCEEDED", d
    assert "may_lose" not in d and d["action"] == "it was not running"  # the job had ended: nothing to kill
    assert node_state(Path(rec.handle.local_dir)) == "SUCCEEDED" and not alive(rec.handle.pid)
    last = max(_losses(bucket, run_id))
    assert sync.remote_checkpoints(store)[0][-1][0] == last
    assert not store.exists("stop_request.json") and rec.state == "DOWN"
    assert "stop requested by " in log_of(run_id)  # the node's pusher relayed it to OUT/stop_requested
    assert (Path(rec.handle.local_dir) / "node" / "out" / "stop_requested").is_file()
    return last


def test_down_graceful_stops_the_trainer_at_its_next_check_with_a_checkpoint(local_env):
    """The run would train for hours at this pace: only the request ends it. The node's pusher relays it,
    the trainer stops with a checkpoint, the final push carries it, the job ends and `down` sees that."""
    bucket = _graceful_setup(local_env, "long", steps=100000)
    d = json.loads(cli("down", "long", "--graceful", "--wait-minutes", "1", "--json").stdout)
    last = _ends_with_a_checkpoint_at_its_last_step(bucket, "long", d)
    assert 10 <= last < 100000 and d["graceful"]["waited_s"] < 60


def test_plain_down_of_a_local_run_says_what_it_may_lose(local_env):
    """A wait (0.3 s) that runs out long before a trainer could stop and exit, rule or not: the plain down
    follows, kills the tree and names the bucket's newest checkpoint as what the work since may be lost to."""
    bucket = _graceful_setup(local_env, "abrupt", steps=100000)
    r = cli("down", "abrupt", "--graceful", "--wait-minutes", "0.005", "--json")
    d = json.loads(r.stdout)
    rec = registry.get("abrupt")
    assert not d["graceful"]["ended"] and d["action"] == "killed its local process tree"
    assert d["may_lose"].startswith("the work since the bucket's newest checkpoint, step "), d
    assert not open_store(f"{bucket}/runs/abrupt").exists("stop_request.json") and not alive(rec.handle.pid)
