"""Shared by the tests that run the node's scripts for real on this machine: the node's environment, a
fake program on PATH, and a real full disk (a small tmpfs in a mount namespace of the test's own)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from trainer_helpers import env

from gpt2cloud.launch import build, scripts
from gpt2cloud.store import open_store
from gpt2cloud.store.transfer import upload_dir


def node_env(tmp_path: Path, data_url: str, run_url: str, **extra: str) -> dict:
    """The envs a one-node task gives its scripts (gpt2cloud/launch/plan.py node_envs), with this
    machine's Python standing in for the node's venv."""
    e = {**env(), "GPT2CLOUD_PYTHON": sys.executable, "GPT2CLOUD_NODE_HOME": str(tmp_path / "node"),
         "GPT2CLOUD_DEVICE": "auto", "GPT2CLOUD_GPUS_PER_NODE": "1", "GPT2CLOUD_BUILD": "test",
         "GPT2CLOUD_TORCH_SPEC": "torch", "GPT2CLOUD_RUN_ID": "r1", "GPT2CLOUD_RUN_URL": run_url,
         "GPT2CLOUD_DATA_URL": data_url, "GPT2CLOUD_PUSH_EVERY": "1", "GPT2CLOUD_KEEP_CHECKPOINTS": "2",
         "GPT2CLOUD_PUSH_RETRY_SECONDS": "0.05", "SKYPILOT_NODE_RANK": "0", "SKYPILOT_NODE_IPS": "127.0.0.1",
         "SKYPILOT_NUM_NODES": "1", "SKYPILOT_NUM_GPUS_PER_NODE": "1", **extra}
    e.pop("PYTHONPATH", None)
    return e


def uploaded_data(tmp_path: Path, shards: Path) -> str:
    """The shards as a set in a file:// 'bucket' (manifest and all), as `data upload` leaves it."""
    url = (tmp_path / "data-bucket").as_uri()
    upload_dir(shards, open_store(url), progress=False)
    return url


def workdir(tmp_path: Path, config_json: str = "{}", wheel: tuple | None = None) -> Path:
    """The task's workdir: a wheel (this build unless given) and config.json."""
    d = tmp_path / "workdir"
    build.write_workdir(d, wheel or build.wheel_bytes(), config_json, "")
    return d


def run_script(script: str, cwd: Path, e: dict, timeout: float = 240, prefix: tuple = ()) -> tuple:
    """(the completed process, its seconds): a node script, rendered, run with bash in `cwd`."""
    t0 = time.monotonic()
    p = subprocess.run([*prefix, "bash", "-c", scripts.render(script)], cwd=cwd, env=e, capture_output=True,
                       text=True, timeout=timeout)
    return p, time.monotonic() - t0


def fake_program(bin_dir: Path, name: str, body: str) -> Path:
    """An executable `name` in bin_dir (put first on PATH) running the sh `body`."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def hanging(pid_file: Path) -> str:
    """An sh body that records its pid and hangs (exec: the pid is the hanging process's)."""
    return f'echo $$ > "{pid_file}"\nexec sleep 600'


def pid_alive(pid_file: Path) -> bool:
    pid = int(pid_file.read_text())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def on_small_disks(disks: dict[Path, int]) -> tuple:
    """A command prefix: what follows runs in a mount namespace of its own where each path is a tmpfs of
    that many KB, so a write past it fails with ENOSPC, as on a full disk; the mounts end with the
    process, nothing to clean up. Root mounts there directly; anyone else through a user namespace."""
    mounts = " && ".join(f"mkdir -p {shlex.quote(str(p))} && mount -t tmpfs -o size={kb}k tmpfs {shlex.quote(str(p))}"
                         for p, kb in disks.items())
    namespace = ("unshare", "--mount", "--propagation", "private") if os.geteuid() == 0 else (
        "unshare", "--user", "--map-root-user", "--mount")
    return (*namespace, "sh", "-c", f'{mounts} && exec "$@"', "sh")
