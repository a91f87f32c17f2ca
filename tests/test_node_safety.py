"""What keeps a node from billing for nothing, run for real on CPU: the stall watchdog on a hung rank,
the refusal of a torch that sees no GPU (in setup and in the trainer), the wall-time limit, and a
failed final push that fails the job instead of letting autostop delete the only copy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil
import pytest
from trainer_helpers import REPO, env, make_shards, read_metrics, tiny_config, trainer_cmd, write_config

from gpt2cloud.launch import scripts, task
from model import deadman, sync
from model.checkpoint import latest_checkpoint
from model.watchdog import EXIT_STALLED, STALLED


def test_watchdog_ends_a_run_whose_rank_hangs(tmp_path):
    """Rank 1 stops (SIGSTOP, as a wedged GPU or a lost peer would) after a few steps: rank 0 waits in
    its all-reduce forever, its watchdog fires, and torchrun ends the job, non-zero, within seconds."""
    data, out = make_shards(tmp_path / "data", train_tokens=(60000,)), tmp_path / "out"
    cfg = write_config(tmp_path / "c.json", tiny_config(steps=100000, checkpoint_every=5, stall_minutes=0.1,
                                                        val_every=100000, sample_every=0))
    log = open(tmp_path / "log.txt", "w")
    proc = subprocess.Popen(trainer_cmd(cfg, data, out, 2), cwd=REPO, env=env(), stdout=log,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and latest_checkpoint(out) is None:  # a few steps done, and saved
            time.sleep(0.1)
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "model.train" in " ".join(p.cmdline()) and "torch.distributed.run" not in " ".join(p.cmdline())]
        rank1 = next(p for p in workers if p.environ().get("RANK") == "1")
        rank1.suspend()
        t0 = time.time()
        while time.time() - t0 < 60 and not (out / STALLED).exists():
            time.sleep(0.1)
        fired = time.time() - t0
        # a hung rank still takes signals (a stopped one only after SIGCONT): torchrun's SIGTERM ends it
        rank1.resume()
        code = proc.wait(timeout=90)
        waited = time.time() - t0
    finally:
        for p in psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []:
            p.kill()
        proc.kill()
    output = (tmp_path / "log.txt").read_text()
    assert code != 0 and (out / STALLED).is_file(), output[-2000:]
    assert "watchdog: nothing finished" in output and fired < 20 and waited < 60, (fired, waited, output[-2000:])


def test_trainer_refuses_cpu_when_gpus_were_asked_for(tmp_path):
    data, out = make_shards(tmp_path / "data"), tmp_path / "out"
    cfg = write_config(tmp_path / "c.json", tiny_config(device="cuda"))
    p = subprocess.run(trainer_cmd(cfg, data, out, None), cwd=REPO, env=env(), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "sees 0 CUDA devices" in p.stderr and "Traceback" not in p.stderr
    assert not (out / "checkpoints").exists()


def test_setup_refuses_a_torch_that_sees_no_gpu(tmp_path):
    """The node's setup, with this machine's CPU-only torch standing in for a wheel that does not match
    the driver: it stops within seconds, with its own exit code, before anything trains."""
    script = scripts.render(scripts.SETUP_SCRIPT)
    e = {**os.environ, "GPT2CLOUD_PYTHON": sys.executable, "GPT2CLOUD_NODE_HOME": str(tmp_path / "node"),
         "GPT2CLOUD_DEVICE": "cuda", "GPT2CLOUD_GPUS_PER_NODE": "8", "GPT2CLOUD_BUILD": "test"}
    t0 = time.time()
    p = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=e, capture_output=True, text=True, timeout=60)
    assert p.returncode == scripts.EXIT_NO_GPU, p.stdout + p.stderr
    assert "sees 0 of the 8 GPUs" in p.stderr and time.time() - t0 < 30
    # CPU ranks (--infra local) skip the check and go on to install the build
    p = subprocess.run(["bash", "-c", script], cwd=tmp_path, env={**e, "GPT2CLOUD_DEVICE": "auto"},
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != scripts.EXIT_NO_GPU and "sees 0 of" not in p.stderr


def test_max_hours_stops_the_run_with_a_checkpoint(tmp_path):
    data, out = make_shards(tmp_path / "data", train_tokens=(60000,)), tmp_path / "out"
    # 10 s: the trainer's clock starts before the model is built and the first batch read, which took
    # 4.7 s beside a busy core; the run must get some steps in before the limit.
    cfg = write_config(tmp_path / "c.json", tiny_config(steps=100000, checkpoint_every=1000, max_hours=10 / 3600))
    p = subprocess.run(trainer_cmd(cfg, data, out, None), cwd=REPO, env=env(), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    stop = [r for r in read_metrics(out) if r.get("event") == "time_stop"]
    assert len(stop) == 1 and 0 < stop[0]["step"] < 100000 and stop[0]["elapsed_seconds"] <= 10 + 1
    assert (out / "checkpoints" / f"step_{stop[0]['step']:06d}" / "manifest.json").is_file()


def test_final_push_retries_then_fails(tmp_path):
    """A bucket the pusher cannot write to: every attempt of the final push fails, with backoff, and
    the pusher's exit code says so (the run script turns it into the job's failure)."""
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "node-0.log").write_text("the node's log\n")
    bucket = tmp_path / "bucket" / "r"
    bucket.mkdir(parents=True)
    (bucket / "logs").write_text("a file where the logs directory should be")  # every write under logs/ fails
    t0 = time.time()
    code = sync.push_loop(str(out), bucket.as_uri(), every=60, rank=0, keep=0, once=True, retry_seconds=0.05)
    assert code == sync.EXIT_FINAL_PUSH
    assert time.time() - t0 >= 0.05 * (1 + 2 + 4 + 8)  # it backed off between the attempts


def test_a_failed_final_push_fails_the_job(tmp_path):
    """The node's run script, end to end on this machine: the trainer finishes, the final push cannot
    reach the bucket, and the job exits EXIT_FINAL_PUSH with the command that saves the checkpoint."""
    from gpt2cloud.launch import build
    from gpt2cloud.store.transfer import upload_dir

    data = make_shards(tmp_path / "shards")
    upload_dir(data, __import__("gpt2cloud.store", fromlist=["open_store"]).open_store((tmp_path / "data").as_uri()),
               progress=False)
    run_dir = tmp_path / "bucket" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "logs").write_text("blocks logs/: the node's log can never be pushed")
    workdir = tmp_path / "workdir"
    build.write_workdir(workdir, build.wheel_bytes(), tiny_config(steps=4).to_json(), "")
    e = {**env(), "GPT2CLOUD_PYTHON": sys.executable, "GPT2CLOUD_NODE_HOME": str(tmp_path / "node"),
         "GPT2CLOUD_DEVICE": "auto", "GPT2CLOUD_GPUS_PER_NODE": "1", "GPT2CLOUD_BUILD": "test", "GPT2CLOUD_TORCH_SPEC": "torch",
         "GPT2CLOUD_RUN_ID": "r1", "GPT2CLOUD_RUN_URL": run_dir.as_uri(), "GPT2CLOUD_DATA_URL": (tmp_path / "data").as_uri(),
         "GPT2CLOUD_PUSH_EVERY": "1", "GPT2CLOUD_KEEP_CHECKPOINTS": "2", "GPT2CLOUD_PUSH_RETRY_SECONDS": "0.05",
         "SKYPILOT_NODE_RANK": "0", "SKYPILOT_NODE_IPS": "127.0.0.1", "SKYPILOT_NUM_NODES": "1",
         "SKYPILOT_NUM_GPUS_PER_NODE": "1", "GPT2CLOUD_MASTER_PORT": "29731"}
    e.pop("PYTHONPATH", None)
    for script in (scripts.SETUP_SCRIPT, scripts.RUN_SCRIPT):
        p = subprocess.run(["bash", "-c", scripts.render(script)], cwd=workdir, env=e, capture_output=True, text=True,
                           timeout=240)
        if script is scripts.SETUP_SCRIPT:
            assert p.returncode == 0, p.stdout + p.stderr
    log = p.stdout + p.stderr
    assert p.returncode == sync.EXIT_FINAL_PUSH, log[-3000:]
    assert "FINAL PUSH FAILED" in log and "rsync -a r1:" in log
    # the checkpoint itself made it (only the log is blocked), and the node still holds everything
    assert (run_dir / "checkpoints" / "step_000004" / "manifest.json").is_file()
    assert (tmp_path / "node" / "out" / "checkpoints" / "step_000004" / "manifest.json").is_file()
    # the node's timeline, in the bucket: every phase, in order, with its span
    lines = [json.loads(line) for line in (run_dir / "timeline.jsonl").read_text().splitlines()]
    # data_complete comes from the background download, whenever it is done (tests/test_streaming_data.py)
    timeline = [e for e in lines if e["event"] != "data_complete"]
    events = [e["event"] for e in timeline]
    assert events == ["node_up", "setup", "pull", "data", "train_start", "train_end", "final_push"], events
    assert [e["event"] for e in lines].count("data_complete") == 1
    assert all(e["time"] >= timeline[0]["time"] for e in timeline) and timeline[5]["code"] == 0
    assert timeline[3]["bytes"] > 0 and timeline[1]["time"] >= timeline[1]["start"]


def test_a_stalled_run_exits_with_the_recoverable_code(tmp_path):
    """The run script turns the watchdog's marker into EXIT_STALLED, the one code a managed job recovers from."""
    run = scripts.render(scripts.RUN_SCRIPT)
    assert f'RC={EXIT_STALLED}' in run and f'rm -f "$OUT/{STALLED}"' in run
    # and a setup or trainer start-up that hung: one node's transient faults (model/deadman.py RECOVERABLE)
    recovered = [EXIT_STALLED, deadman.EXIT_SETUP_HUNG, deadman.EXIT_STARTUP_HUNG]
    assert task.JOB_RECOVERY["recover_on_exit_codes"] == recovered
    assert task.JOB_RECOVERY["max_restarts_on_errors"] == 0  # a bad config or bad data is not retried


def test_the_node_caps_at_its_own_price_and_counts_node_time(tmp_path):
    """On a node, the trainer's cost (and so its cap) counts node time since the node came up plus the
    earlier attempts' (from the bucket's timeline), at the price of the cloud the node landed on."""
    data, out = make_shards(tmp_path / "data"), tmp_path / "out"
    out.mkdir()
    now = time.time()
    # an earlier attempt: up for 2 hours (its last line pushed 2 h after it came up), then preempted
    (out / "timeline.jsonl").write_text(json.dumps({"event": "node_up", "time": now - 10_000}) + "\n" +
                                       json.dumps({"event": "train_start", "time": now - 10_000 + 7_200}) + "\n")
    # an any_of launch: cloud_prices holds each candidate's price and SkyPilot names the cloud the node landed on
    # (model/config.py price_here); the config's own price is only for a node that cannot tell where it is
    cfg = write_config(tmp_path / "c.json", tiny_config(steps=3, price_per_gpu_hour=1.0, max_cost_usd=1000.0,
                                                        cloud_prices={"aws": 2.0, "gcp": 1.0}))
    e = {**env(), "GPT2CLOUD_NODE_UP": f"{now - 1800:.3f}", "SKYPILOT_CLUSTER_INFO": json.dumps({"cloud": "AWS"})}
    p = subprocess.run(trainer_cmd(cfg, data, out, None), cwd=REPO, env=e, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    first = next(r for r in read_metrics(out) if "loss" in r)
    assert 7200 + 1800 <= first["elapsed_seconds"] < 7200 + 1800 + 60
    assert first["cost_usd"] == pytest.approx(first["elapsed_seconds"] / 3600 * 2.0)  # the node's price, not 1.0
    # a cap already passed by the node time: the trainer stops before its first step
    cfg = write_config(tmp_path / "c2.json", tiny_config(steps=3, price_per_gpu_hour=2.0, max_cost_usd=0.5))
    p = subprocess.run(trainer_cmd(cfg, data, tmp_path / "out2", None), cwd=REPO, env=e, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    stop = [r for r in read_metrics(tmp_path / "out2") if r.get("event") == "budget_stop"]
    assert stop and stop[0]["step"] == 0 and stop[0]["cost_usd"] == pytest.approx(1800 / 3600 * 2.0, rel=0.05)
