"""Shared by the cloud-run tests: checkpoint directories as the trainer writes them, and run records."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from gpt2cloud.backends.local import LocalHandle
from gpt2cloud.runs import registry


def fake_checkpoint(out: Path, step: int, complete: bool = True, size: int = 2048) -> Path:
    """OUT/checkpoints/step_NNNNNN with a few files and (if complete) the trainer's manifest, written last."""
    d = out / "checkpoints" / f"step_{step:06d}"
    d.mkdir(parents=True, exist_ok=True)
    files = {"model.safetensors": bytes([step % 251]) * size, "optimizer.pt": f"opt{step}".encode() * 50,
             "trainer_state.json": json.dumps({"step": step}).encode()}
    entries = []
    for name, data in files.items():
        (d / name).write_bytes(data)
        entries.append({"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    if complete:
        manifest = {"format": "gpt2cloud-checkpoint", "version": 1, "step": step, "world_size": 2,
                    "recipe": "gpt2-tiny", "config": {}, "files": entries}
        (d / "manifest.json").write_text(json.dumps(manifest))
    return d


def metrics_lines(steps: int, total: int, start: int = 1, price: float = 3.0, gpus: int = 2) -> str:
    lines = [{"event": "start", "world_size": gpus, "config": {"steps": total}}]
    for s in range(start, steps + 1):
        lines.append({"step": s, "loss": 10.0 - 0.1 * s, "lr": 1e-3, "grad_norm": 1.0, "step_seconds": 2.0,
                      "tokens_per_second": 512.0, "mfu": None, "tokens_seen": s * 1024,
                      "elapsed_seconds": 2.0 * s, "cost_usd": 2.0 * s / 3600 * gpus * price})
    return "".join(json.dumps(x) + "\n" for x in lines)


def local_record(tmp_path: Path, run_id: str = "loc1", **kw) -> registry.RunRecord:
    """A registry record of a local run whose bucket is a file:// directory under tmp_path; keyword
    arguments set fields of the spec or of the record (its handle: a LocalHandle of tmp_path/node unless
    given)."""
    run_url = (tmp_path / "bucket" / run_id).as_uri()
    spec = dict(
        run_id=run_id, kind="local", infra="local", run_url=run_url, bucket=run_url.rsplit("/", 1)[0],
        data_url=(tmp_path / "data").as_uri(), recipe="gpt2-tiny", gpu_type="H100", gpus_per_node=2, nodes=1,
        spot=False, price_per_gpu_hour=3.0, total_steps=20, estimate=None,
    )
    record = dict(started_at=1.0, handle=LocalHandle(local_dir=str(tmp_path / "node")), state="LAUNCHED")
    spec_fields = {f.name for f in dataclasses.fields(registry.RunSpec)}
    for k, v in kw.items():
        (spec if k in spec_fields else record)[k] = v
    rec = registry.RunRecord(spec=registry.RunSpec(**spec), **record)
    registry.save(rec)
    return rec


# ---- local runs of several nodes (tests/test_multinode.py)


def bucket_losses(run_url: str) -> dict:
    """{step: loss} of the run's metrics.jsonl in its bucket."""
    from gpt2cloud.store import open_store
    from model.metrics import parse_metrics

    text = open_store(run_url).get_bytes("metrics.jsonl").decode()
    return {r["step"]: r["loss"] for r in parse_metrics(text) if "loss" in r and "step" in r}


def kill_node(run_id: str, rank: int) -> None:
    """SIGKILL node `rank` of a local run, its whole process tree at once, as a lost VM."""
    from gpt2cloud.backends.local import node_dirs, read_pid
    from gpt2cloud.processes import kill_process_tree

    pid, created = read_pid(node_dirs(registry.get(run_id).node_dir)[rank])
    kill_process_tree(pid, create_time=created)


def wait_local(run_id: str, timeout: float) -> str:
    """The local run's state once it is no longer RUNNING; after `timeout` s, every node is stopped and
    the test fails with node 0's log."""
    import time

    import pytest

    from gpt2cloud.backends.local import LocalBackend, run_state

    rec = registry.get(run_id)
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = run_state(rec.node_dir)
        if state != "RUNNING":
            return state
        time.sleep(0.3)
    LocalBackend(graceful_seconds=0).stop(rec)
    pytest.fail(f"run {run_id} did not end in {timeout} s; node 0's log:\n"
                f"{(rec.node_dir / 'driver.log').read_text()[-3000:]}")
