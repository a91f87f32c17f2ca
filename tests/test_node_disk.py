"""The node's disk: every training task asks SkyPilot for a disk_size computed from what the node will
hold; the node downloads only the shards its steps read; and a full disk (in the pull, the data download,
a checkpoint write) ends the job with one line and EXIT_DISK_FULL, a code no managed job recovers from.

The full disks are real: a small tmpfs mounted in a mount namespace of the test's own (node_helpers.py
on_small_disks), so the writes fail with ENOSPC where the kernel says so."""

from __future__ import annotations

import json
import math

import pytest
from node_helpers import node_env, on_small_disks, run_script, uploaded_data, workdir
from run_helpers import fake_checkpoint
from sky_offline import sky_home, sky_mod  # noqa: F401  (fixtures)
from trainer_helpers import make_shards, tiny_config

from gpt2cloud.backends.skypilot import to_sky_task
from gpt2cloud.launch import plan as plans
from gpt2cloud.launch import scripts, task
from gpt2cloud.store import StorageError
from gpt2cloud.store.transfer import build_manifest
from model import checkpoint, datadir, deadman, sync
from model.data import TokenLoader, find_shards
from model.gpt import GPT

GB = 1e9


def test_every_training_task_has_its_disk_size(sky_mod, tmp_path, monkeypatch):
    """The recipes as the lecture runs them fit SkyPilot's default; a run that reads more gets more: its
    shards (2 bytes a token) and keep_checkpoints + 1 checkpoints (12 bytes a parameter with AdamW) on top
    of the venv, the image and the logs. SkyPilot's own task accepts it."""
    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path / "g2"))
    lecture = plans.plan("gpt2-1558m", "H100:8", infra="lambda", data="s3://bkt/d", bucket="s3://bkt/r", name="a")
    assert lecture.task_cfg["resources"]["disk_size"] == plans.task.DEFAULT_DISK_GB == 256
    cfg = lecture.train_cfg
    assert plans.checkpoint_bytes(cfg.model, cfg.optimizer) == pytest.approx(12 * 1_557_686_400, rel=0.001)  # ~18.7 GB
    longer = plans.plan("gpt2-1558m", "H100:8", infra="lambda", data="s3://bkt/d", bucket="s3://bkt/r", name="b",
                        steps=100_000)  # 105B tokens: 210 GB of shards
    tokens = 100_000 * cfg.tokens_per_step
    want = math.ceil((2 * tokens + plans.SHARD_SLACK_BYTES + (cfg.keep_checkpoints + 1) * 12 * 1_557_686_400) / GB)
    assert longer.task_cfg["resources"]["disk_size"] == want + 15 + 30 + 5 > 300
    (res,) = list(to_sky_task(longer.task_cfg, longer.secrets).resources)
    assert res.disk_size == longer.task_cfg["resources"]["disk_size"]


def _manifest(sizes: list[int], val: int = 200_001_024) -> bytes:
    files = [{"name": "edu_val_000000.bin", "size": val, "sha256": "0" * 64}]
    files += [{"name": f"edu_train_{i:06d}.bin", "size": s, "sha256": "0" * 64} for i, s in enumerate(sizes, 1)]
    return json.dumps({"files": files}).encode()


def test_the_disk_from_the_manifest_counts_the_shards_the_run_reads(sky_mod, tmp_path, monkeypatch):
    """At preflight the data's manifest is known: the disk holds the shards the steps reach (a 100B-token set
    of 200 MB shards read for 1B tokens: 5 shards + validation, not 200 GB), or all of them when the run
    goes round the set more than once."""
    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path / "g2"))
    p = plans.plan("gpt2-124m", "H100:8", infra="lambda", data="s3://bkt/d", bucket="s3://bkt/r", name="m",
                   steps=2000, tokens_per_step=524288)  # ~1.05B tokens
    shard = 200_001_024  # 100M tokens
    big = plans.with_data_manifest(p, _manifest([shard] * 1000))  # 200 GB of training shards
    files = json.loads(_manifest([shard] * 1000))["files"]
    read = datadir.files_to_read(files, 2000, 524288)
    assert [f["name"] for f in read] == ["edu_val_000000.bin"] + [f"edu_train_{i:06d}.bin" for i in range(1, 12)]
    assert plans.shard_bytes(p.train_cfg, files) == 12 * shard
    assert big.job.resources.disk_gb == 256 and big.task_cfg["resources"]["disk_size"] == 256
    assert big.job.resources.disk_gb == plans.node_disk_gb(p.train_cfg, files)
    huge = plans.with_data_manifest(p, _manifest([shard * 60] * 5))  # 5 shards of 12 GB: a run reads 1
    assert plans.shard_bytes(p.train_cfg, json.loads(_manifest([shard * 60] * 5))["files"]) == shard + shard * 60
    small = _manifest([shard // 100] * 3)  # 3M tokens in all: the run goes round it; every shard comes
    assert plans.shard_bytes(p.train_cfg, json.loads(small)["files"]) == shard + 3 * (shard // 100)
    assert huge.job.resources.disk_gb == 256  # never below SkyPilot's default
    many = plans.plan("gpt2-124m", "H100:8", infra="lambda", data="s3://bkt/d", bucket="s3://bkt/r", name="n",
                      steps=400_000)  # 210B tokens: over the default
    sized = plans.with_data_manifest(many, _manifest([shard] * 3000))
    held = plans.shard_bytes(many.train_cfg, json.loads(_manifest([shard] * 3000))["files"])
    kept = many.train_cfg.keep_checkpoints + 1  # a new checkpoint is written before the oldest goes
    assert held > 400 * GB and sized.job.resources.disk_gb == math.ceil(
        (held + kept * plans.checkpoint_bytes(many.train_cfg.model, many.train_cfg.optimizer)) / GB) + 50


@pytest.mark.parametrize("steps", [1, 5, 11, 12, 21, 22, 40, 41, 100])
def test_the_shards_picked_are_exactly_those_the_loader_reads(tmp_path, steps):
    """files_to_read against the trainer's own loader: it never reads past them, and every training shard
    up to the last it reads is among them (a shard shorter than one step is skipped by both)."""
    d = make_shards(tmp_path / "d", train_tokens=(1500, 100, 1400, 1300, 1200), val_tokens=600)  # 11, 0, 10, 10, 9 steps
    train, _ = find_shards(d)
    loader, loaded = TokenLoader(train, 4, 32, 0, 1, 1), set()
    for _ in range(steps):
        loader.next_batch()  # one micro-batch is one step here
        loaded.add(loader.state()["shard"])  # the shard the step was read from
    files = build_manifest(d)["files"]
    picked = [f["name"] for f in datadir.files_to_read(files, steps, 128) if "train" in f["name"]]
    assert loaded <= set(picked)
    last = max(loaded) if steps <= 40 else "tiny_train_000005.bin"  # past 40 steps it wraps: all of them
    assert picked == sorted(n.name for n in train if n.name <= last)
    assert "tiny_val_000000.bin" in [f["name"] for f in datadir.files_to_read(files, steps, 128)]


def test_the_node_downloads_only_what_its_steps_read(tmp_path):
    """`model.sync data --config`: the shards past the run's steps are left out; the status says which and
    ends "partial"; the data directory's manifest is still the whole set's, so the data's identity (what a
    checkpoint records, compared on resume) is the same as with every shard there."""
    src = make_shards(tmp_path / "shards", train_tokens=(1500, 1400, 1300, 1200), val_tokens=600)
    url = uploaded_data(tmp_path, src)
    config = tmp_path / "config.json"
    config.write_text(tiny_config(steps=15, tokens_per_step=128).to_json())  # shard 1: 11 steps, shard 2: 10
    dest = tmp_path / "data"
    assert sync.main(["data", url, str(dest), "--config", str(config), "--timeline", str(tmp_path / "t.jsonl")]) == 0
    status = datadir.read_status(dest)
    assert status["state"] == datadir.PARTIAL and status["left_out"] == ["tiny_train_000003.bin", "tiny_train_000004.bin"]
    assert sorted(p.name for p in dest.glob("*.bin")) == ["tiny_train_000001.bin", "tiny_train_000002.bin",
                                                          "tiny_val_000000.bin"]
    assert status["files"] == 3 and status["total_bytes"] == sum((src / n).stat().st_size for n in (
        "tiny_val_000000.bin", "tiny_train_000001.bin", "tiny_train_000002.bin"))
    assert checkpoint.data_identity(dest) == checkpoint.data_identity(src)
    assert sync.wait_ready(dest) == 0  # ready, and nothing failed
    (event,) = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert event["event"] == "data_complete" and event["left_out"] == 2 and event["files"] == 3
    # the trainer's 15 steps from a directory that holds only these
    loader = TokenLoader(find_shards(dest)[0], 4, 32, 0, 1, 1)
    for _ in range(15 * loader.accum):
        loader.next_batch()


def _node(tmp_path, cfg, data_url, run_url):
    e = node_env(tmp_path, data_url, run_url)
    wd = workdir(tmp_path, cfg.to_json())
    p, _ = run_script(scripts.SETUP_SCRIPT, wd, e)  # setup on the node's ordinary disk
    assert p.returncode == 0, p.stdout + p.stderr
    return e, wd


def _assert_disk_full(p):
    """The job's code, and one line saying so (no traceback)."""
    log = p.stdout + p.stderr
    assert p.returncode == deadman.EXIT_DISK_FULL, log[-3000:]
    assert "the node's disk is full" in log and "No space left on device" in log and "Traceback" not in log, log[-3000:]


def test_a_full_disk_in_the_pull_ends_the_job(tmp_path):
    """The newest checkpoint does not fit on the node: the pull says so in one line and the job ends
    EXIT_DISK_FULL; it does not fall back to an older checkpoint or start from scratch."""
    run_dir = tmp_path / "bucket" / "r1"
    src = tmp_path / "src"
    fake_checkpoint(src, 4, size=400_000)
    sync.Pusher(src, run_dir.as_uri()).push_once()
    e, wd = _node(tmp_path, tiny_config(steps=4), uploaded_data(tmp_path, make_shards(tmp_path / "shards")),
                  run_dir.as_uri())
    node = tmp_path / "node"
    p, _ = run_script(scripts.RUN_SCRIPT, wd, e, prefix=on_small_disks({node / "out": 128}))
    _assert_disk_full(p)
    assert "starting from scratch" not in p.stderr and "trying an older one" not in p.stderr
    assert not (node / "data").exists()  # it went no further


def test_a_full_disk_in_the_data_download_ends_the_job(tmp_path):
    shards = make_shards(tmp_path / "shards", train_tokens=(60_000, 60_000), val_tokens=60_000)  # 120 KB each
    e, wd = _node(tmp_path, tiny_config(steps=4), uploaded_data(tmp_path, shards), (tmp_path / "bucket" / "r1").as_uri())
    node = tmp_path / "node"
    p, _ = run_script(scripts.RUN_SCRIPT, wd, e, prefix=on_small_disks({node / "data": 160}))
    _assert_disk_full(p)  # the validation shard fitted, the first training shard did not: no trainer started
    assert "train_start" not in (node / "out" / "timeline.jsonl").read_text()


def test_a_full_disk_in_a_checkpoint_write_ends_the_job(tmp_path):
    """The trainer's checkpoint (~0.4 MB for the tiny model) does not fit where OUT is: the job ends
    EXIT_DISK_FULL, not as a crash a managed job might take for something else."""
    cfg = tiny_config(steps=6, checkpoint_every=3, val_every=100, sample_every=0)
    params = sum(t.numel() for t in GPT(cfg.model).parameters())
    assert 12 * params > 300_000  # weights and AdamW's moments: more than the disk below holds
    run_dir = tmp_path / "bucket" / "r1"
    e, wd = _node(tmp_path, cfg, uploaded_data(tmp_path, make_shards(tmp_path / "shards", train_tokens=(3000,))),
                  run_dir.as_uri())
    p, _ = run_script(scripts.RUN_SCRIPT, wd, e, prefix=on_small_disks({tmp_path / "node" / "out": 256}))
    log = p.stdout + p.stderr
    assert p.returncode == deadman.EXIT_DISK_FULL, log[-3000:]
    assert "the node's disk is full" in log and f"exit {deadman.EXIT_DISK_FULL}" in log
    assert "No space left on device" in log and "trainer exited with code 0" not in log  # it failed writing
    assert deadman.EXIT_DISK_FULL not in task.JOB_RECOVERY["recover_on_exit_codes"]


def test_a_full_disk_is_told_apart_from_other_storage_errors():
    try:
        try:
            raise OSError(28, "No space left on device", "x")
        except OSError as e:
            raise StorageError(f"x: {e.strerror}") from None
    except StorageError as wrapped:
        assert deadman.is_disk_full(wrapped)
    assert not deadman.is_disk_full(StorageError("s3://b/k: sha256 mismatch"))
    assert not deadman.is_disk_full(PermissionError(13, "Permission denied"))
    assert sync.failure_code(OSError(122, "Disk quota exceeded")) == deadman.EXIT_DISK_FULL
    assert sync.failure_code(StorageError("s3://b/k: sha256 mismatch")) == sync.EXIT_DATA
