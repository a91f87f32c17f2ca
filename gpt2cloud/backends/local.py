"""The local backend (`--infra local`): the generated setup and run scripts on this machine, as SkyPilot
would run them on each node of the task (`--nodes N`: N nodes here, each with its own everything).

A node is a directory holding what a cloud VM would: `sky_workdir/` (a copy of the task's workdir, like
SkyPilot's ~/sky_workdir), `node/` (the node's GPT2CLOUD_NODE_HOME: installed build, OUT, data), its
scripts, `driver.log` (setup + run console output), `driver.pid` and `exit_code` once its job ends. Node 0
is the run's directory itself, `$GPT2CLOUD_HOME/local/<run>/`, where a one-node run has always had its
node, so whatever reads a local run's node (`status`, `report`, a record rebuilt from what exists) finds
node 0's: the node that writes the metrics and pushes the checkpoints. Node R > 0 is `<run>/node-R/`.

Each node's driver is a bash process in its own session; torchrun starts its workers in sessions of their
own, so stopping a node means walking the process tree from its driver's PID (see gpt2cloud/processes.py).
The nodes get SkyPilot's variables as SkyPilot 0.14.1 sets them (skypilot_envs), all at 127.0.0.1, and
share one free loopback port as torchrun's master port. Each node of a GPU type gets GPUs of its own, a
slice of this machine's (CUDA_VISIBLE_DEVICES, node_gpu_env); CPU ranks get none. The run is one run:
RUNNING while any node runs, SUCCEEDED once every node did, FAILED when any failed (run_state); `down`
stops every node.

One difference from SkyPilot, on purpose: SkyPilot's job driver also cancels the other nodes the moment
one fails (get_or_fail in sky/backends/task_codegen.py), and runs `run` only once every node's setup is
done. The local nodes run on their own, so a node that dies leaves its peers to end by their own bounds
(the rendezvous's, torchrun's, the trainer's watchdog): a local run shows that they do.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import psutil

from gpt2cloud import home, processes
from gpt2cloud.backends import register
from gpt2cloud.errors import UserError
from gpt2cloud.names import CPU, DOWN, FAILED, LOCAL, NODE_EXTRAS_ENV, SUCCEEDED
from model.notify import NOTIFY_ENV

RUNNING, STOPPED = "RUNNING", "STOPPED"

# What SkyPilot 0.14.1 gives only its setup, and only its run (sky/backends/cloud_vm_ray_backend.py _setup;
# sky/backends/task_codegen.py RayCodeGen._add_ray_task): each node's driver takes the other's away.
SETUP_ONLY = ("SKYPILOT_SETUP_NODE_RANK", "SKYPILOT_SETUP_NODE_IPS", "SKYPILOT_SETUP_NUM_GPUS_PER_NODE")
RUN_ONLY = ("SKYPILOT_NODE_RANK", "SKYPILOT_NODE_IPS", "SKYPILOT_NUM_GPUS_PER_NODE", "SKYPILOT_INTERNAL_JOB_ID")

DRIVER = r"""set -u
cd "$(dirname "$0")/sky_workdir"
echo "gpt2cloud local node: setup"
env @SETUP_UNSET@ bash ../setup.sh
RC=$?
if [ "$RC" -eq 0 ]; then
  echo "gpt2cloud local node: run"
  env @RUN_UNSET@ bash ../run.sh
  RC=$?
fi
echo "$RC" > ../exit_code.tmp && mv ../exit_code.tmp ../exit_code
exit "$RC"
"""


def driver_script() -> str:
    """A node's driver: setup without the run's variables, then run without setup's."""
    return (DRIVER.replace("@SETUP_UNSET@", " ".join(f"-u {name}" for name in RUN_ONLY))
            .replace("@RUN_UNSET@", " ".join(f"-u {name}" for name in SETUP_ONLY)))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def skypilot_envs(run_id: str, gpus_per_node: int, rank: int = 0, nodes: int = 1) -> dict:
    """The variables SkyPilot 0.14.1 sets on node `rank` of a cluster of `nodes` (the driver gives setup and
    run each only theirs: SETUP_ONLY, RUN_ONLY). Every node is 127.0.0.1 here, one line per node, head first."""
    ips = "\n".join(["127.0.0.1"] * nodes)
    cluster_info = {"cluster_name": run_id, "cloud": "local", "region": "local", "zone": None}
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name and no passwd entry (a bare container)
        user = "local"
    return {
        # both: the job's own (cloud_vm_ray_backend.py _get_task_env_vars, _skypilot_predefined_env_vars)
        "SKYPILOT_TASK_ID": f"sky-local-{run_id}",
        "SKYPILOT_CLUSTER_INFO": json.dumps(cluster_info),
        "SKYPILOT_USER": user,
        "SKYPILOT_NUM_NODES": str(nodes),
        # setup (_setup)
        "SKYPILOT_SETUP_NODE_RANK": str(rank),
        "SKYPILOT_SETUP_NODE_IPS": ips,
        "SKYPILOT_SETUP_NUM_GPUS_PER_NODE": str(gpus_per_node),
        # run (task_codegen.py)
        "SKYPILOT_NODE_RANK": str(rank),
        "SKYPILOT_NODE_IPS": ips,
        "SKYPILOT_NUM_GPUS_PER_NODE": str(gpus_per_node),
        "SKYPILOT_INTERNAL_JOB_ID": "1",
    }


@dataclass
class LocalHandle:
    """Where a local run lives (the run record's "handle"). A record rebuilt from what exists has none:
    its node is then the run's directory under $GPT2CLOUD_HOME/local/ (RunRecord.node_dir)."""

    pid: Optional[int] = None  # node 0's driver's PID (also its process group and session)
    local_dir: Optional[str] = None  # the run's directory: node 0's (logs, OUT, data), the others' below it


@register
class LocalBackend:
    kind = LOCAL
    handle_type = LocalHandle

    def __init__(self, graceful_seconds: float = 10.0):
        self.graceful_seconds = graceful_seconds  # how long `down` lets the trainer save and the pusher push

    def start(self, record, task_cfg: dict, secrets: dict, save=None) -> None:
        """Start the task config on this machine, one driver per node. A relaunch of a run id starts fresh
        nodes (like new cloud VMs): everything they know comes back from the bucket."""
        run_id, nodes = record.run_id, max(1, int(record.spec.nodes or 1))
        d = home.local_node_dir(run_id)
        live = live_drivers(node_dirs(d))
        if live:
            raise UserError(f"run '{run_id}' is still running locally (PID {live[0][0]}); stop it with "
                            f"`gpt2cloud down {run_id}` or pick another --name")
        if d.exists():
            shutil.rmtree(d)
        env = shared_env(task_cfg, secrets)
        started: list[tuple[int, Optional[float]]] = []
        try:
            for rank in range(nodes):
                node_env = {**env, **skypilot_envs(run_id, record.spec.gpus_per_node, rank, nodes),
                            **node_gpu_env(record.spec.gpu_type, record.spec.gpus_per_node, rank,
                                           os.environ.get("CUDA_VISIBLE_DEVICES"))}
                started.append(start_node(node_dir(d, rank), task_cfg, node_env))
        except BaseException:  # a node that could not start: the ones that did are stopped, nothing is left
            for pid, created in started:
                processes.kill_process_tree(pid, create_time=created)
            raise
        record.handle = LocalHandle(pid=started[0][0], local_dir=str(d))

    def state(self, record) -> str:
        s = run_state(record.node_dir)
        return DOWN if record.state == DOWN and s == STOPPED else s

    def logs(self, record, follow: bool) -> int:
        """Every node's driver log; with several nodes each line says whose, as SkyPilot's own log does."""
        dirs = node_dirs(record.node_dir)
        if not (dirs[0] / "driver.log").is_file():
            raise UserError(f"run '{record.run_id}' has no local log at {dirs[0] / 'driver.log'}")
        logs = [(f"(node {rank}) " if len(dirs) > 1 else "", n / "driver.log") for rank, n in enumerate(dirs)]
        follow_files(logs, lambda: follow and run_state(record.node_dir) == RUNNING)
        return 0

    def stop(self, record) -> str:
        """Kill every node's whole process tree (torchrun's workers sit in sessions of their own), all at
        once: each node gets the same graceful seconds to save and push."""
        dirs = node_dirs(record.node_dir)
        live = live_drivers(dirs)
        if not live:
            return "it was not running"
        with ThreadPoolExecutor(max_workers=len(live)) as pool:
            list(pool.map(lambda ident: processes.kill_process_tree(
                ident[0], graceful_seconds=self.graceful_seconds, create_time=ident[1]), live))
        if len(dirs) == 1:
            return "killed its local process tree"
        return f"killed the local process trees of its {len(live)} running node(s) of {len(dirs)}"


def node_gpu_env(gpu_type: str, gpus_per_node: int, rank: int, visible: Optional[str]) -> dict:
    """Node `rank`'s CUDA_VISIBLE_DEVICES: a GPU type's nodes each their own slice of this machine's GPUs
    (of `visible`, this shell's CUDA_VISIBLE_DEVICES, when set), rank R devices R*count .. (R+1)*count-1,
    since every node's torchrun numbers its ranks' cuda:LOCAL_RANK from 0 (model/startup.py); CPU ranks
    none, so that they never touch a GPU. The launch refuses more GPUs than there are
    (gpt2cloud/launch/plan.py check_local_gpus)."""
    if gpu_type == CPU:
        return {"CUDA_VISIBLE_DEVICES": ""}
    first = rank * gpus_per_node
    if visible is None:
        ids = [str(i) for i in range(first, first + gpus_per_node)]
    else:
        ids = [d.strip() for d in visible.split(",") if d.strip()][first:first + gpus_per_node]
    return {"CUDA_VISIBLE_DEVICES": ",".join(ids)}


# What this shell may hold that only the launch may give a node: --notify's webhook URLs (a secret) and the
# trackers' packages to install. A local node gets the run's own (its task's envs and secrets), never a stray one.
LAUNCH_ONLY = (NOTIFY_ENV, NODE_EXTRAS_ENV)


def shared_env(task_cfg: dict, secrets: dict) -> dict:
    """What every node's driver gets: this environment (less LAUNCH_ONLY's), the task's envs and secrets,
    this machine's Python, the master port (one free loopback port: torchrun's rendezvous, the same on every
    node) and when the nodes came up (this machine's boot is not theirs: they come up now)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ONLY}
    env.update({k: str(v) for k, v in task_cfg.get("envs", {}).items()})
    env.update({k: v for k, v in secrets.items() if v is not None})
    env["GPT2CLOUD_PYTHON"] = sys.executable
    env["GPT2CLOUD_MASTER_PORT"] = str(free_port())
    env["GPT2CLOUD_NODE_UP"] = f"{time.time():.3f}"
    env.pop("PYTHONPATH", None)  # the node sees only the shipped build (plus this Python's packages)
    return env


def start_node(d: Path, task_cfg: dict, env: dict) -> tuple[int, Optional[float]]:
    """One node: its directory (a fresh VM's: the workdir, the scripts), its driver started in a session of
    its own; (the driver's PID, its create time), also written to d/driver.pid."""
    (d / "node").mkdir(parents=True)
    shutil.copytree(task_cfg["workdir"], d / "sky_workdir")
    (d / "setup.sh").write_text(task_cfg["setup"])
    (d / "run.sh").write_text(task_cfg["run"])
    (d / "driver.sh").write_text(driver_script())
    env = {**env, "GPT2CLOUD_NODE_HOME": str(d / "node")}
    with open(d / "driver.log", "ab") as log:
        proc = subprocess.Popen(
            ["bash", str(d / "driver.sh")], cwd=d, env=env, stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    created = processes.process_create_time(proc.pid)
    (d / "driver.pid").write_text(f"{proc.pid} {created or 0!r}\n")
    return proc.pid, created


def follow_files(logs: list[tuple[str, Path]], still_running: Callable[[], bool], poll: float = 0.5) -> None:
    """Print each (prefix, path) log, then what is appended to them, until still_running() is False and
    nothing is left. With a prefix, whole lines only (each with it), so that the nodes' lines never mix."""
    files: dict[Path, object] = {}
    partial = {path: b"" for _, path in logs}
    try:
        while True:
            moved = False
            for prefix, path in logs:
                if path not in files and path.is_file():
                    files[path] = open(path, "rb")
                chunk = files[path].read() if path in files else b""
                moved = moved or bool(chunk)
                partial[path] = _write(prefix, partial[path] + chunk)
            if moved:
                continue
            if not still_running():
                for prefix, path in logs:  # a last line without its newline
                    if partial[path]:
                        _write(prefix, partial[path] + b"\n")
                return
            time.sleep(poll)
    finally:
        for f in files.values():
            f.close()


def _write(prefix: str, data: bytes) -> bytes:
    """Print data (with a prefix: its whole lines, each prefixed); what is left to print later."""
    if not prefix:
        rest = b""
    else:
        data, nl, rest = data.rpartition(b"\n")
        data = b"".join(prefix.encode() + line + b"\n" for line in data.split(b"\n")) if nl else b""
    if data:
        sys.stdout.write(data.decode("utf-8", "replace"))
        sys.stdout.flush()
    return rest


# ---- nodes and their processes ----

def node_dir(run_dir: Path, rank: int) -> Path:
    """Node `rank`'s directory: node 0 is the run's own, node R > 0 its `node-R/`."""
    return run_dir if rank == 0 else run_dir / f"node-{rank}"


def node_dirs(run_dir: Path) -> list[Path]:
    """The run's nodes' directories, node 0 first (there is always one: node 0 is the run's directory)."""
    dirs = [run_dir]
    while node_dir(run_dir, len(dirs)).is_dir():
        dirs.append(node_dir(run_dir, len(dirs)))
    return dirs


def live_drivers(dirs: list[Path]) -> list[tuple[int, Optional[float]]]:
    """The (PID, start time) of each node driver among `dirs` that is still running."""
    return [ident for ident in map(read_pid, dirs) if ident and processes.alive(*ident)]


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
    """One node's: RUNNING, SUCCEEDED, FAILED (exit code N) or STOPPED (killed before it wrote an exit code)."""
    ident = read_pid(d)
    if ident and processes.alive(*ident):
        return RUNNING
    try:
        rc = int((d / "exit_code").read_text().strip())
    except (OSError, ValueError):
        return STOPPED
    return SUCCEEDED if rc == 0 else f"{FAILED} (exit code {rc})"


def run_state(run_dir: Path) -> str:
    """The run's, from its nodes': RUNNING while any node runs, SUCCEEDED once all did; else the first
    failed node's FAILED (exit code N), naming it and how the others ended; else STOPPED (a node was
    killed before it wrote an exit code, and none failed)."""
    states = [node_state(d) for d in node_dirs(run_dir)]
    if len(states) == 1:
        return states[0]
    if RUNNING in states:
        return RUNNING
    if all(s == SUCCEEDED for s in states):
        return SUCCEEDED
    failed = next((rank for rank, s in enumerate(states) if s.startswith(FAILED)), None)
    if failed is None:
        return STOPPED
    others = "; ".join(f"node {rank}: {s}" for rank, s in enumerate(states) if rank != failed)
    return f"{states[failed]} on node {failed} of {len(states)}; {others}"
