"""The real trackers, offline: TensorBoard's event files, a wandb offline run, Trackio's local store.

One trainer run with all three (6 steps, a checkpoint at 4), then, as if it had been killed after logging
step 6 but before checkpointing it, a resume from step 4 to step 8. Each tracker's own reader then says
what it got: every step's train loss as metrics.jsonl has it, and the resumed attempt in the same tracker
run (the id kept in the checkpoint). The trainer runs as a subprocess: wandb and Trackio keep
process-wide state (a service process, a directory fixed at import) that must not leak into other tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from trainer_helpers import REPO, make_shards, read_metrics, tiny_config, trainer_cmd, write_config
from trainer_helpers import env as trainer_env

from model import trackers
from model.config import TrainConfig


def _train(config, data, out, env, *extra) -> subprocess.CompletedProcess:
    p = subprocess.run(trainer_cmd(config, data, out, None, *extra), cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """OUT of the run, its tracker run id, and the directories wandb and Trackio wrote to."""
    root = tmp_path_factory.mktemp("tracked")
    data, out = make_shards(root / "data"), root / "out"
    dirs = {"WANDB_DIR": root / "wandb", "TRACKIO_DIR": root / "trackio"}
    for d in dirs.values():
        d.mkdir()
    config = write_config(root / "config.json", tiny_config(steps=6, checkpoint_every=4, val_every=2,
                                                            sample_every=100, trackers=list(trackers.TRACKERS)))
    env = {**trainer_env(), **{k: str(v) for k, v in dirs.items()}, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.pop("GPT2CLOUD_RUN_ID", None)  # the tracker run's name: OUT's
    first = _train(config, data, out, env)
    run_id = json.loads((out / "checkpoints" / "step_000004" / "trainer_state.json").read_text())["tracker_run_id"]
    shutil.rmtree(out / "checkpoints" / "step_000006")  # killed before step 6's checkpoint
    second = _train(config, data, out, env, "--steps", "8")
    assert "note: tracker" not in first.stderr + second.stderr, first.stderr + second.stderr
    return {"out": out, "id": run_id, "losses": {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r},
            **dirs}


def test_tensorboard_has_each_steps_train_loss_once_after_a_resume(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked["out"] / trackers.TENSORBOARD_DIR))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    # steps 5 and 6 were logged twice (before the kill and after the resume): the resume's session start
    # hides the first attempt's from step 5 on
    assert [s for s, _ in loss] == list(range(1, 9))
    assert [v for _, v in loss] == pytest.approx([tracked["losses"][s] for s in range(1, 9)], rel=1e-6)
    assert [e.step for e in events.Scalars("val/loss")] == [2, 4, 6, 8]
    assert {"train/lr", "train/grad_norm", "perf/tokens_per_second"} <= set(events.Tags()["scalars"])


def test_tensorboard_keeps_a_sample_as_text(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = trackers.TensorBoard(TrainConfig(), tmp_path, trackers.TrackerRun("abc", "run"))
    sink.write({"step": 3, "sample": "Hello, I'm a language model, and"})
    sink.write({"event": "checkpoint", "step": 3, "path": "x"})  # charts nothing
    sink.close()
    events = EventAccumulator(str(tmp_path / trackers.TENSORBOARD_DIR))
    events.Reload()
    (text,) = events.Tensors(trackers.SAMPLE)
    assert text.step == 3 and text.tensor_proto.string_val == [b"Hello, I'm a language model, and"]
    assert events.Tags()["scalars"] == []


def _wandb_history(run_dir: Path) -> list[dict]:
    """The history rows of an offline wandb run, read with wandb's own record reader."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    (log,) = run_dir.glob("run-*.wandb")
    store = datastore.DataStore()
    store.open_for_scan(str(log))
    rows = []
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            # a key with a "/" (train/loss) is stored split into nested_key
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def test_wandb_offline_runs_hold_the_history_and_the_resume_keeps_the_id(tracked):
    runs = sorted((tracked["WANDB_DIR"] / "wandb").glob("offline-run-*"))
    # two attempts, one wandb run id: the one the checkpoint kept (`wandb sync` puts them together)
    assert len(runs) == 2 and all(r.name.endswith(f"-{tracked['id']}") for r in runs), runs
    first, second = (_wandb_history(r) for r in runs)
    train = [[(row["step"], row["train/loss"]) for row in rows if "train/loss" in row] for rows in (first, second)]
    assert [s for s, _ in train[0]] == [1, 2, 3, 4, 5, 6] and [s for s, _ in train[1]] == [5, 6, 7, 8]
    assert dict(train[1]) == pytest.approx({s: tracked["losses"][s] for s in (5, 6, 7, 8)}, rel=1e-6)


def test_trackio_local_store_holds_the_run_under_one_name(tracked):
    # Trackio fixes its directory at import: read it in a process of its own, as the trainer wrote it
    read = ("import json, sys; from trackio.sqlite_storage import SQLiteStorage as S; "
            "runs = S.get_runs('gpt2cloud'); print(json.dumps([runs, S.get_logs('gpt2cloud', runs[0])]))")
    env = {**os.environ, "TRACKIO_DIR": str(tracked["TRACKIO_DIR"])}
    p = subprocess.run([sys.executable, "-c", read], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    runs, logs = json.loads(p.stdout.strip().splitlines()[-1])
    assert runs == [f"out-{tracked['id'][:8]}"]  # the resume went on in the same run
    loss = {}
    for row in logs:
        if "train/loss" in row:
            loss[row["step"]] = row["train/loss"]  # steps 5 and 6 twice: the resume's last
    assert loss == pytest.approx({s: tracked["losses"][s] for s in range(1, 9)}, rel=1e-6)
