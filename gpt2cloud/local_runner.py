"""`--infra local`: run the generated setup and run scripts on this machine, as SkyPilot would on one node.

The node is a directory, `$GPT2CLOUD_HOME/local/<run>/`: `sky_workdir/` (a copy of the task's workdir,
like SkyPilot's ~/sky_workdir), `node/` (the node's GPT2CLOUD_NODE_HOME: installed build, OUT, data),
`driver.log` (setup + run console output) and `exit_code` once the run ends. The driver is a bash
process in its own session; torchrun starts its workers in sessions of their own, so stopping a run
means walking the process tree from the driver's PID (see kill_tree).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from gpt2cloud import registry
from gpt2cloud.errors import UserError

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


def node_dir(run_id: str) -> Path:
    return registry.home() / "local" / run_id


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


def start(run_id: str, cfg: dict, secrets: dict, gpus_per_node: int) -> tuple[int, Path]:
    """Start the task config `cfg` (from tasks.build_config) on this machine; return (pid, node dir).

    A relaunch of a run id starts a fresh node (like a new cloud VM): everything it knows comes
    back from the bucket.
    """
    d = node_dir(run_id)
    previous = read_pid(d)
    if previous and alive(*previous):
        raise UserError(f"run '{run_id}' is still running locally (PID {previous[0]}); stop it with "
                        f"`gpt2cloud down {run_id}` or pick another --name")
    if d.exists():
        shutil.rmtree(d)
    (d / "node").mkdir(parents=True)
    shutil.copytree(cfg["workdir"], d / "sky_workdir")
    (d / "setup.sh").write_text(cfg["setup"])
    (d / "run.sh").write_text(cfg["run"])
    (d / "driver.sh").write_text(DRIVER)
    env = dict(os.environ)
    env.update({k: str(v) for k, v in cfg.get("envs", {}).items()})
    env.update({k: v for k, v in secrets.items() if v is not None})
    env.update(skypilot_envs(run_id, gpus_per_node))
    env["GPT2CLOUD_PYTHON"] = sys.executable
    env["GPT2CLOUD_NODE_HOME"] = str(d / "node")
    env["GPT2CLOUD_MASTER_PORT"] = str(free_port())
    env.pop("PYTHONPATH", None)  # the node sees only the shipped build (plus this Python's packages)
    with open(d / "driver.log", "ab") as log:
        proc = subprocess.Popen(
            ["bash", str(d / "driver.sh")], cwd=d, env=env, stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    (d / "driver.pid").write_text(f"{proc.pid} {_start_time(proc.pid) or 0}\n")
    return proc.pid, d


# ---- processes ----

def _stat(pid: int) -> Optional[list[str]]:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces; it is wrapped in parentheses
    return [raw[: raw.index("(")].strip()] + ["comm"] + raw[raw.rindex(")") + 2:].split()


def _start_time(pid: int) -> Optional[int]:
    st = _stat(pid)
    return int(st[21]) if st else None


def read_pid(d: Path) -> Optional[tuple[int, int]]:
    try:
        pid, start_time = (d / "driver.pid").read_text().split()
        return int(pid), int(start_time)
    except (OSError, ValueError):
        return None


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)  # when this process started it (tests), collect the zombie
    except (ChildProcessError, OSError):
        pass


def alive(pid: int, start_time: int = 0) -> bool:
    _reap(pid)
    st = _stat(pid)
    if st is None or st[2] == "Z":
        return False
    return not start_time or int(st[21]) == start_time  # a reused PID is another process


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            st = _stat(int(p.name))
            if st:
                children.setdefault(int(st[3]), []).append(int(p.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _signal(pids, sig) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _grow(tree: dict[int, int]) -> bool:
    """Add the living descendants of every process in tree ({pid: start time}); True if any were new."""
    grew = False
    for p in list(tree):
        if not alive(p, tree[p]):
            continue
        for c in descendants(p):
            if c not in tree:
                st = _start_time(c)
                if st is not None:
                    tree[c] = st
                    grew = True
    return grew


def kill_tree(pid: int, graceful_seconds: float = 0.0) -> None:
    """Stop pid and every process below it, including torchrun workers in their own sessions.

    The tree is collected before anything is signalled (an orphan is re-parented away from it).
    graceful_seconds > 0: SIGTERM everything first (the pusher makes its final push) and wait that
    long; then freeze what is left (SIGSTOP, so nothing forks), collect again, SIGKILL it all.
    """
    tree = {pid: _start_time(pid) or 0}
    _grow(tree)
    if graceful_seconds > 0:
        _signal(list(tree), signal.SIGTERM)
        deadline = time.time() + graceful_seconds
        while time.time() < deadline:
            _grow(tree)
            if not any(alive(p, s) for p, s in tree.items()):
                return
            time.sleep(0.2)
    while True:
        _signal([p for p, s in tree.items() if alive(p, s)], signal.SIGSTOP)
        if not _grow(tree):
            break
    living = [p for p, s in tree.items() if alive(p, s)]
    _signal(living, signal.SIGKILL)
    _signal(living, signal.SIGCONT)
    deadline = time.time() + 5
    while time.time() < deadline and any(alive(p, tree[p]) for p in living):
        time.sleep(0.05)


def state(d: Path) -> str:
    """RUNNING, SUCCEEDED, FAILED (exit code N) or STOPPED (killed before it wrote an exit code)."""
    ident = read_pid(d)
    if ident and alive(*ident):
        return "RUNNING"
    try:
        rc = int((d / "exit_code").read_text().strip())
    except (OSError, ValueError):
        return "STOPPED"
    return "SUCCEEDED" if rc == 0 else f"FAILED (exit code {rc})"


def stop(record: registry.RunRecord, graceful_seconds: float = 10.0) -> bool:
    """Kill a local run's whole tree; False if it was not running."""
    d = Path(record.local_dir) if record.local_dir else node_dir(record.run_id)
    ident = read_pid(d)
    if not ident or not alive(*ident):
        return False
    kill_tree(ident[0], graceful_seconds=graceful_seconds)
    return True
