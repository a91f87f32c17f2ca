"""The node's deadman (model/deadman.py), run for real on this machine: each phase outside the trainer's
watchdog that hangs (a setup part, the checkpoint pull, the data wait, the trainer's start-up) is killed
at its bound, says so in one line and a `deadman` timeline event, and ends the job with its own exit
code, so that the job is over and autostop removes the node. The hangs are fakes that really hang: a
`nvidia-smi`, a pip and a CUDA init that sleep, a bucket that answers but never finishes, a data source
that barely moves, a rendezvous whose peer never comes. The bounds are shortened through
GPT2CLOUD_BOUND_<PHASE>."""

from __future__ import annotations

import errno
import json
import socket
import socketserver
import struct
import threading
import time

import psutil
import pytest
from node_helpers import (fake_program, hanging, node_env, pid_alive, run_script, uploaded_data, workdir)
from trainer_helpers import make_shards, tiny_config

from gpt2cloud.backends.local import free_port
from gpt2cloud.launch import scripts, task
from gpt2cloud.runs import status
from model import deadman

SLACK_S = 20  # start-up of the scripts' Pythons and the 10 s a killed tree gets, on 2 busy cores


def deadman_events(node) -> list[dict]:
    path = node / "out" / "timeline.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [e for e in map(json.loads, lines) if e["event"] == "deadman"]


def leftovers(marker: str) -> list[str]:
    """The command lines of processes still running whose command line names `marker` (the node's home)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if marker in cmd and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(cmd)
    return found


def _fake_node_python(tmp_path, pid_file):
    """A python3 whose venv's pip hangs on any install but uv's (a stalled download of torch)."""
    venv_python = fake_program(tmp_path / "src", "venv-python",
                               'case "$*" in *" uv"*) exit 1;; "-m pip install"*) ' + hanging(pid_file).replace("\n", "; ")
                               + ";; esac\nexit 1")
    return fake_program(tmp_path / "bin", "python3",
                        f'if [ "$1 $2" = "-m venv" ]; then for last; do :; done; mkdir -p "$last/bin"; '
                        f'cp "{venv_python}" "$last/bin/python"; exit 0; fi\nexit 1')


@pytest.mark.parametrize("part", ["nvidia_smi", "torch", "gpu_check"])
def test_a_setup_part_that_hangs_ends_the_job(tmp_path, part):
    """A wedged driver under `nvidia-smi`, a pip whose download stalls, a CUDA init that never returns:
    setup kills the part at its bound and exits EXIT_SETUP_HUNG (a job stuck in SETTING_UP is never idle)."""
    pid_file = tmp_path / "hung.pid"
    e = node_env(tmp_path, "file:///unused", "file:///unused", GPT2CLOUD_BOUND_NVIDIA_SMI="60",
                 GPT2CLOUD_BOUND_TORCH="60", GPT2CLOUD_BOUND_GPU_CHECK="60")
    e[f"GPT2CLOUD_BOUND_{part.upper()}"] = "2"
    if part == "gpu_check":  # this machine's torch, with a CUDA init that hangs
        e.update(GPT2CLOUD_PYTHON=str(fake_program(tmp_path / "bin", "python", hanging(pid_file))),
                 GPT2CLOUD_DEVICE="cuda")
    else:  # a fresh node: a venv, uv or pip, then torch for the driver's CUDA
        del e["GPT2CLOUD_PYTHON"]
        _fake_node_python(tmp_path, pid_file)
        fake_program(tmp_path / "bin", "nvidia-smi", hanging(pid_file) if part == "nvidia_smi" else
                     'echo "| NVIDIA-SMI 580.65.06   Driver Version: 580.65.06   CUDA Version: 13.0 |"')
        e["PATH"] = f"{tmp_path / 'bin'}:{e['PATH']}"
    p, seconds = run_script(scripts.SETUP_SCRIPT, workdir(tmp_path), e, timeout=120)
    assert p.returncode == deadman.EXIT_SETUP_HUNG, p.stdout + p.stderr
    assert seconds < 2 + SLACK_S and f"DEADMAN: setup ({part}) did not finish within 2 s" in p.stderr
    assert not pid_alive(pid_file)  # the hung process itself was killed, not only its parent
    (event,) = deadman_events(tmp_path / "node")
    assert event["phase"] == f"setup ({part})" and event["code"] == deadman.EXIT_SETUP_HUNG and event["seconds"] == 2
    assert not (tmp_path / "node" / "python").exists()  # the node was never declared ready


class TrickleBucket(socketserver.ThreadingTCPServer):
    """An S3 endpoint that answers every request with a 1 MB body and then sends one byte every 2 s: never
    silent long enough for a read timeout, never done. Nothing but a bound on the whole phase ends that."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self):
        self.stop = threading.Event()
        super().__init__(("127.0.0.1", 0), TrickleHandler)


class TrickleHandler(socketserver.BaseRequestHandler):
    def handle(self):
        data = b""
        while b"\r\n\r\n" not in data and not self.server.stop.is_set():
            chunk = self.request.recv(65536)
            if not chunk:
                return
            data += chunk
        self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\nContent-Length: 1000000\r\n\r\n<")
        while not self.server.stop.wait(2):
            try:
                self.request.sendall(b" ")
            except OSError:
                return


@pytest.fixture
def trickle_bucket():
    server = TrickleBucket()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_a_pull_from_a_bucket_that_never_finishes_ends_the_job(tmp_path, trickle_bucket):
    data_url = uploaded_data(tmp_path, make_shards(tmp_path / "shards"))
    e = node_env(tmp_path, data_url, "s3://bkt/r1", AWS_ENDPOINT_URL=trickle_bucket, AWS_ACCESS_KEY_ID="test",
                 AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1", GPT2CLOUD_BOUND_PULL="4")
    wd = workdir(tmp_path, tiny_config(steps=2).to_json())
    p, _ = run_script(scripts.SETUP_SCRIPT, wd, e)
    assert p.returncode == 0, p.stdout + p.stderr
    p, seconds = run_script(scripts.RUN_SCRIPT, wd, e, timeout=120)
    assert p.returncode == deadman.EXIT_PULL_HUNG, p.stdout + p.stderr
    assert seconds < 4 + SLACK_S and "DEADMAN: the checkpoint pull did not finish within 4 s" in p.stderr
    (event,) = deadman_events(tmp_path / "node")
    assert event["phase"] == "the checkpoint pull" and event["code"] == deadman.EXIT_PULL_HUNG
    assert not leftovers(str(tmp_path / "node" / "out"))  # the pull was killed
    assert not (tmp_path / "node" / "data").exists()  # nothing after it ran: no download, no trainer


def test_a_data_source_that_barely_moves_ends_the_job(tmp_path):
    """The first shards do not arrive within the bound (10 bytes a second): `model.sync wait` gives up
    with EXIT_DATA_HUNG, and the download is stopped with the script."""
    data_url = uploaded_data(tmp_path, make_shards(tmp_path / "shards"))
    e = node_env(tmp_path, data_url, (tmp_path / "bucket" / "r1").as_uri(), GPT2CLOUD_DATA_MAX_MB_PER_S="0.00001",
                 GPT2CLOUD_BOUND_DATA="3")
    wd = workdir(tmp_path, tiny_config(steps=2).to_json())
    assert run_script(scripts.SETUP_SCRIPT, wd, e)[0].returncode == 0
    p, seconds = run_script(scripts.RUN_SCRIPT, wd, e, timeout=120)
    log = p.stdout + p.stderr
    assert p.returncode == deadman.EXIT_DATA_HUNG, log
    assert seconds < 3 + SLACK_S and "DEADMAN: the data wait did not finish within 3 s" in log
    assert "data not ready after 3 s" in log
    (event,) = deadman_events(tmp_path / "node")
    assert event["phase"] == "the data wait" and event["code"] == deadman.EXIT_DATA_HUNG
    deadline = time.monotonic() + 10  # the EXIT trap sent the downloader SIGTERM
    while leftovers(str(tmp_path / "node" / "data")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not leftovers(str(tmp_path / "node" / "data"))


def test_a_trainer_whose_start_up_never_ends_ends_the_job(tmp_path):
    """Node 0 of two whose peer never comes: torchrun waits in its rendezvous, the trainer's watchdog never
    starts. The run script kills the trainer's tree at the start-up bound (with two nodes: + the pull
    and data bounds, the time a peer may take to get there), and the job ends EXIT_STARTUP_HUNG after the
    final push, which takes the deadman's event to the bucket."""
    data_url = uploaded_data(tmp_path, make_shards(tmp_path / "shards"))
    run_dir = tmp_path / "bucket" / "r1"
    e = node_env(tmp_path, data_url, run_dir.as_uri(), SKYPILOT_NUM_NODES="2", GPT2CLOUD_MASTER_PORT=str(free_port()),
                 GPT2CLOUD_BOUND_STARTUP="2", GPT2CLOUD_BOUND_PULL="3", GPT2CLOUD_BOUND_DATA="15")
    wd = workdir(tmp_path, tiny_config(steps=2).to_json())
    assert run_script(scripts.SETUP_SCRIPT, wd, e)[0].returncode == 0
    p, seconds = run_script(scripts.RUN_SCRIPT, wd, e, timeout=180)
    log = p.stdout + p.stderr
    assert p.returncode == deadman.EXIT_STARTUP_HUNG, log[-3000:]
    assert "DEADMAN: the trainer's start-up did not finish within 20 s" in log
    assert 20 <= seconds < 20 + SLACK_S + 10, seconds  # (+ the final push)
    assert not (tmp_path / "node" / "out" / "started").exists()
    assert not leftovers(str(tmp_path / "node" / "out"))  # torchrun and anything it started are gone
    pushed = [json.loads(line) for line in (run_dir / "timeline.jsonl").read_text().splitlines()]
    (event,) = [ev for ev in pushed if ev["event"] == "deadman"]
    assert event["phase"] == "the trainer's start-up" and event["code"] == deadman.EXIT_STARTUP_HUNG
    assert [ev["event"] for ev in pushed][-3:] == ["deadman", "train_end", "final_push"]


def test_every_phase_is_bounded_generously_and_explained():
    """The bounds are what they say (a slow but working node never meets one); each code is explained by
    `status`; a managed job recovers from a hang of this node only, never from a full disk."""
    assert deadman.SETUP_BOUNDS["torch"] >= 3.5e9 / 2e6  # CUDA torch's ~3.5 GB of wheels at 2 MB/s
    assert deadman.PULL_BOUND >= 12 * 1_557_686_400 / 10e6  # the 1558M checkpoint at 10 MB/s
    assert deadman.DATA_BOUND >= 600e6 / 0.5e6  # the first 600 MB at 0.5 MB/s
    codes = (deadman.EXIT_SETUP_HUNG, deadman.EXIT_PULL_HUNG, deadman.EXIT_DATA_HUNG, deadman.EXIT_STARTUP_HUNG,
             deadman.EXIT_DISK_FULL)
    assert len(set(codes) | {2, 3, 4, 5, 6, 75}) == len(codes) + 6  # none is another's
    for code in codes:
        assert status.exit_meaning(f"FAILED (exit code {code})") == status.EXIT_MEANINGS[code]
    recovered = task.JOB_RECOVERY["recover_on_exit_codes"]
    assert deadman.EXIT_SETUP_HUNG in recovered and deadman.EXIT_STARTUP_HUNG in recovered
    assert not {deadman.EXIT_PULL_HUNG, deadman.EXIT_DATA_HUNG, deadman.EXIT_DISK_FULL} & set(recovered)


def _reset_before_reporting(port: int) -> None:
    """A connection that resets (RST: SO_LINGER 0) before it says who it is."""
    c = socket.create_connection(("127.0.0.1", port), timeout=5)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()


def test_a_connection_that_resets_before_reporting_does_not_end_node_0s_wait(monkeypatch, capsys):
    """Node 0's accept failing with ECONNABORTED (a connection reset in its backlog, as BSDs report it) and a
    reset before any report (ECONNRESET on its read) are that connection's end, never 'cannot listen': the
    rendezvous goes on, and the real peer that comes next is let in."""
    listen, aborted = deadman._listen, []

    class AbortsOnce(socket.socket):
        def accept(self):
            conn, addr = super().accept()
            if not aborted:
                aborted.append(addr)
                conn.close()
                raise ConnectionAbortedError(errno.ECONNABORTED, "Software caused connection abort")
            return conn, addr

    def flaky_listen(port):
        s = listen(port)
        return AbortsOnce(s.family, s.type, s.proto, fileno=s.detach())

    monkeypatch.setattr(deadman, "_listen", flaky_listen)
    port = free_port()
    result = {}
    host = threading.Thread(target=lambda: result.setdefault("rc", deadman.rendezvous(0, 2, "127.0.0.1", port, 20, "r1")))
    host.start()
    deadline = time.monotonic() + 10
    while not aborted and time.monotonic() < deadline:  # node 0 is listening once a connection gets through
        try:
            _reset_before_reporting(port)
        except OSError:
            time.sleep(0.05)
    assert aborted, "node 0 never accepted"
    _reset_before_reporting(port)  # accepted this time: its read fails (ECONNRESET)
    time.sleep(0.2)
    assert host.is_alive()  # still waiting for node 1
    assert deadman.rendezvous(1, 2, "127.0.0.1", port, 10, "r1") == 0
    host.join(timeout=10)
    assert result == {"rc": 0}
    assert "cannot listen" not in capsys.readouterr().err
