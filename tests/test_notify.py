"""`--notify URL` (model/notify.py, model/notify_cli.py): the formats by URL, the trainer's events from a local
`train`, endpoints that refuse or never answer, the node scripts' end-of-job notification, the URL kept secret,
bad URLs.

Every server is on 127.0.0.1: a ThreadingHTTPServer that records what it is sent (for Slack, Discord and ntfy
URLs it is their HTTP proxy, so the request names the real host and nothing leaves this machine), a socket
that accepts and never answers, and a port nobody listens on.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from gpt2cloud.cli.app import app
from gpt2cloud.launch import build, scripts
from model import notify, notify_cli
from trainer_helpers import REPO, TINY_RECIPE, env, make_shards

SECRET = "T0SECRET/B0SECRET/xyzzy-must-not-leak"  # a webhook URL's credential part
SLACK = f"https://hooks.slack.com/services/{SECRET}"


class Recorder(ThreadingHTTPServer):
    """Takes POSTs, answers 200 and keeps (path, headers, body, arrival time) of each."""

    daemon_threads = True

    def __init__(self):
        self.got: list[dict] = []
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def events(self, timeout: float = 5.0, count: int = 1) -> list[dict]:
        """The JSON bodies received, once there are `count` (or after `timeout`)."""
        deadline = time.monotonic() + timeout
        while len(self.got) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return [json.loads(g["body"]) for g in self.got if g["headers"].get("Content-Type") == "application/json"]


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.got.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                "at": time.time()})
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = Recorder()
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def silent():
    """A server that accepts connections and never answers (the kernel's backlog accepts them)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield f"http://127.0.0.1:{s.getsockname()[1]}/hook"
    s.close()


@pytest.fixture
def refused():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nobody listens there now: connection refused
    return f"http://127.0.0.1:{port}/hook"


# ---------------------------------------------------------------- the formats, by URL


def test_each_format_is_recognised_by_its_url_and_sent_in_its_shape(server, monkeypatch):
    monkeypatch.setenv("http_proxy", server.url)  # the real hosts' URLs, delivered here
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    urls = {"slack": "http://hooks.slack.com/services/T/B/X", "discord": "http://discord.com/api/webhooks/1/abc",
            "ntfy": "http://ntfy.sh/my-topic", "ntfy.": "http://ntfy.example.org/topic",
            "json": "http://example.com/hook?token=1"}
    assert {k: notify.format_of(u) for k, u in urls.items()} == {
        "slack": "slack", "discord": "discord", "ntfy": "ntfy", "ntfy.": "ntfy", "json": "json"}
    assert notify.format_of("https://discord.com/somewhere-else") == "json"  # not a webhook path
    event = notify.make_event("run-1", "finish", "finished at step 6/6, final loss 4.2000", step=6, loss=4.2,
                              cost_usd=0.5)
    for u in urls.values():
        assert notify.post(u, event) == ""
    got = {g["path"]: g for g in server.got}
    assert json.loads(got[urls["slack"]]["body"]) == {"text": "gpt2cloud run-1: finished at step 6/6, final loss 4.2000"}
    assert json.loads(got[urls["discord"]]["body"]) == {"content": event["text"]}
    for topic in (urls["ntfy"], urls["ntfy."]):
        assert got[topic]["body"].decode() == event["text"]
        assert got[topic]["headers"]["Title"] == "gpt2cloud run-1: finish"
    generic = json.loads(got[urls["json"]]["body"])
    assert generic["run"] == "run-1" and generic["event"] == "finish" and generic["text"] == event["text"]
    assert (generic["step"], generic["loss"], generic["cost_usd"]) == (6, 4.2, 0.5)
    assert all(g["headers"]["User-Agent"] == "gpt2cloud" for g in server.got)


# ---------------------------------------------------------------- a failing endpoint never holds anything


def test_a_url_that_refuses_or_never_answers_costs_the_caller_nothing(server, silent, refused, capfd):
    n = notify.Notifier([silent, refused, server.url + "/ok"], "run-2")
    t0 = time.monotonic()
    for i in range(3):
        n.send("first_step", f"event {i}", step=i)
    assert time.monotonic() - t0 < 2.0  # sending only queues: the silent URL's first POST alone takes 5 s
    assert [e["step"] for e in server.events(count=3)] == [0, 1, 2]  # the good URL is not held by the others
    t0 = time.monotonic()
    n.close(notify.CLOSE_WAIT_S)
    assert time.monotonic() - t0 < notify.CLOSE_WAIT_S + 0.5  # the silent URL is left behind, not waited for
    err = capfd.readouterr().err
    # the refused URL's failure is logged once (it retries each event once, 1 s apart), and both bad URLs are
    # left behind at the close, still sending
    assert err.count("ConnectionRefusedError") == 1 and "2 URL(s) still sending after 2 s" in err, err
    assert "/hook" not in err and "127.0.0.1:" not in err  # never the URL in full

    hung = notify.Notifier([silent], "run-3")
    for i in range(notify.QUEUE_EVENTS + 5):  # more than a hung URL's queue holds: dropped, logged once
        hung.send("first_step", f"event {i}")
    hung.close(0.1)
    err = capfd.readouterr().err
    assert err.count("dropped") == 1, err


def test_the_cli_gives_up_at_its_wait_and_never_fails(silent, refused, monkeypatch):
    monkeypatch.setenv(notify.NOTIFY_ENV, f"{silent}\n{refused}")
    t0 = time.monotonic()
    assert notify_cli.main(["failed", "--text", "boom", "--wait", "1"]) == 0
    assert time.monotonic() - t0 < 2.0


# ---------------------------------------------------------------- a local `train`: first step and finish


def test_a_local_train_tells_its_first_step_and_finish_and_bad_urls_do_not_hold_it(tmp_path, server, silent,
                                                                                   refused):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    data, out = make_shards(tmp_path / "data"), tmp_path / "notify-run"
    good = f"{server.url}/{SECRET}"
    cmd = [sys.executable, "-m", "gpt2cloud", "train", str(recipe), "--data", str(data), "--out", str(out),
           "--steps", "4", "--json", "--notify", good, "--notify", silent, "--notify", refused]
    p = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=180)
    ended = time.time()
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout)
    events = {e["event"]: e for e in server.events(count=2)}
    assert set(events) == {"first_step", "finish"}, events
    assert events["first_step"]["run"] == events["finish"]["run"] == "notify-run"
    assert events["first_step"]["step"] == 1 and events["finish"]["step"] == 4
    assert events["finish"]["loss"] == result["final_loss"] and f"{result['final_loss']:.4f}" in events["finish"]["text"]
    assert events["finish"]["checkpoint_step"] == 4
    # the trainer waited at most CLOSE_WAIT_S for the URL that never answers (its note below says so), not for
    # its two 5 s tries; Python's and torchrun's own exits take 1-4 s more on a loaded 2-core machine, up to
    # 6.8 s beside two other test workers
    finish_at = next(g["at"] for g in server.got if b'"finish"' in g["body"])
    assert ended - finish_at < 2 * notify.TIMEOUT_S, ended - finish_at
    # the refused URL's failure logged once; the silent one left behind at the end (its POST's timeout is longer)
    assert p.stderr.count("ConnectionRefusedError") == 1, p.stderr[-3000:]
    assert "1 URL(s) still sending after 2 s; left behind" in p.stderr
    # the URL reached the trainer only through its environment: no file, line of output or argument shows it
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".log", ".txt"):
            assert SECRET not in path.read_text(errors="replace"), path
    assert SECRET not in p.stdout + p.stderr


# ---------------------------------------------------------------- the node scripts' end of the job


def _node(tmp_path: Path, server_url: str, **extra) -> tuple[Path, dict]:
    """A node's workdir (this build's wheel) and home (OUT with a checkpoint of step 10 and metrics to step 12)."""
    from run_helpers import fake_checkpoint

    work, home = tmp_path / "sky_workdir", tmp_path / "node"
    work.mkdir()
    name, wheel = build.wheel_bytes()
    (work / name).write_bytes(wheel)
    out = home / "out"
    fake_checkpoint(out, 10)
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5.0 - s / 10, "cost_usd": s / 100})
                                               + "\n" for s in range(1, 13)))
    node_env = {**env(), notify.NOTIFY_ENV: f"{server_url}/{SECRET}", "GPT2CLOUD_NODE_HOME": str(home),
                "GPT2CLOUD_RUN_ID": "node-run", "SKYPILOT_NUM_NODES": "1", **extra}
    node_env.pop("PYTHONPATH", None)  # the node has only the wheel
    return work, node_env


def _bash(work: Path, node_env: dict, body: str) -> subprocess.CompletedProcess:
    """`body` after the node scripts' shared functions (the deadman, notify, notify_end), as a script runs it."""
    script = ('NODE_HOME="$GPT2CLOUD_NODE_HOME"\n' + scripts.render("@NODE_FUNCTIONS@") + "\n"
              + "trap 'notify_end $?' EXIT\n" + body)
    return subprocess.run(["bash", "-c", script], cwd=work, env=node_env, capture_output=True, text=True, timeout=60)


def test_the_run_scripts_end_tells_a_failure_and_what_was_saved(tmp_path, server, refused):
    work, node_env = _node(tmp_path, server.url, GPT2CLOUD_NOTIFY=f"{refused}\n{server.url}/{SECRET}")
    p = _bash(work, node_env, 'IN_BUCKET=no\nexit 3\n')  # a failed data download, and a final push that failed
    assert p.returncode == 3, p.stderr  # the job's own code: the notification never changes it
    [e] = server.events()
    assert (e["run"], e["event"], e["code"]) == ("node-run", "failed", 3)
    assert (e["checkpoint_step"], e["in_bucket"], e["step"], e["loss"]) == (10, False, 12, pytest.approx(3.8))
    assert "data download" in e["text"] and "step 10, is ONLY on the node" in e["text"]
    assert SECRET not in p.stdout + p.stderr and p.stderr.count("note: notify: ") == 1  # the refused URL, once


def test_a_deadman_and_a_stall_of_a_managed_job_say_it_is_relaunched(tmp_path, server):
    work, node_env = _node(tmp_path, server.url, GPT2CLOUD_MANAGED_JOB="1")
    p = _bash(work, node_env, 'deadman "the trainer\'s start-up" 1200 83\nexit 83\n')
    assert p.returncode == 83 and "DEADMAN" in p.stderr
    p = _bash(work, node_env, 'REASON="the trainer stalled (step 12 was the last thing it finished)"\nexit 75\n')
    assert p.returncode == 75
    p = _bash(work, node_env, "exit 0\n")  # the trainer told its own finish: nothing more
    deadman, stall = server.events(count=2)  # (each bash above returned after its notification went)
    assert deadman["event"] == "deadman" and "start-up did not finish within 1200 s" in deadman["text"]
    assert stall["event"] == "stall" and "step 12 was the last thing" in stall["text"]
    for e in (deadman, stall):
        assert "SkyPilot relaunches the managed job" in e["text"] and e["in_bucket"] is True


def test_a_job_stopped_by_a_signal_tells_a_preemption_even_when_its_log_is_gone(tmp_path, server):
    """A shutdown (a preemption's, `down`) signals every process: the log's tee goes too, and the script's next
    write to it ends the script with a status of 0 in its EXIT trap. The trap that saw the signal says what it was."""
    from gpt2cloud.processes import kill_process_tree

    work, node_env = _node(tmp_path, server.url, GPT2CLOUD_MANAGED_JOB="1")
    script = ('NODE_HOME="$GPT2CLOUD_NODE_HOME"\n' + scripts.render("@NODE_FUNCTIONS@") + "\n"
              + "trap 'notify_end $?' EXIT\n"
              + 'exec > >(tee -a "$NODE_HOME/log.txt") 2>&1\n'
              + "trap 'SIGNALLED=1' TERM\n"  # as run_trainer's
              + "sleep 30 & wait $!\necho 'the trainer exited'\nexit 0\n")
    p = subprocess.Popen(["bash", "-c", script], cwd=work, env=node_env, start_new_session=True)
    time.sleep(0.5)
    kill_process_tree(p.pid, graceful_seconds=10)  # as `gpt2cloud down` of a local run: the whole tree
    p.wait(timeout=20)  # 0 (the tee outlived the write) or SIGPIPE's: the trap sees a status of 0 either way
    [e] = server.events()
    assert e["event"] == "preemption" and "a signal stopped the trainer" in e["text"], e
    # whatever code the trap saw (0 here), a managed job's preemption is relaunched: the text says so
    assert "A preempted managed job is relaunched by SkyPilot" in e["text"], e
    assert "not relaunched after this exit code" not in e["text"], e
    assert notify_cli.next_step(0, {notify_cli.MANAGED_JOB_ENV: "1"}, "preemption") == notify_cli.next_step(
        143, {notify_cli.MANAGED_JOB_ENV: "1"})


def test_a_recovered_node_tells_the_recovery_and_the_preemption_before_it(tmp_path, server, monkeypatch):
    monkeypatch.setenv(notify.NOTIFY_ENV, server.url)
    monkeypatch.setenv("GPT2CLOUD_RUN_ID", "spot-run")
    out = tmp_path / "out"
    out.mkdir()
    lines = [{"event": "node_up", "time": 100.0, "rank": 0}, {"event": "train_start", "time": 200.0},
             {"event": "node_up", "time": 1000.0, "rank": 0}]  # the first attempt vanished mid-run; this is the second
    (out / "timeline.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    notify.RunNotices.start(out, True, 100, 1000.0, 40).close()
    lines.insert(2, {"event": "train_end", "time": 300.0, "code": 75})  # ... or it stalled and SkyPilot relaunched it
    (out / "timeline.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    notify.RunNotices.start(out, True, 100, 1000.0, None).close()
    notify.RunNotices.start(out, True, 100, 100.0, 40).close()  # the first attempt itself: nothing came before it
    notify.RunNotices.start(out, False, 100, 1000.0, 40).close()  # rank 1: never tells
    vanished, stalled = server.events(count=2)
    assert len(server.got) == 2
    assert vanished["event"] == stalled["event"] == "recovery" and vanished["run"] == "spot-run"
    assert vanished["preempted"] and vanished["previous_code"] is None and vanished["step"] == 40
    assert "a preemption" in vanished["text"] and "resuming from checkpoint step 40" in vanished["text"]
    assert not stalled["preempted"] and stalled["previous_code"] == 75 and "from step 0" in stalled["text"]


def test_the_trainers_stops_and_divergence_have_their_events(server, monkeypatch):
    monkeypatch.setenv(notify.NOTIFY_ENV, server.url)
    n = notify.RunNotices.start(Path("/tmp/stops"), True, 50, None, None)
    n.stopped("budget", "budget: stopping at step 7, $2.90 spent of $3.00", 7, 4.5, 2.9)
    n.stopped("requested", "stop: stopping at step 8 with a checkpoint, as asked", 8, 4.4, 3.0)
    n.diverged("diverged: loss nan at step 9", 9, "/out/checkpoints/step_000008")
    n.close()
    cap, asked, diverged = server.events(count=3)
    assert (cap["event"], cap["reason"], cap["step"], cap["cost_usd"]) == ("cap_stop", "budget", 7, 2.9)
    assert asked["event"] == "stopped" and asked["reason"] == "requested"
    assert diverged["event"] == "diverged" and diverged["checkpoint"].endswith("step_000008")


# ---------------------------------------------------------------- the URL is a secret


def test_the_url_travels_as_a_secret_and_is_never_printed_or_written(tmp_path):
    from gpt2cloud.backends.local import shared_env
    from gpt2cloud.launch.plan import plan
    from gpt2cloud.launch.task import build_config, to_yaml

    run = ["launch", "gpt2-tiny", "--infra", "local", "--gpus", "CPU:2", "--data", "file:///nowhere/shards",
           "--bucket", f"file://{tmp_path}/bucket", "--notify", SLACK, "--notify", "https://ntfy.sh/secret-topic"]
    r = CliRunner().invoke(app, [*run, "--dry-run"])
    assert r.exit_code == 0, r.output
    task = yaml.safe_load(r.stdout)
    assert task["secrets"] == {"GPT2CLOUD_NOTIFY": None} and "GPT2CLOUD_NOTIFY" not in task["envs"]
    assert "notify        https://hooks.slack.com/..., https://ntfy.sh/... flag --notify" in r.stdout
    assert SECRET not in r.output and "secret-topic" not in r.output
    export = tmp_path / "task.yaml"
    r = CliRunner().invoke(app, [*run, "--export-yaml", str(export)])
    assert r.exit_code == 0, r.output
    assert "--secret GPT2CLOUD_NOTIFY" in export.read_text() and SECRET not in export.read_text() + r.output
    workdir = Path(yaml.safe_load(export.read_text())["workdir"])
    assert SECRET not in (workdir / "config.json").read_text() + (workdir / "task.yaml").read_text()
    # the node (here: --infra local's) gets them in its environment, one a line
    p = plan("gpt2-tiny", "CPU:2", infra="local", data="file:///nowhere/shards", bucket=f"file://{tmp_path}/b",
             offline=True, notify=[SLACK, SLACK])
    assert p.secrets["GPT2CLOUD_NOTIFY"] == SLACK and SECRET not in to_yaml(build_config(p.job))
    assert shared_env(build_config(p.job), p.secrets)["GPT2CLOUD_NOTIFY"] == SLACK


@pytest.mark.parametrize("args", [
    ["launch", "gpt2-tiny", "--infra", "local", "--data", "file:///d", "--bucket", "file:///b", "--dry-run"],
    ["train", "gpt2-tiny", "--data", "/nowhere", "--out", "/nowhere/out"],
    ["config", "set", "notify"],
])
@pytest.mark.parametrize("bad, why", [
    (f"hooks.slack.com/services/{SECRET}", "expected an https://"),
    (f"ftp://example.com/{SECRET}", "expected an https://"),
    (f"https://user:xyzzy-pass@example.com/{SECRET}", "credentials before the host"),
    (f"https://example.com:port/{SECRET}", "not a valid URL"),
    (f"https://example.com/{SECRET} two", "no spaces"),
])
def test_a_bad_url_is_one_line_exit_2_and_never_shown_whole(args, bad, why):
    r = CliRunner().invoke(app, [*args, bad] if args[0] == "config" else [*args, "--notify", bad])
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert "notify" in lines[0] and why in lines[0] and SECRET not in r.output and "xyzzy" not in r.output, r.output
