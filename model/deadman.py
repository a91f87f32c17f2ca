"""The node's deadman: every phase outside the trainer's own watchdog (model/watchdog.py) has a bounded
time, and a full disk ends the job. What the node's scripts (gpt2cloud/launch/scripts.py renders these
constants into them), model/sync.py and `status` (gpt2cloud/runs/status.py) agree on.

Why: SkyPilot counts a cluster idle only when no job is in a non-terminal state, so a job that hangs in
SETTING_UP or RUNNING (a wedged driver under `nvidia-smi`, a pip download that stalls, a bucket that
never answers, a rendezvous that never completes) keeps its node billing forever: autostop never fires.
Past its bound a phase is killed (its whole process tree), one line and a `deadman` timeline event say
which phase, and the job ends with that phase's own exit code, so the job is over and autostop runs.

Bounds are generous on purpose (each says what it allows for): a healthy phase never comes near one,
and a bound that fired on a slow but working node would waste more than the hang it guards against.
`GPT2CLOUD_BOUND_<PHASE>` (the phase's name in capitals, e.g. GPT2CLOUD_BOUND_TORCH) in the node's
environment shortens one: the tests use it; nothing else sets it.

Imports only the standard library (the node's sync runs without numpy or torch).
"""

from __future__ import annotations

import errno
from pathlib import Path

# ---- exit codes (the job's; gpt2cloud/launch/task.py JOB_RECOVERY lists the ones a managed job recovers from)

EXIT_SETUP_HUNG = 80  # a setup part (nvidia-smi, venv, torch/deps download, CUDA init, wheel) passed its bound
EXIT_PULL_HUNG = 81  # the checkpoint pull from the bucket passed its bound
EXIT_DATA_HUNG = 82  # the first shards (validation + first training shard) did not arrive in time
EXIT_STARTUP_HUNG = 83  # the trainer did not finish its start-up (its watchdog never started) in time
EXIT_DISK_FULL = 28  # the node's disk filled up (28 is ENOSPC's errno: easy to recognise in a log)

# Which of them a managed (spot) job recovers from, on a fresh node:
# - a setup hang is this node's own: a driver wedged in `nvidia-smi` or CUDA init, or its link to the
#   package index stalled; a new node (EAGER_NEXT_REGION: maybe another region) rarely has either;
# - a start-up hang is a rendezvous or CUDA init that never completes: a lost peer or a wedged GPU, the
#   same kind of transient fault as the watchdog's stall (EXIT_STALLED), which is recovered from too.
# Not the pull or the data hang: the bucket and the data source are the same for every node, so a
# relaunch would most likely hang the same way and bill the bound again; and SkyPilot restarts a code
# listed in recover_on_exit_codes without limit (0.14.1 recovery_strategy.should_restart_on_failure skips
# the max_restarts_on_errors count), so only a fault a new node cures may be listed. Nor a full disk: the
# new node gets the same disk_size (gpt2cloud/launch/plan.py sizes it), so it would fill up again.
RECOVERABLE = (EXIT_SETUP_HUNG, EXIT_STARTUP_HUNG)

# ---- bounds, in seconds

# Setup, part by part (the names are the parts of the timeline's `setup` event, plus nvidia_smi).
SETUP_BOUNDS = {
    # `nvidia-smi` answers in under a second on a healthy node (seconds with 8 GPUs out of persistence
    # mode); a wedged driver never answers, and then neither would anything else on the GPUs.
    "nvidia_smi": 120,
    # a venv (seconds) and uv from PyPI (~15 MB): 10 min allows ~25 KB/s.
    "venv": 600,
    # CUDA torch with its NVIDIA libraries is ~3-3.5 GB of wheels: at a slow 2 MB/s that is ~30 min, plus
    # unpacking (a few minutes on a slow disk). A healthy node takes 1-3 min.
    "torch": 2700,
    # numpy, tiktoken, safetensors, boto3 ... (~100 MB): 15 min allows ~0.1 MB/s and pip's own retries.
    "deps": 900,
    # import torch (seconds) and CUDA init of up to 8 GPUs: under a minute normally, a few minutes the
    # first time a driver loads; 10 min, or the GPUs are not going to work.
    "gpu_check": 600,
    # the wheel from the workdir, no network: seconds.
    "wheel": 300,
}
# The pull: the newest checkpoint, at most the 1558M recipe's (weights 4 + AdamW 8 bytes a parameter:
# ~19 GB), at a slow 10 MB/s ~32 min, plus listing and sha256-verifying it (~1 min): 40 min. A healthy
# link to the bucket moves 100+ MB/s.
PULL_BOUND = 2400
# The data wait: the validation shards, the first training shard and any small file (HellaSwag): llm.c
# shards are 100M tokens (200 MB), so ~400-600 MB, at a slow 0.5 MB/s ~20 min: 30 min.
DATA_BOUND = 1800
# The trainer's start-up until its watchdog starts (model/train.py set_up): import torch and CUDA init
# (~1 min), the 1558M model built and moved to the GPU (~1-2 min), the token check of the shards already
# there (a relaunch may hold 100+ GB: ~3-4 min at disk speed), HellaSwag and the process group: 20 min.
# With several nodes the run script adds PULL_BOUND + DATA_BOUND: torchrun's rendezvous waits for every
# node, and a peer starts its trainer only once its own pull and data wait are done.
STARTUP_BOUND = 1200
BOUND_ENV = "GPT2CLOUD_BOUND_"  # + the phase in capitals: a shorter bound (tests)

# ---- a full disk

# The marker a process that hit a full disk leaves in OUT (it may fail to write even this: the run script
# also looks at the disk's free space), so that the run script ends the job with EXIT_DISK_FULL.
DISK_FULL = "disk_full"
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # no space left; a quota reached


def is_disk_full(e: BaseException | None) -> bool:
    """Whether the error is (or was raised while handling) a full disk: stores wrap the OSError in a
    StorageError (`from None` still keeps it as the context), some only in its text."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def note_disk_full(out: str | Path, what: str) -> None:
    """Leave the DISK_FULL marker in OUT saying what failed. Creating a file needs no free data block, so
    the marker is there even when its text does not fit; if even that fails, the run script's look at
    the disk's free space still tells."""
    try:
        (Path(out) / DISK_FULL).write_text(f"{what}\n")
    except OSError:
        pass
