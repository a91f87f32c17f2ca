"""The names of what a run writes, one definition for the trainer, the node's sync and every reader.

A run's OUT directory (on the node, fetched to this machine) and its bucket prefix hold the same tree:

    run.json                      the run's spec, written at launch (gpt2cloud/runs/registry.py RunSpec)
    config.json                   the TrainConfig the trainer reads (in the node's workdir)
    metrics.jsonl                 one JSON object a line (model/metrics.py writes and reads it)
    timeline.jsonl                the node's phases, appended by its scripts (read with the metrics)
    checkpoints/step_NNNNNN/      one checkpoint; complete only once its manifest.json exists
    logs/node-R.log               each node's console output
    stop_request.json             in the bucket only, while `down --graceful` waits: who asked the node to stop
    unseen_attempts.json          a spot run's attempts that never reached the bucket, written by `status` from
                                  SkyPilot's managed-job records (gpt2cloud/runs/attempts.py); the pull fetches it

A set of files (prepared shards, one checkpoint) is complete once its MANIFEST exists: it is written last.
"""

from __future__ import annotations

import re
from pathlib import Path

NODE_HOME = ".gpt2cloud-node"  # on a node, under the user's home: venv/, site/, data/ and OUT (out/)
MANIFEST = "manifest.json"
# State files of the tool beside a set, never part of it (never in a manifest gpt2cloud builds):
PREPARE_STATE = ".prepare-state.json"  # an unfinished `data prepare` (gpt2cloud/data/prepare.py)
DATA_STATUS = "download.json"  # the node's streaming data download (model/datadir.py)
UPLOAD_MARK = ".gpt2cloud-upload.json"  # in a prefix: an upload under way names its set (store/sets.py)
DOWNLOAD_MARK = ".gpt2cloud-download.json"  # in a directory: the same for a download
STATE_FILES = (PREPARE_STATE, UPLOAD_MARK, DOWNLOAD_MARK)
METRICS = "metrics.jsonl"
TIMELINE = "timeline.jsonl"  # the node's phases (node up, setup, data, training, push, exit), one JSON a line
PUSH_STATUS = "push_status.json"  # how the node's pushes are going (model/pushstate.py)
STOP_REQUEST = "stop_request.json"  # `gpt2cloud down --graceful` asks the node to stop (model/stoprequest.py)
UNSEEN_ATTEMPTS = "unseen_attempts.json"  # node time the bucket never saw, from SkyPilot (gpt2cloud/runs/attempts.py)
RUN_JSON = "run.json"
CONFIG = "config.json"
CHECKPOINTS = "checkpoints"
LOGS = "logs"
TENSORBOARD = "tensorboard"  # TensorBoard's event files (model/trackers.py), pushed by rank 0, fetched with the metrics
STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir(step: int) -> str:
    """The checkpoint directory name of a step: step_000250."""
    return f"step_{step:06d}"


def node_log(rank: int) -> str:
    return f"{LOGS}/node-{rank}.log"


def local_checkpoints(out_dir) -> list[tuple[int, Path]]:
    """Complete checkpoints (manifest present) under OUT/checkpoints/, oldest first."""
    d = Path(out_dir) / CHECKPOINTS
    found = []
    if d.is_dir():
        for p in d.iterdir():
            m = STEP_DIR.match(p.name)
            if m and p.is_dir() and (p / MANIFEST).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def remote_checkpoints(store) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(complete, incomplete) checkpoint directory names in a run's store, oldest first."""
    dirs: dict[str, bool] = {}
    for obj in store.list(f"{CHECKPOINTS}/"):
        parts = obj.key.split("/")
        if len(parts) >= 3 and parts[0] == CHECKPOINTS and STEP_DIR.match(parts[1]):
            dirs[parts[1]] = dirs.get(parts[1], False) or (len(parts) == 3 and parts[2] == MANIFEST)
    complete = sorted((int(STEP_DIR.match(n).group(1)), n) for n, ok in dirs.items() if ok)
    incomplete = sorted((int(STEP_DIR.match(n).group(1)), n) for n, ok in dirs.items() if not ok)
    return complete, incomplete
