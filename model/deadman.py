"""The node's deadman: every phase outside the trainer's own watchdog (model/watchdog.py) has a bounded
time, and a full disk ends the job. What the node's scripts (gpt2cloud/launch/scripts.py renders these
constants into them), model/sync.py, model/streamdata.py and `status` (gpt2cloud/runs/status.py) agree on.

Why: SkyPilot counts a cluster idle only when no job is in a non-terminal state, so a job that hangs in
SETTING_UP or RUNNING (a wedged driver under `nvidia-smi`, a pip download that stalls, a bucket that
never answers, a rendezvous that never completes) keeps its node billing forever: autostop never fires.
Past its bound a phase is killed (its whole process tree), one line and a `deadman` timeline event say
which phase, and the job ends with that phase's own exit code, so the job is over and autostop runs.

Bounds are generous on purpose (each says what it allows for): a healthy phase never comes near one,
and a bound that fired on a slow but working node would waste more than the hang it guards against.
`GPT2CLOUD_BOUND_<PHASE>` (the phase's name in capitals, e.g. GPT2CLOUD_BOUND_TORCH) in the node's
environment shortens one: the tests use it; nothing else sets it.

With several nodes they also meet here before torchrun does (`python -m model.deadman rendezvous`, below):
a node that never comes is named, within RENDEZVOUS_BOUND.

Imports only the standard library (the node's sync runs without numpy or torch).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import selectors
import socket
import sys
import time
from pathlib import Path

# ---- exit codes (the job's; gpt2cloud/launch/task.py JOB_RECOVERY lists the ones a managed job recovers from)

EXIT_SETUP_HUNG = 80  # a setup part (nvidia-smi, venv, torch/deps download, CUDA init, wheel) passed its bound
EXIT_PULL_HUNG = 81  # the checkpoint pull from the bucket passed its bound
EXIT_DATA_HUNG = 82  # the first shards (validation + first training shard) did not arrive in time
EXIT_STARTUP_HUNG = 83  # the trainer did not finish its start-up (its watchdog never started) in time
EXIT_DISK_FULL = 28  # the node's disk filled up (28 is ENOSPC's errno: easy to recognise in a log)
EXIT_RENDEZVOUS_HUNG = 84  # with several nodes: a node never joined the rendezvous within RENDEZVOUS_BOUND

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
# Nor a rendezvous that never completed: a node that is gone or hung ended the job already (its own exit
# code, or a preemption, which a managed job recovers from anyway); what is left is most often the network
# between the nodes (a blocked port, a wrong interface), which a new cluster has just the same.
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
# With several nodes the run script adds PULL_BOUND + DATA_BOUND: the nodes' rendezvous (below) comes first
# in it, and a peer gets there only once its own pull and data wait are done.
STARTUP_BOUND = 1200
# With several nodes, how long a node waits at the rendezvous (below) for the others, from its own arrival:
# a healthy peer is at most its pull and its data wait behind (each ends at its bound, SkyPilot starts every
# node's run together, after all the setups), plus 10 min for the rest of its way there (its pusher's start,
# a slow Python start-up). Later than that it is gone or hung. It ends the wait before the start-up's bound
# (STARTUP_BOUND + PULL_BOUND + DATA_BOUND) would, and names the node that never came.
RENDEZVOUS_BOUND = PULL_BOUND + DATA_BOUND + 600
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


# ---- the nodes' rendezvous (several nodes)
#
# Before torchrun starts, every node reports to node 0 on the master port: a roll call. torchrun's own
# static rendezvous waits 600 s by default (shorter than a healthy peer may take to get there: its pull
# and data wait), then fails with a store timeout that names no node. The roll call waits as long as a
# peer may need (RENDEZVOUS_BOUND) and, past it, names the node that never came, on every node that is
# there: node 0 tells the others who is missing. It uses the port torchrun uses next, so it needs nothing
# open between the nodes that torchrun does not need; node 0 closes it before torchrun listens there.
#
# The messages, one line each: a peer's "gpt2cloud-rendezvous RUN RANK NODES"; node 0's "present R,R,..."
# (whenever that changes), then "go" (everyone is there: start torchrun) or "missing R,R,...".

HELLO = "gpt2cloud-rendezvous"
LINE_MAX = 256  # bytes: a longer line is not one of ours
CLOSE_WAIT_S = 5.0  # node 0 lets the others close first after "go" (the port is then free of their TIME_WAIT)


def rendezvous(rank: int, nodes: int, addr: str, port: int, timeout: float, run_id: str = "",
               timeline: str | None = None) -> int:
    """Meet the run's other nodes at ADDR:PORT (node 0 listens there, the others report to it): 0 once all
    `nodes` are there; after `timeout` seconds, one line naming the nodes that never came, a `deadman`
    event in `timeline`, and EXIT_RENDEZVOUS_HUNG."""
    deadline = time.monotonic() + timeout
    try:
        if rank == 0:
            missing, waited = _host(port, nodes, run_id, deadline, timeout), timeout
        else:
            missing, waited = _join(addr, port, rank, nodes, run_id, deadline, timeout)
    except OSError as e:  # node 0 cannot listen on the port: something else holds it
        print(f"gpt2cloud: RENDEZVOUS: node 0 cannot listen on port {port} for the rendezvous ({e}); the job ends "
              f"here (exit {EXIT_RENDEZVOUS_HUNG})", file=sys.stderr, flush=True)
        return EXIT_RENDEZVOUS_HUNG
    if not missing:
        return 0
    who = ("node " if len(missing) == 1 else "nodes ") + ", ".join(map(str, missing))
    print(f"gpt2cloud: RENDEZVOUS: {who} of {nodes} never joined the rendezvous at {addr}:{port} within {waited:g} s; "
          f"the job ends here (exit {EXIT_RENDEZVOUS_HUNG}), so that autostop removes the node; the missing node's own "
          "log says why it never came", file=sys.stderr, flush=True)
    if timeline:
        event = {"event": "deadman", "time": time.time(), "phase": "the rendezvous", "seconds": waited,
                 "code": EXIT_RENDEZVOUS_HUNG, "missing": missing, "address": f"{addr}:{port}"}
        try:
            with open(timeline, "a", encoding="utf-8") as f:  # one short append, beside the run script's own
                f.write(json.dumps(event) + "\n")
        except OSError:
            pass  # the line above said it
    return EXIT_RENDEZVOUS_HUNG


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _listen(port: int) -> socket.socket:
    """Node 0's listening socket on every interface (as torchrun's store listens), IPv4 and IPv6 if it can."""
    if socket.has_dualstack_ipv6():
        return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
    return socket.create_server(("", port))


def _host(port: int, nodes: int, run_id: str, deadline: float, timeout: float) -> list[int]:
    """Node 0: take the others' reports until all are in (then "go") or the deadline (then "missing R,R
    TIMEOUT"); the ranks missing. A peer that goes away before "go" is missing again until it reports again."""
    peers: dict[int, socket.socket] = {}
    parent = os.getppid()
    with _listen(port) as server, selectors.DefaultSelector() as sel:
        sel.register(server, selectors.EVENT_READ)
        while len(peers) < nodes - 1 and _left(deadline) > 0 and os.getppid() == parent:
            try:
                ready = sel.select(timeout=min(1.0, _left(deadline)))
            except OSError:  # a failed wait is not a failed listen: wait again (within the deadline)
                time.sleep(min(0.1, _left(deadline)))
                continue
            for key, _ in ready:
                if key.fileobj is server:
                    _accept(server, sel)
                elif _read_report(key, sel, peers, run_id, nodes):
                    _tell(peers.values(), "present " + ",".join(map(str, [0, *sorted(peers)])))
        missing = sorted(set(range(1, nodes)) - set(peers))
        _tell(peers.values(), f"missing {','.join(map(str, missing))} {timeout:g}" if missing else "go")
        _wait_closed(list(peers.values()), time.monotonic() + CLOSE_WAIT_S)
        for conn in peers.values():
            conn.close()
    return missing


def _accept(server: socket.socket, sel) -> None:
    """Take a connection, to read its report. One that failed on its way in (reset before it was accepted:
    ECONNABORTED) is not the listening socket's failure: the wait goes on."""
    try:
        conn, _ = server.accept()
    except OSError:
        return
    try:
        conn.settimeout(2.0)  # a send to a peer never blocks for long
        sel.register(conn, selectors.EVENT_READ, data={"buf": bytearray(), "rank": None})
    except (OSError, ValueError):
        conn.close()


def _read_report(key, sel, peers: dict, run_id: str, nodes: int) -> bool:
    """Read from a connection: a peer's report, or (once it reported) its end. Whether the set of nodes
    present changed. A connection that fails (reset: ECONNRESET) is one that ended."""
    conn, state = key.fileobj, key.data
    try:
        data = conn.recv(LINE_MAX)
    except OSError:  # ECONNRESET, ETIMEDOUT: that connection's end, not the rendezvous's
        data = b""
    if state["rank"] is not None:  # a peer that reported says nothing more: this is its end
        if data:
            return False
        sel.unregister(conn)
        conn.close()
        if peers.get(state["rank"]) is conn:
            del peers[state["rank"]]
            return True
        return False
    state["buf"] += data
    if data and b"\n" not in state["buf"] and len(state["buf"]) < LINE_MAX:
        return False  # the rest of its line is still on its way
    rank = _reported_rank(bytes(state["buf"]), run_id, nodes)
    if rank is None:  # gone before it reported, or not one of ours
        sel.unregister(conn)
        conn.close()
        return False
    if rank in peers:  # a node that reports again (it restarted): its new connection hears "go"
        sel.unregister(peers[rank])
        peers[rank].close()
    state["rank"], peers[rank] = rank, conn
    return True


def _reported_rank(buf: bytes, run_id: str, nodes: int) -> int | None:
    """The rank in a peer's report "gpt2cloud-rendezvous RUN RANK NODES" of this run; None for anything else."""
    parts = buf.split(b"\n", 1)[0].decode("ascii", "replace").split()
    if (len(parts) == 4 and parts[0] == HELLO and parts[1] == (run_id or "-") and parts[3] == str(nodes)
            and parts[2].isdigit() and 0 < int(parts[2]) < nodes):
        return int(parts[2])
    return None


def _tell(conns, message: str) -> None:
    for conn in conns:
        try:
            conn.sendall((message + "\n").encode())
        except OSError:
            pass  # it went away: its own line says why


def _wait_closed(conns: list, deadline: float) -> None:
    """Until each peer has closed its end (after "go"), or the deadline."""
    for conn in conns:
        try:
            conn.settimeout(max(0.01, _left(deadline)))
            while conn.recv(LINE_MAX):
                pass
        except OSError:
            pass


def _join(addr: str, port: int, rank: int, nodes: int, run_id: str, deadline: float,
          timeout: float) -> tuple[list[int], float]:
    """A node but 0: report to node 0 (again, whenever it goes away) until it says "go" or who is missing
    (and after how long), or the deadline: then the nodes node 0 last said were not there, or node 0 itself
    when it never answered. (The ranks missing, the seconds waited for them.)"""
    hello = f"{HELLO} {run_id or '-'} {rank} {nodes}\n".encode()
    parent = os.getppid()
    while _left(deadline) > 0 and os.getppid() == parent:
        try:
            conn = socket.create_connection((addr, port), timeout=max(0.01, min(2.0, _left(deadline))))
        except OSError:  # node 0 is not listening (yet)
            time.sleep(min(0.5, _left(deadline)))
            continue
        with conn:
            try:
                conn.sendall(hello)
                verdict = _hear(conn, deadline, nodes, parent, timeout)
            except OSError:
                verdict = None
        if verdict is not None:
            return verdict
    return [0], timeout


def _hear(conn: socket.socket, deadline: float, nodes: int, parent: int,
          timeout: float) -> tuple[list[int], float] | None:
    """Node 0's answers: nothing missing on "go", the ranks missing and node 0's wait on "missing R,R S", or
    at the deadline the ranks node 0's last "present R,R" lacked; None when node 0 went away."""
    present, buf = {0}, b""
    while _left(deadline) > 0 and os.getppid() == parent:
        conn.settimeout(max(0.01, min(1.0, _left(deadline))))
        try:
            data = conn.recv(LINE_MAX)
        except socket.timeout:
            continue
        if not data:
            return None
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            word, ranks, seconds = (line.decode("ascii", "replace").split() + ["", ""])[:3]
            listed = {int(r) for r in ranks.split(",") if r.isdigit()}
            if word == "go":
                return [], 0.0
            if word == "missing":
                return sorted(listed), float(seconds) if seconds.replace(".", "", 1).isdigit() else timeout
            if word == "present":
                present = listed | {0}
    return sorted(set(range(nodes)) - present), timeout


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.deadman", description="the node's bounded phases")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("rendezvous", help="meet the run's other nodes before torchrun (node 0 listens on PORT)")
    r.add_argument("--rank", type=int, required=True, help="this node's rank (SKYPILOT_NODE_RANK)")
    r.add_argument("--nodes", type=int, required=True)
    r.add_argument("--addr", required=True, help="node 0's address (the first of SKYPILOT_NODE_IPS)")
    r.add_argument("--port", type=int, required=True, help="the master port torchrun uses next")
    r.add_argument("--timeout", type=float, default=RENDEZVOUS_BOUND, help="seconds to wait for the others")
    r.add_argument("--run", default="", help="the run's id: a node of another run is not counted")
    r.add_argument("--timeline", default=None, help="append the deadman event to this file when one never came")
    a = p.parse_args(argv)
    return rendezvous(a.rank, a.nodes, a.addr, a.port, a.timeout, a.run, a.timeline)


if __name__ == "__main__":
    sys.exit(main())
