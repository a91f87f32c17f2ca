"""gpt2cloud's own directory on this machine: `$GPT2CLOUD_HOME`, default ~/.gpt2cloud.

    runs/RUN.json          the run registry (gpt2cloud/runs/registry.py)
    builds/RUN/            the wheel, config.json and task.yaml shipped to a run's node (gpt2cloud/launch/build.py)
    local/RUN/             an `--infra local` run's node (gpt2cloud/backends/local.py)
    cache/val/             validation shards `gpt2cloud eval --val URL` downloaded
    calibration.jsonl      MFU points measured by this user's finished runs (`gpt2cloud report`)
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("GPT2CLOUD_HOME") or Path.home() / ".gpt2cloud")


def runs_dir() -> Path:
    return home() / "runs"


def build_dir(run_id: str) -> Path:
    return home() / "builds" / run_id


def local_node_dir(run_id: str) -> Path:
    return home() / "local" / run_id


def val_cache_dir() -> Path:
    return home() / "cache" / "val"


def user_calibration_path() -> Path:
    return home() / "calibration.jsonl"
