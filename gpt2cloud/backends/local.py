"""The local backend (`--infra local`): the generated setup and run scripts on this machine, as SkyPilot
would run them on one node.

The node is a directory, `$GPT2CLOUD_HOME/local/<run>/`: `sky_workdir/` (a copy of the task's workdir,
like SkyPilot's ~/sky_workdir), `node/` (the node's GPT2CLOUD_NODE_HOME: installed build, OUT, data),
`driver.log` (setup + run console output) and `exit_code` once the run ends. The driver is a bash
process in its own session; torchrun starts its workers in sessions of their own, so stopping a run
means walking the process tree from the driver's PID (see gpt2cloud/processes.py).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import psutil

from gpt2cloud import home, processes
from gpt2cloud.backends import register
from gpt2cloud.errors import UserError
from gpt2cloud.names import DOWN, FAILED, LOCAL, SUCCEEDED

DRIVER = r"""set -u
cd "$(dirname "$0")/sky_workdir"
echo "gpt2cloud local node: setup"
bash ../setup.sh
RC=$?
if [ "$RC" -eq 0 ]; then
  echo "gpt2cloud local node: run"
  bash ../run.sh
  RC=$?
fi
echo "$RC" > ../exit_code.tmp && mv ../exit_code.tmp ../exit_code
exit "$RC"
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def skypilot_envs(run_id: str, gpus_per_node: int) -> dict:
    """The variables SkyPilot sets on a one-node cluster (setup and run)."""
    cluster_info = {"cluster_name": run_id, "cloud": "local", "region": "local", "zone": None}
    return {
        "SKYPILOT_NODE_RANK": "0",
        "SKYPILOT_NODE_IPS": "127.0.0.1",
        "SKYPILOT_NUM_NODES": "1",
        "SKYPILOT_NUM_GPUS_PER_NODE": str(gpus_per_node),
        "SKYPILOT_SETUP_NODE_RANK": "0",
        "SKYPILOT_SETUP_NODE_IPS": "127.0.0.1",
        "SKYPILOT_TASK_ID": f"sky-local-{run_id}",
        "SKYPILOT_CLUSTER_INFO": json.dumps(cluster_info),
    }


@dataclass
class LocalHandle:
    """Where a local run lives (the run record's "handle"). A record rebuilt from what exists has none:
    its node is then the run's directory under $GPT2CLOUD_HOME/local/ (RunRecord.node_dir)."""

    pid: Optional[int] = None  # the driver's PID (also its process group and session)
    local_dir: Optional[str] = None  # the node's directory (logs, OUT, data)


@register
class LocalBackend:
    kind = LOCAL
    handle_type = LocalHandle

    def __init__(self, graceful_seconds: float = 10.0):
        self.graceful_seconds = graceful_seconds  # how long `down` lets the trainer save and the pusher push

    def start(self, record, task_cfg: dict, secrets: dict, save=None) -> None:
        """Start the task config on this machine. A relaunch of a run id starts a fresh node (like a new
        cloud VM): everything it knows comes back from the bucket."""
        run_id = record.run_id
        d = home.local_node_dir(run_id)
        previous = read_pid(d)
        if previous and processes.alive(*previous):
            raise UserError(f"run '{run_id}' is still running locally (PID {previous[0]}); stop it with "
                            f"`gpt2cloud down {run_id}` or pick another --name")
        if d.exists():
            shutil.rmtree(d)
        (d / "node").mkdir(parents=True)
        shutil.copytree(task_cfg["workdir"], d / "sky_workdir")
        (d / "setup.sh").write_text(task_cfg["setup"])
        (d / "run.sh").write_text(task_cfg["run"])
        (d / "driver.sh").write_text(DRIVER)
        env = dict(os.environ)
        env.update({k: str(v) for k, v in task_cfg.get("envs", {}).items()})
        env.update({k: v for k, v in secrets.items() if v is not None})
        env.update(skypilot_envs(run_id, record.spec.gpus_per_node))
        env["GPT2CLOUD_PYTHON"] = sys.executable
        env["GPT2CLOUD_NODE_HOME"] = str(d / "node")
        env["GPT2CLOUD_MASTER_PORT"] = str(free_port())
        env["GPT2CLOUD_NODE_UP"] = f"{time.time():.3f}"  # this machine's boot is not the node's: it comes up now
        env.pop("PYTHONPATH", None)  # the node sees only the shipped build (plus this Python's packages)
        with open(d / "driver.log", "ab") as log:
            proc = subprocess.Popen(
                ["bash", str(d / "driver.sh")], cwd=d, env=env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        (d / "driver.pid").write_text(f"{proc.pid} {processes.process_create_time(proc.pid) or 0!r}\n")
        record.handle = LocalHandle(pid=proc.pid, local_dir=str(d))

    def state(self, record) -> str:
        s = node_state(record.node_dir)
        return DOWN if record.state == DOWN and s == "STOPPED" else s

    def logs(self, record, follow: bool) -> int:
        log = record.node_dir / "driver.log"
        if not log.is_file():
            raise UserError(f"run '{record.run_id}' has no local log at {log}")
        follow_file(log, lambda: follow and node_state(record.node_dir) == "RUNNING")
        return 0

    def stop(self, record) -> str:
        """Kill the run's whole process tree (torchrun's workers sit in sessions of their own)."""
        ident = read_pid(record.node_dir)
        if not ident or not processes.alive(*ident):
            return "it was not running"
        processes.kill_process_tree(ident[0], graceful_seconds=self.graceful_seconds, create_time=ident[1])
        return "killed its local process tree"


def follow_file(path: Path, still_running, poll: float = 0.5) -> None:
    """Print path, then what is appended to it, until still_running() is False and nothing is left."""
    with open(path, "rb") as f:
        while True:
            chunk = f.read()
            if chunk:
                sys.stdout.write(chunk.decode("utf-8", "replace"))
                sys.stdout.flush()
                continue
            if not still_running():
                return
            time.sleep(poll)


# ---- processes ----

def read_pid(d: Path) -> Optional[tuple[int, Optional[float]]]:
    """(driver PID, its psutil create_time or None if unknown) from driver.pid; None if there is none."""
    try:
        pid, created = (d / "driver.pid").read_text().split()
        pid, created = int(pid), float(created)
    except (OSError, ValueError):
        return None
    if 0 < created < psutil.boot_time():  # written by an older version: /proc start time, clock ticks since boot
        created = created / os.sysconf("SC_CLK_TCK") + psutil.boot_time()
    return pid, created or None


def node_state(d: Path) -> str:
    """RUNNING, SUCCEEDED, FAILED (exit code N) or STOPPED (killed before it wrote an exit code)."""
    ident = read_pid(d)
    if ident and processes.alive(*ident):
        return "RUNNING"
    try:
        rc = int((d / "exit_code").read_text().strip())
    except (OSError, ValueError):
        return "STOPPED"
    return SUCCEEDED if rc == 0 else f"{FAILED} (exit code {rc})"
