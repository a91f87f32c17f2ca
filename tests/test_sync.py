"""model/sync.py: the node pushes OUT to the bucket as it goes and a fresh node pulls the newest checkpoint."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from run_helpers import fake_checkpoint, metrics_lines

from gpt2cloud.store import open_store, transfer
from model import sync
from model.metrics import parse_metrics

REPO = Path(__file__).resolve().parents[1]


def _keys(store, prefix=""):
    return sorted(o.key for o in store.list(prefix))


def test_push_only_complete_checkpoints_then_prune(tmp_path):
    out, url = tmp_path / "out", (tmp_path / "bucket" / "r").as_uri()
    fake_checkpoint(out, 5)
    fake_checkpoint(out, 10, complete=False)  # the trainer is still writing it
    (out / "metrics.jsonl").write_text(metrics_lines(10, 20))
    (out / "logs").mkdir()
    (out / "logs" / "node-0.log").write_text("step 10/20\n")
    p = sync.Pusher(out, url, rank=0, keep=2)
    p.push_once()
    store = open_store(url)
    assert sync.remote_checkpoints(store) == ([(5, "step_000005")], [])
    assert store.exists("metrics.jsonl") and store.get_bytes("logs/node-0.log") == b"step 10/20\n"
    assert not _keys(store, "tensorboard/")
    (out / "tensorboard").mkdir()  # --tracker tensorboard: its event files go up beside the metrics
    (out / "tensorboard" / "events.out.tfevents.1.node").write_bytes(b"ev1")
    p.push_once()
    assert store.get_bytes("tensorboard/events.out.tfevents.1.node") == b"ev1"
    fake_checkpoint(out, 10)  # manifest written: complete now
    p.push_once()
    fake_checkpoint(out, 15)
    p.push_once()
    complete, incomplete = sync.remote_checkpoints(store)
    assert complete == [(10, "step_000010"), (15, "step_000015")] and not incomplete  # keep=2: step 5 gone
    assert not _keys(store, "checkpoints/step_000005/")


def test_other_nodes_push_only_their_log(tmp_path):
    out, url = tmp_path / "out", (tmp_path / "bucket" / "r").as_uri()
    fake_checkpoint(out, 5)
    (out / "metrics.jsonl").write_text("stale\n")
    (out / "logs").mkdir()
    (out / "logs" / "node-1.log").write_text("node 1\n")
    sync.Pusher(out, url, rank=1).push_once()
    assert _keys(open_store(url)) == ["logs/node-1.log"]


def test_pull_newest_verified_checkpoint_falling_back_when_damaged(tmp_path, capsys):
    src, url = tmp_path / "src", (tmp_path / "bucket" / "r").as_uri()
    for step in (5, 10):
        fake_checkpoint(src, step)
    (src / "metrics.jsonl").write_text(metrics_lines(12, 20))
    sync.Pusher(src, url, keep=0).push_once()  # pushes the newest, step 10, and the metrics
    from gpt2cloud.store.transfer import upload_dir

    store = open_store(url)
    upload_dir(src / "checkpoints" / "step_000005", store, "checkpoints/step_000005", progress=False)
    assert [s for s, _ in sync.remote_checkpoints(store)[0]] == [5, 10]
    # the newest checkpoint's weights get damaged in the bucket: the pull falls back to step 5
    store.put_bytes("checkpoints/step_000010/model.safetensors", b"garbage" * 10)
    out = tmp_path / "node"
    assert sync.pull(url, out) == 0
    assert (out / "checkpoints" / "step_000005" / "manifest.json").is_file()
    assert not (out / "checkpoints" / "step_000010" / "manifest.json").exists()
    assert (out / "metrics.jsonl").read_text() == (src / "metrics.jsonl").read_text()
    assert "trying an older one" in capsys.readouterr().err


def test_pull_with_nothing_in_the_bucket_starts_from_scratch(tmp_path, capsys):
    assert sync.pull((tmp_path / "empty").as_uri(), tmp_path / "node") == 0
    assert "starting from scratch" in capsys.readouterr().err


def test_pull_from_a_bucket_that_is_not_there(s3_server, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    assert sync.pull("s3://no-such-bucket-xyz/run", tmp_path / "node") == 4


def test_data_needs_a_manifest(tmp_path):
    src = tmp_path / "shards"
    src.mkdir()
    (src / "x_train_000001.bin").write_bytes(b"0" * 100)
    assert sync.data(src.as_uri(), tmp_path / "d1") == 3  # no manifest: refuse
    from gpt2cloud.store.transfer import upload_dir

    upload_dir(src, open_store((tmp_path / "bucket").as_uri()), "data", progress=False)
    assert sync.data((tmp_path / "bucket" / "data").as_uri(), tmp_path / "d2") == 0
    assert (tmp_path / "d2" / "x_train_000001.bin").read_bytes() == b"0" * 100


def test_pusher_makes_a_final_push_on_sigterm(tmp_path):
    out, url = tmp_path / "out", (tmp_path / "bucket" / "r").as_uri()
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "node-0.log").write_text("starting\n")
    store = open_store(url)
    proc = subprocess.Popen([sys.executable, "-m", "model.sync", "push", str(out), url, "--every", "600"],
                            cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        # The log in the bucket says the first push is done (its signal handlers are set before it);
        # the next regular push is ten minutes away, so what follows can only come from the final push.
        deadline = time.monotonic() + 60
        while not store.exists("logs/node-0.log"):
            assert proc.poll() is None and time.monotonic() < deadline, "the pusher never pushed"
            time.sleep(0.02)
        assert sync.remote_checkpoints(store) == ([], []) and not store.exists("metrics.jsonl")
        fake_checkpoint(out, 7)
        (out / "metrics.jsonl").write_text(metrics_lines(7, 20))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.wait()
    assert sync.remote_checkpoints(store)[0] == [(7, "step_000007")]
    assert json.loads(store.get_bytes("metrics.jsonl").decode().splitlines()[-1])["step"] == 7
    assert "final push done" in proc.stderr.read()


class Killed(BaseException):
    """The pusher's process died (a BaseException: no `except Exception` on the way catches it)."""


def kill_after(store, writes: int) -> None:
    """Make `store` behave like a process SIGKILLed after `writes` completed writes: every later write
    (put, delete) raises Killed without touching the bucket."""
    done, lock = [0], threading.Lock()

    def wrap(fn):
        def write(*args, **kwargs):
            with lock:
                if done[0] >= writes:
                    raise Killed()
            result = fn(*args, **kwargs)
            with lock:
                done[0] += 1
            return result
        return write

    for name in ("put_bytes", "put_file", "delete"):
        setattr(store, name, wrap(getattr(store, name)))


def _remote_steps(store) -> set[int]:
    return {r["step"] for r in parse_metrics(store.get_bytes("metrics.jsonl").decode()) if "loss" in r}


@pytest.mark.parametrize("writes", range(6))  # a complete push here is 5 writes: metrics, 3 files, manifest
def test_a_kill_anywhere_in_a_push_leaves_metrics_that_cover_the_newest_checkpoint(tmp_path, monkeypatch, writes):
    """A resumed run keeps the bucket's metrics up to its checkpoint and redoes the steps after it: the
    metrics must hold every step up to the newest complete checkpoint, wherever a kill stopped the push."""
    monkeypatch.setattr(transfer, "FILE_WORKERS", 1)  # one upload at a time: each kill point is one state
    out, url = tmp_path / "out", (tmp_path / "bucket" / "r").as_uri()
    fake_checkpoint(out, 10)
    (out / "metrics.jsonl").write_text(metrics_lines(12, 40))
    pusher = sync.Pusher(out, url)
    pusher.push_once()  # an earlier push, complete: checkpoint 10 and steps 1-12
    fake_checkpoint(out, 20)
    (out / "metrics.jsonl").write_text(metrics_lines(23, 40))
    kill_after(pusher.store, writes)
    try:
        pusher.push_once()
        finished = True
    except Killed:
        finished = False
    assert finished == (writes == 5)
    store = open_store(url)
    newest = sync.remote_checkpoints(store)[0][-1][0]
    assert set(range(1, newest + 1)) <= _remote_steps(store), f"steps missing before checkpoint {newest}"
    if finished:
        assert newest == 20 and max(_remote_steps(store)) == 23


def test_node_side_needs_no_cli_dependencies(tmp_path):
    """model.sync runs with typer, pydantic, rich, yaml and skypilot absent (as on a GPU node)."""
    out, url = tmp_path / "out", (tmp_path / "bucket" / "r").as_uri()
    fake_checkpoint(out, 3)
    code = ("import sys\n"
            "for m in ('typer', 'pydantic', 'rich', 'yaml', 'sky', 'click'):\n"
            "    sys.modules[m] = None\n"
            "from model import sync\n"
            f"assert sync.main(['push', {str(out)!r}, {url!r}, '--once']) == 0\n"
            f"assert sync.main(['pull', {url!r}, {str(tmp_path / 'fresh')!r}]) == 0\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "fresh" / "checkpoints" / "step_000003" / "manifest.json").is_file()
