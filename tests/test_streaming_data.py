"""Training that starts before its data has all arrived (model/streamdata.py, model/datadir.py, model/data.py).

- the loader waits for a shard that lands late, then reads exactly the batches of a complete directory;
  so does a resume onto a shard not downloaded yet;
- a download that fails (or whose process dies) makes a waiting loader raise instead of hang;
- the download's order (validation first, then training shards by name), its manifest written first,
  its status file, `wait`, and the rate limit;
- the node's run script starts training before the last shard has landed, and finishes; the shards past
  the run's steps are never downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from gpt2cloud.store import FileStore, atomic_write, open_store
from gpt2cloud.store.transfer import build_manifest, upload_dir
from model import data as data_mod
from model import datadir, sync
from model.data import TokenLoader, find_shards
from model.shards import ShardError
from trainer_helpers import env, make_shards, read_metrics, tiny_config

B, T = 4, 32
SHARDS = (1500, 1400, 1300, 1200)  # 11, 10, 10, 9 steps of 128 tokens: a run crosses every shard


@pytest.fixture(autouse=True)
def fast_poll(monkeypatch):
    monkeypatch.setattr(data_mod, "POLL_SECONDS", 0.02)


def complete_dir(tmp_path: Path) -> Path:
    d = make_shards(tmp_path / "complete", train_tokens=SHARDS, val_tokens=600)
    return d


def streaming_dir(tmp_path: Path, src: Path, present: int, pid: int | None = None) -> Path:
    """DIR as the downloader leaves it early on: the manifest, the val shard and the first `present`
    training shards, and a status saying a download (this process, unless `pid`) is running."""
    d = tmp_path / "streaming"
    d.mkdir()
    atomic_write(d / "manifest.json", json.dumps(build_manifest(src)))
    train, val = find_shards(src)
    for p in val + train[:present]:
        shutil.copy(p, d / p.name)
    datadir.write_status(d, {"state": "running", "pid": os.getpid() if pid is None else pid, "bytes": 0,
                             "ready": [val[0].name, train[0].name], "arrived": {}})
    return d


def deliver_later(src: Path, dest: Path, names: list[str], delay: float) -> threading.Thread:
    """A thread that lands each named shard in dest (whole, under its final name) after `delay` seconds."""
    def run():
        for name in names:
            time.sleep(delay)
            atomic_write(dest / name, (src / name).read_bytes())
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def batches(loader: TokenLoader, steps: int) -> list[torch.Tensor]:
    return [torch.cat(loader.next_batch()) for _ in range(steps * loader.accum)]


def test_the_loader_waits_for_a_late_shard_then_reads_the_same_batches(tmp_path):
    src = complete_dir(tmp_path)
    train, _ = find_shards(src)
    reference = batches(TokenLoader(train, B, T, 0, 1, 1), 45)  # wraps past the last shard

    d = streaming_dir(tmp_path, src, present=1)
    s_train, s_val = find_shards(d)  # the lists come from the manifest, not from what is on disk
    assert [p.name for p in s_train] == [p.name for p in train] and s_val == [d / "tiny_val_000000.bin"]
    late = [p.name for p in train[1:]]
    deliver_later(src, d, late, delay=0.3)
    lines = []
    t0 = time.monotonic()
    got = batches(TokenLoader(s_train, B, T, 0, 1, 1, log=lines.append), 45)
    assert time.monotonic() - t0 >= 0.3 * len(late)  # it really waited for each one
    assert all(torch.equal(a, b) for a, b in zip(got, reference)) and len(got) == len(reference)
    assert "waiting for shard tiny_train_000002.bin (2 of 5 arrived)" in lines


def test_without_a_manifest_nothing_changes(tmp_path):
    src = complete_dir(tmp_path)
    (src / "tiny_train_000004.bin").unlink()
    train, val = find_shards(src)
    assert [p.name for p in train] == ["tiny_train_000001.bin", "tiny_train_000002.bin", "tiny_train_000003.bin"]
    assert val == [src / "tiny_val_000000.bin"]


def test_resume_onto_a_shard_not_downloaded_yet(tmp_path):
    src = complete_dir(tmp_path)
    train, _ = find_shards(src)
    state = {"shard": "tiny_train_000003.bin", "position": 384}
    ref = TokenLoader(train, B, T, 1, 2, 2)
    ref.set_state(state)
    reference = batches(ref, 3)  # the rest of shard 3, then shard 4

    d = streaming_dir(tmp_path, src, present=1)
    loader = TokenLoader(find_shards(d)[0], B, T, 1, 2, 2)
    beats = []
    loader.set_heartbeat(beats.append)
    deliver_later(src, d, ["tiny_train_000003.bin", "tiny_train_000004.bin"], delay=0.3)
    stop = threading.Event()

    def download_moving():  # the status's byte count grows: a slow download, not a stall
        n = 0
        while not stop.is_set():
            n += 100
            datadir.write_status(d, {**datadir.read_status(d), "bytes": n})
            time.sleep(0.02)
    threading.Thread(target=download_moving, daemon=True).start()
    try:
        loader.set_state(state)  # waits for the shard
    finally:
        stop.set()
    got = batches(loader, 3)
    assert all(torch.equal(a, b) for a, b in zip(got, reference))
    assert loader.state() == ref.state() and beats and beats[0] == "waiting for shard tiny_train_000003.bin"


def test_a_failed_download_makes_the_waiting_loader_raise(tmp_path):
    src = complete_dir(tmp_path)
    d = streaming_dir(tmp_path, src, present=1)
    loader = TokenLoader(find_shards(d)[0], B, T, 0, 1, 1)

    def fail():
        time.sleep(0.2)
        datadir.write_status(d, {**datadir.read_status(d), "state": "failed", "error": "s3://b/x.bin: sha256 mismatch"})
    threading.Thread(target=fail, daemon=True).start()
    with pytest.raises(ShardError, match=r"tiny_train_000002.bin never arrived: the data download failed: "
                                         r"s3://b/x.bin: sha256 mismatch"):
        batches(loader, 20)


def test_a_dead_downloader_or_none_at_all_is_an_error_not_a_hang(tmp_path):
    src = complete_dir(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    d = streaming_dir(tmp_path, src, present=1, pid=int(dead.stdout))
    with pytest.raises(ShardError, match=r"ended before it finished"):
        find_shards(d)  # the missing shards will never come: said at start
    (d / "download.json").unlink()  # a manifest, a missing shard, no download: nothing to wait for
    with pytest.raises(ShardError, match="tiny_train_000002.bin is listed in the manifest but not there: no download"):
        find_shards(d)


def test_download_order_puts_what_training_needs_first():
    files = [{"name": n, "size": 1, "sha256": "0" * 64} for n in
             ("edu_000003.bin", "edu_000001.bin", "hellaswag_val.jsonl", "edu_000000.bin", "edu_000002.bin")]
    first, rest = datadir.download_order(files)
    # no name says "val": shard 0 is validation (llm.c); other files come with the first batch
    assert [f["name"] for f in first] == ["edu_000000.bin", "hellaswag_val.jsonl", "edu_000001.bin"]
    assert [f["name"] for f in rest] == ["edu_000002.bin", "edu_000003.bin"]


def test_the_sync_downloads_in_order_manifest_first_with_a_status(tmp_path, monkeypatch):
    src = complete_dir(tmp_path)
    upload_dir(src, open_store((tmp_path / "bucket").as_uri()), progress=False)
    dest, timeline = tmp_path / "data", tmp_path / "timeline.jsonl"
    started = []
    get_file = FileStore.get_file

    def recording(self, key, local_path, progress=None, sha256=None):
        started.append((key, (dest / "manifest.json").is_file(), datadir.read_status(dest)["state"]))
        return get_file(self, key, local_path, progress, sha256)
    monkeypatch.setattr(FileStore, "get_file", recording)
    assert sync.data((tmp_path / "bucket").as_uri(), dest, timeline=str(timeline), workers=1) == 0
    names = ["tiny_val_000000.bin"] + [f"tiny_train_00000{i}.bin" for i in range(1, 5)]
    assert started == [(n, True, "running") for n in names]  # one at a time: strictly in order
    status = datadir.read_status(dest)
    assert status["state"] == "complete" and list(status["arrived"]) == names and status["files"] == 5
    assert status["ready"] == names[:2] and status["bytes"] == status["total_bytes"] == sum(
        (src / n).stat().st_size for n in names)
    (event,) = [json.loads(line) for line in timeline.read_text().splitlines()]
    assert event["event"] == "data_complete" and event["bytes"] == status["bytes"] and event["time"] >= event["start"]
    assert find_shards(dest) == tuple([dest / p.name for p in ps] for ps in find_shards(src))

    # a rerun keeps what is there and verified; 4 at a time, the first two still go first
    started.clear()
    (dest / "tiny_train_000004.bin").unlink()
    assert sync.data((tmp_path / "bucket").as_uri(), dest) == 0
    assert [k for k, *_ in started] == ["tiny_train_000004.bin"]


def test_a_failed_download_says_so_and_wait_gives_up(tmp_path, capsys):
    """A shard whose bytes do not match the manifest: the download fails, names it, and says so in its
    status; nothing unverified lands; `wait` and the trainer's shard lists refuse to go on."""
    src = complete_dir(tmp_path)
    bucket = tmp_path / "bucket"
    upload_dir(src, open_store(bucket.as_uri()), progress=False)
    (bucket / "tiny_train_000003.bin").write_bytes((src / "tiny_train_000002.bin").read_bytes())  # wrong content
    dest = tmp_path / "data"
    assert sync.data(bucket.as_uri(), dest) == sync.EXIT_DATA
    status = datadir.read_status(dest)
    assert status["state"] == "failed" and "tiny_train_000003.bin: sha256 mismatch" in status["error"]
    assert not (dest / "tiny_train_000003.bin").exists()  # nothing unverified under a final name
    # what training needs first came before the failure, but neither `wait` nor a trainer starting now
    # goes on: the rest will not come
    assert {"tiny_val_000000.bin", "tiny_train_000001.bin"} <= set(status["arrived"])
    assert sync.wait_ready(dest) == sync.EXIT_DATA
    with pytest.raises(ShardError, match="listed in the manifest but not there: the data download failed: .*sha256"):
        find_shards(dest)

    # before ready: wait fails at once
    assert sync.data((tmp_path / "nothing").as_uri(), tmp_path / "d2") == sync.EXIT_DATA
    assert sync.wait_ready(tmp_path / "d2") == sync.EXIT_DATA
    assert "no manifest there" in capsys.readouterr().err


def test_the_rate_limit_paces_the_download(tmp_path):
    src = complete_dir(tmp_path)
    upload_dir(src, open_store((tmp_path / "bucket").as_uri()), progress=False)
    total = sum(p.stat().st_size for p in src.glob("*.bin"))  # ~12 KB
    t0 = time.monotonic()
    assert sync.data((tmp_path / "bucket").as_uri(), tmp_path / "data", max_mb_per_s=0.03) == 0
    assert time.monotonic() - t0 >= total / 0.03e6 * 0.9


def test_a_node_starts_training_before_its_last_shard_lands(tmp_path):
    """The node's setup and run scripts on this machine (file:// data and bucket), the download slowed on
    purpose (GPT2CLOUD_DATA_MAX_MB_PER_S): the trainer starts on the validation and first training shard,
    waits for the second (80 KB: ~16 s to come, alone on the link), trains on, and finishes. Its 24 steps end
    inside the second shard, so the third and the last (400 KB: ~80 s at this rate) are never downloaded
    (model/datadir.py files_to_read): the download ends "partial" right after the second, and the job succeeds."""
    from gpt2cloud.backends.local import free_port
    from gpt2cloud.launch import build, scripts

    shards = make_shards(tmp_path / "shards", train_tokens=(1500, 40_000, 1300, 200_000), val_tokens=600)
    upload_dir(shards, open_store((tmp_path / "data").as_uri()), progress=False)
    run_dir = tmp_path / "bucket" / "r1"
    workdir = tmp_path / "workdir"
    cfg = tiny_config(steps=24, tokens_per_step=128, val_every=12, val_steps=1, sample_every=0,
                      checkpoint_every=24)  # 11 steps on shard 1, the rest on shard 2
    build.write_workdir(workdir, build.wheel_bytes(), cfg.to_json(), "")
    node = tmp_path / "node"
    e = {**env(), "GPT2CLOUD_PYTHON": sys.executable, "GPT2CLOUD_NODE_HOME": str(node), "GPT2CLOUD_DEVICE": "auto",
         "GPT2CLOUD_GPUS_PER_NODE": "1", "GPT2CLOUD_BUILD": "test", "GPT2CLOUD_TORCH_SPEC": "torch",
         "GPT2CLOUD_RUN_ID": "r1", "GPT2CLOUD_RUN_URL": run_dir.as_uri(),
         "GPT2CLOUD_DATA_URL": (tmp_path / "data").as_uri(), "GPT2CLOUD_DATA_MAX_MB_PER_S": "0.005",
         "GPT2CLOUD_PUSH_EVERY": "1", "GPT2CLOUD_KEEP_CHECKPOINTS": "2",
         "SKYPILOT_NODE_RANK": "0", "SKYPILOT_NODE_IPS": "127.0.0.1", "SKYPILOT_NUM_NODES": "1",
         "SKYPILOT_NUM_GPUS_PER_NODE": "1", "GPT2CLOUD_MASTER_PORT": str(free_port())}
    e.pop("PYTHONPATH", None)
    for script in (scripts.SETUP_SCRIPT, scripts.RUN_SCRIPT):
        p = subprocess.run(["bash", "-c", scripts.render(script)], cwd=workdir, env=e, capture_output=True, text=True,
                           timeout=240, check=False)
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    log = p.stdout + p.stderr
    out, data = node / "out", node / "data"
    events = {ev["event"]: ev for ev in map(json.loads, (out / "timeline.jsonl").read_text().splitlines())}
    steps = {r["step"]: r["time"] for r in read_metrics(out) if "loss" in r}
    assert sorted(steps) == list(range(1, 25)) and "done: step 24" in log  # the run finished
    arrived = datadir.read_status(data)["arrived"]
    # ready (val + first training shard) before training starts; shard 2 came after the first step, and
    # the trainer waited for it; the last shard had not come by the end: the download was stopped, no error
    assert events["data"]["time"] <= events["train_start"]["time"] < steps[1]
    assert set(list(arrived)[:2]) == {"tiny_val_000000.bin", "tiny_train_000001.bin"} and events["data"]["bytes"] > 0
    assert steps[11] < arrived["tiny_train_000002.bin"] < steps[12]
    assert "waiting for shard tiny_train_000002.bin (" in log
    status = datadir.read_status(data)
    assert status["state"] == datadir.PARTIAL and status["left_out"] == ["tiny_train_000003.bin", "tiny_train_000004.bin"]
    assert not (data / "tiny_train_000003.bin").exists() and not (data / "tiny_train_000004.bin").exists()
    assert events["data_complete"]["left_out"] == 2 and events["data_complete"]["time"] >= arrived["tiny_train_000002.bin"]
    assert "2 training shards left out" in log
    assert not datadir.process_alive(status["pid"])  # the downloader is gone with the run
