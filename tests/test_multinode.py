"""`--infra local --nodes N` (issue 23): N nodes on this machine, each through the node's own setup and run
scripts, with SkyPilot's variables, each its own directory, data stream and log; one run to `status`,
`logs`, `fetch` and `down`. The nodes meet at a bounded rendezvous before torchrun's.

The runs behind the slow tests start together, once (`launched`): the run trained by `gpt2cloud train
--nproc 2` (one node, two ranks: the reference); a run of two nodes of one rank whose node 1 is killed
mid-run (the victim), then launched again to the end; and two runs that lose a node at once (node 1; node
0) and so wait at the rendezvous for a node that never comes. Each test then checks one part of what
happened. Storage is file:// (no S3 server in this process). ~50 s on 2 cores.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from run_helpers import bucket_losses, kill_node, wait_local
from sky_offline import sky_home, sky_mod  # noqa: F401  (fixtures)
from trainer_helpers import make_shards
from typer.testing import CliRunner

from gpt2cloud.backends.local import (RUN_ONLY, SETUP_ONLY, LocalBackend, free_port, node_dirs, node_state, run_state,
                                     skypilot_envs)
from gpt2cloud.cli import app
from gpt2cloud.launch import task
from gpt2cloud.runs import registry
from gpt2cloud.store import open_store
from gpt2cloud.store.transfer import upload_dir
from model import deadman, sync
from model.metrics import parse_metrics

REPO = Path(__file__).resolve().parents[1]
STEPS = 80
RECIPE = f"""name: multinode-test
description: a small-vocabulary model whose CPU steps take milliseconds
source: gpt2cloud tests
model: {{n_layer: 2, n_head: 4, n_embd: 64, block_size: 64, vocab_size: 256, padded_vocab_size: 256}}
train: {{tokens_per_step: 1024, micro_batch: 8, steps: {STEPS}, seed: 1337, compile: false}}
optimizer: {{lr: 1.0e-2, min_lr_ratio: 0.1, warmup_steps: 5, weight_decay: 0.1}}
data: {{dataset: synthetic}}
eval: {{val_every: 40, val_steps: 1, sample_every: 1000, checkpoint_every: 10, keep_checkpoints: 2}}
"""
BOUND_S = 4  # the rendezvous's bound for the runs that lose a node (GPT2CLOUD_BOUND_RENDEZVOUS)
STOP_BOUND_S = 60  # how soon a node must end once its peer is gone (observed ~5 s: gloo sees its sockets close)
TIMEOUT_S = 180


def cli(*args) -> str:
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.stdout


@dataclass
class Launched:
    home: Path  # $GPT2CLOUD_HOME of the runs
    tmp: Path
    bucket: str  # file:// URL
    reference: subprocess.Popen  # `gpt2cloud train --nproc 2` into tmp/reference
    victim: dict = field(default_factory=dict)  # what happened to the victim's first attempt

    def launch(self, name: str) -> None:
        cli("launch", self.tmp / "recipe.yaml", "--infra", "local", "--nodes", "2", "--gpus", "CPU:1",
            "--data", f"{self.bucket}/data", "--bucket", f"{self.bucket}/runs", "--name", name, "--yes",
            "--push-every", "1")

    def log(self, name: str, rank: int = 0) -> str:
        return (node_dirs(registry.get(name).node_dir)[rank] / "driver.log").read_text()


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multinode")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPT2CLOUD_HOME", str(tmp / "g2"))
        mp.setenv("OMP_NUM_THREADS", "1")
        shards = make_shards(tmp / "shards", train_tokens=(30000,), val_tokens=2000)
        bucket = (tmp / "bucket").as_uri()
        upload_dir(shards, open_store(f"{bucket}/data"), progress=False)
        (tmp / "recipe.yaml").write_text(RECIPE)
        with open(tmp / "reference.log", "wb") as log:
            reference = subprocess.Popen(
                [sys.executable, "-m", "gpt2cloud", "train", str(tmp / "recipe.yaml"), "--data", str(shards), "--out",
                 str(tmp / "reference"), "--nproc", "2"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        runs = Launched(tmp / "g2", tmp, bucket, reference)
        try:
            runs.launch("victim")
            mp.setenv("GPT2CLOUD_BOUND_RENDEZVOUS", str(BOUND_S))
            for name, lost in (("lonely", 1), ("headless", 0)):  # a node lost at once: it never gets there
                runs.launch(name)
                kill_node(name, lost)
            mp.delenv("GPT2CLOUD_BOUND_RENDEZVOUS")
            runs.victim = kill_a_node_mid_run(runs, "victim")
            runs.launch("victim")  # the same name again: fresh nodes, resuming from the bucket
            yield runs
        finally:
            for rec in registry.all_runs():  # never leave a run behind
                LocalBackend(graceful_seconds=0).stop(rec)
            reference.kill()
            reference.wait()


def kill_a_node_mid_run(runs: Launched, name: str) -> dict:
    """Once the bucket holds a checkpoint of step 10, node 1 goes, its whole tree at once (a preempted VM:
    SIGKILL, no goodbye); then how the run ended, how soon, what was left running, and the bucket's newest
    checkpoint and last step."""
    store = open_store(f"{runs.bucket}/runs/{name}")
    rec = registry.get(name)
    deadline = time.time() + TIMEOUT_S
    while not any(step >= 10 for step, _ in sync.remote_checkpoints(store)[0]):
        assert run_state(rec.node_dir) == "RUNNING" and time.time() < deadline, runs.log(name)[-3000:]
        time.sleep(0.2)
    kill_node(name, 1)
    killed = time.time()
    state = wait_local(name, STOP_BOUND_S)
    homes = [str(d / "node") for d in node_dirs(rec.node_dir)]
    left = [" ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])]
    return {"state": state, "stopped_after": time.time() - killed,
            "left": [c for c in left if any(h in c for h in homes)],
            "resumable": sync.remote_checkpoints(store)[0][-1][0],
            "last_step": max(bucket_losses(f"{runs.bucket}/runs/{name}"))}


@pytest.fixture
def runs(launched, monkeypatch):
    monkeypatch.setenv("GPT2CLOUD_HOME", str(launched.home))
    return launched


def reference_losses(runs: Launched) -> dict:
    assert runs.reference.wait(timeout=TIMEOUT_S) == 0, (runs.tmp / "reference.log").read_text()[-3000:]
    text = (runs.tmp / "reference" / "metrics.jsonl").read_text()
    return {r["step"]: r["loss"] for r in parse_metrics(text) if "loss" in r and "step" in r}


def same_losses(got: dict, want: dict, steps) -> None:
    # 2 ranks either way (global ranks 0 and 1; the same gloo all-reduce): observed bitwise equal. 1e-5 is
    # margin over a reduction-order change (~1 ulp); a wrong data position moves a loss by ~4e-3.
    for step in steps:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step


# ---- a run of two nodes


def test_two_nodes_of_one_rank_train_as_one_node_of_two_and_fetch_like_one(runs):
    """The victim's steps up to its node's kill come from two nodes that trained uninterrupted; those after
    its resume from two fresh nodes that trained to the end: every one has the loss that one node of two
    ranks has. It finishes, `status`es and `fetch`es as a one-node run does."""
    assert wait_local("victim", TIMEOUT_S) == "SUCCEEDED", runs.log("victim")
    losses = bucket_losses(f"{runs.bucket}/runs/victim")
    assert sorted(losses) == list(range(1, STEPS + 1))
    same_losses(losses, reference_losses(runs), range(1, STEPS + 1))

    # each node its own directory: node home, OUT, data streamed by itself, driver log
    node0, node1 = node_dirs(registry.get("victim").node_dir)
    assert node1 == node0 / "node-1"
    for rank, d in enumerate((node0, node1)):
        assert json.loads((d / "node" / "data" / "download.json").read_text())["state"] in ("complete", "partial")
        assert f"node {rank} of 2, 1 GPUs" in (d / "driver.log").read_text()
    # node 0 writes the metrics and checkpoints and pushes them; node 1 pushes its log only
    assert (node0 / "node" / "out" / "metrics.jsonl").is_file()
    assert not (node1 / "node" / "out" / "metrics.jsonl").exists()
    store = open_store(f"{runs.bucket}/runs/victim")
    assert {o.key for o in store.list("logs/")} == {"logs/node-0.log", "logs/node-1.log"}

    d = json.loads(cli("status", "victim", "--json"))
    assert d["state"] == "SUCCEEDED" and d["finished"] and d["step"] == STEPS and d["gpus"] == "2 x CPU:1"
    f = json.loads(cli("fetch", "victim", "--dest", runs.tmp / "fetched", "--logs", "--json"))
    assert f["checkpoint"].endswith(f"step_{STEPS:06d}") and f["metrics"]
    assert sorted(Path(p).name for p in f["logs"]) == ["node-0.log", "node-1.log"]
    from model.checkpoint import verify_checkpoint

    verify_checkpoint(f["checkpoint"])


def test_logs_show_every_nodes_log(runs):
    assert wait_local("victim", TIMEOUT_S) == "SUCCEEDED", runs.log("victim")
    out = cli("logs", "victim")
    lines = out.splitlines()
    assert lines and all(re.match(r"\(node [01]\) ", line) for line in lines), out[:2000]
    for rank in (0, 1):
        assert f"(node {rank}) gpt2cloud: run victim, node {rank} of 2, 1 GPUs" in lines
        assert f"(node {rank}) gpt2cloud sync: final push done" in lines
    assert f"(node 0) done: step {STEPS}, final loss " in out


# ---- a node lost


def test_a_killed_node_stops_the_other_and_a_relaunch_resumes_exactly(runs):
    """Node 1 killed mid-run: node 0's trainer sees its peer's connections close (gloo; NCCL on GPUs: its
    timeout, the trainer's watchdog at the latest) and the run fails within seconds, every process of both
    nodes gone. Launched again: fresh nodes pull the bucket's newest checkpoint and train on with the losses
    of an uninterrupted run (1 node x 2 ranks) from there."""
    first = runs.victim
    assert re.fullmatch(r"FAILED \(exit code \d+\) on node 0 of 2; node 1: STOPPED", first["state"]), first
    assert first["stopped_after"] < STOP_BOUND_S and not first["left"], first
    resumable = first["resumable"]
    assert 10 <= resumable < STEPS and first["last_step"] < STEPS, "the victim finished before its node was killed"

    assert wait_local("victim", TIMEOUT_S) == "SUCCEEDED", runs.log("victim")
    for rank in (0, 1):
        assert f"resuming from checkpoint step {resumable} of " in runs.log("victim", rank)
    losses = bucket_losses(f"{runs.bucket}/runs/victim")
    same_losses(losses, reference_losses(runs), range(resumable + 1, STEPS + 1))
    assert json.loads(cli("status", "victim", "--json"))["restarts"] == 1


@pytest.mark.parametrize("name, lost, waiting", [("lonely", 1, 0), ("headless", 0, 1)])
def test_a_node_that_never_arrives_ends_the_job_within_the_bound(runs, name, lost, waiting):
    """A node lost before it got to the rendezvous: the node that is there waits BOUND_S
    (GPT2CLOUD_BOUND_RENDEZVOUS) from its arrival, says in one line which node never came, leaves a
    deadman event in its timeline and ends the job with EXIT_RENDEZVOUS_HUNG; its pusher's final push runs."""
    state = wait_local(name, 90)
    assert state == (f"FAILED (exit code {deadman.EXIT_RENDEZVOUS_HUNG}) on node {waiting} of 2; "
                     f"node {lost}: STOPPED"), state
    log = runs.log(name, waiting)
    said = [line for line in log.splitlines() if "RENDEZVOUS" in line]
    assert len(said) == 1, said
    assert re.search(rf"gpt2cloud: RENDEZVOUS: node {lost} of 2 never joined the rendezvous at 127\.0\.0\.1:\d+ "
                     rf"within {BOUND_S} s; the job ends here \(exit 84\)", said[0]), said
    assert "trainer exited" not in log and "gpt2cloud sync: final push done" in log  # torchrun never started
    out = node_dirs(registry.get(name).node_dir)[waiting] / "node" / "out"
    timeline = [json.loads(line) for line in (out / "timeline.jsonl").read_text().splitlines()]
    (event,) = [e for e in timeline if e["event"] == "deadman"]
    arrived = next(e["time"] for e in timeline if e["event"] == "train_start")  # just before the rendezvous
    assert event["phase"] == "the rendezvous" and event["missing"] == [lost] and event["code"] == 84
    assert BOUND_S <= event["time"] - arrived < BOUND_S + 5, event["time"] - arrived
    assert [e["event"] for e in timeline][-3:] == ["deadman", "train_end", "final_push"]


# ---- the pieces, without training


def test_each_node_gets_skypilots_variables_as_skypilot_sets_them_and_down_stops_all(tmp_path, monkeypatch):
    """Setup sees SkyPilot's setup variables and run its run variables (SkyPilot 0.14.1), per node: its rank,
    every node's IP one a line, the node count, its GPUs; one master port for all; a home of its own. The run
    is RUNNING while any node runs; `down` stops every node's tree."""
    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path / "g2"))
    from run_helpers import local_record

    rec = local_record(tmp_path, "vars", nodes=2, gpus_per_node=3, handle=None)
    (tmp_path / "wd").mkdir()
    dump = ('"$GPT2CLOUD_PYTHON" -c "import os, json; print(json.dumps(dict(os.environ)))" > "$GPT2CLOUD_NODE_HOME/env"'
            ' && mv "$GPT2CLOUD_NODE_HOME/env" "$GPT2CLOUD_NODE_HOME/%s.json"')
    cfg = {"workdir": str(tmp_path / "wd"), "setup": dump % "setup", "run": dump % "run" + "\nexec sleep 600",
           "envs": {"GPT2CLOUD_RUN_ID": "vars"}}
    LocalBackend().start(rec, cfg, {})
    dirs = node_dirs(rec.node_dir)
    deadline = time.time() + 30
    while not all((d / "node" / "run.json").is_file() for d in dirs) and time.time() < deadline:
        time.sleep(0.1)
    assert len(dirs) == 2 and run_state(rec.node_dir) == "RUNNING"
    for rank, d in enumerate(dirs):
        setup, run = (json.loads((d / "node" / f"{step}.json").read_text()) for step in ("setup", "run"))
        assert setup["SKYPILOT_SETUP_NODE_RANK"] == run["SKYPILOT_NODE_RANK"] == str(rank)
        assert setup["SKYPILOT_SETUP_NODE_IPS"] == run["SKYPILOT_NODE_IPS"] == "127.0.0.1\n127.0.0.1"
        assert setup["SKYPILOT_NUM_NODES"] == run["SKYPILOT_NUM_NODES"] == "2"
        assert setup["SKYPILOT_SETUP_NUM_GPUS_PER_NODE"] == run["SKYPILOT_NUM_GPUS_PER_NODE"] == "3"
        assert json.loads(run["SKYPILOT_CLUSTER_INFO"])["cluster_name"] == "vars"
        want = skypilot_envs("vars", 3, rank, 2)  # each step exactly its own of them
        assert {k: v for k, v in setup.items() if k.startswith("SKYPILOT_")} == {
            k: v for k, v in want.items() if k not in RUN_ONLY}
        assert {k: v for k, v in run.items() if k.startswith("SKYPILOT_")} == {
            k: v for k, v in want.items() if k not in SETUP_ONLY}
        assert run["GPT2CLOUD_NODE_HOME"] == str(d / "node")
        ports = {json.loads((d / "node" / "run.json").read_text())["GPT2CLOUD_MASTER_PORT"] for d in dirs}
        assert len(ports) == 1  # one master port, the same on every node

    assert LocalBackend(graceful_seconds=0).stop(rec) == "killed the local process trees of its 2 running node(s) of 2"
    assert [node_state(d) for d in dirs] == ["STOPPED", "STOPPED"] and run_state(rec.node_dir) == "STOPPED"
    assert LocalBackend().stop(rec) == "it was not running"


def test_one_nodes_failure_fails_the_run_and_names_the_node(tmp_path):
    (tmp_path / "node-1").mkdir()
    for d, code in ((tmp_path, 0), (tmp_path / "node-1", 3)):
        (d / "exit_code").write_text(f"{code}\n")
    assert run_state(tmp_path) == "FAILED (exit code 3) on node 1 of 2; node 0: SUCCEEDED"
    (tmp_path / "node-1" / "exit_code").write_text("0\n")
    assert run_state(tmp_path) == "SUCCEEDED"


def test_following_several_logs_prints_whole_lines_each_with_its_node(tmp_path, capsys):
    from gpt2cloud.backends.local import follow_files

    a, b = tmp_path / "a.log", tmp_path / "b.log"
    a.write_bytes(b"one\ntwo, half")
    b.write_bytes(b"three\n")
    polls = []

    def still_running() -> bool:  # the second node's line arrives while the first's is half written
        polls.append(1)
        if len(polls) == 1:
            with open(b, "ab") as f:
                f.write(b"four\n")
        return len(polls) < 3

    follow_files([("(node 0) ", a), ("(node 1) ", b)], still_running, poll=0.01)
    assert capsys.readouterr().out.splitlines() == [
        "(node 0) one", "(node 1) three", "(node 1) four", "(node 0) two, half"]


def test_the_rendezvous_names_every_missing_node_on_every_node_there():
    """Three nodes, node 1 never comes: node 0 and node 2 both name it, at node 0's bound."""
    port = free_port()
    cmd = [sys.executable, "-m", "model.deadman", "rendezvous", "--nodes", "3", "--addr", "127.0.0.1", "--port",
           str(port), "--run", "r1"]
    t0 = time.monotonic()
    procs = [subprocess.Popen([*cmd, "--rank", str(rank), "--timeout", str(timeout)], stderr=subprocess.PIPE,
                              text=True, cwd=REPO) for rank, timeout in ((2, 30), (0, 2))]
    said = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [deadman.EXIT_RENDEZVOUS_HUNG] * 2
    assert time.monotonic() - t0 < 2 + 10
    for text in said:
        assert f"node 1 of 3 never joined the rendezvous at 127.0.0.1:{port} within 2 s" in text, said
    procs = [subprocess.Popen([*cmd[:-2], "--run", "r1", "--rank", str(rank), "--timeout", "30"], cwd=REPO)
             for rank in (1, 2, 0)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]  # all there: they go, at once


# ---- the task SkyPilot gets


def test_several_nodes_ask_for_the_best_network_where_it_is_safe():
    res = dict(idle_minutes=10, accelerators="H100:8")
    assert task.resources(task.Resources(infra="aws", nodes=2, **res))["network_tier"] == "best"
    assert "network_tier" not in task.resources(task.Resources(infra="aws", **res))  # one node
    assert "network_tier" not in task.resources(task.Resources(infra="lambda", nodes=2, **res))  # refused there
    assert "network_tier" not in task.resources(task.Resources(infra="aws", nodes=2, image="ami-0abc", **res))
    assert task.resources(task.Resources(infra="aws/us-east-1", nodes=2, image="docker:x/y", **res))["network_tier"]
    any_of = task.resources(task.Resources(infra="any", clouds=("lambda", "aws"), nodes=2, **res))["any_of"]
    assert any_of == [{"infra": "lambda"}, {"infra": "aws", "network_tier": "best"}]


def test_skypilot_takes_the_network_setting_where_it_is_asked_for(sky_mod, tmp_path, monkeypatch):
    """SkyPilot 0.14.1 itself: a 2-node task on AWS asks for the best network and its optimizer still picks
    p5.48xlarge (EFA); one on Lambda does not ask, so Lambda's feature check passes; every cloud listed in
    NETWORK_TIER_CLOUDS supports it for H100:8."""
    from gpt2cloud.backends.skypilot import to_sky_task
    from gpt2cloud.launch.plan import plan

    sky = sky_mod
    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path / "g2"))
    for infra, nodes, tier in (("aws", 2, "best"), ("aws", 1, None), ("lambda", 2, None)):
        p = plan(recipe="gpt2-124m", gpus="H100:8", infra=infra, nodes=nodes, data="s3://bkt/d", bucket="s3://bkt/r",
                 name=f"net-{infra}-{nodes}")
        t = to_sky_task(p.task_cfg, p.secrets)
        (r,) = t.resources
        assert (r.network_tier.value if r.network_tier else None) == tier, (infra, nodes)
        r.cloud.check_features_are_supported(r, r.get_required_cloud_features())
        if tier:
            with sky.Dag() as dag:
                dag.add(t)
            sky.optimizer.Optimizer.optimize(dag, minimize=sky.OptimizeTarget.COST, quiet=True)
            assert t.best_resources.instance_type == "p5.48xlarge" and t.num_nodes == 2
    feature = sky.clouds.CloudImplementationFeatures.CUSTOM_NETWORK_TIER
    for name in task.NETWORK_TIER_CLOUDS:
        cloud = sky.CLOUD_REGISTRY.from_str(name)
        assert feature not in cloud._unsupported_features_for_resources(sky.Resources(accelerators="H100:8"))
