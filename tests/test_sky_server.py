"""backends/sky_sdk.py against SkyPilot's own API server, run locally and offline: no fake.

One server for the whole session, started in a subprocess (~30 s on 2 cores) and stopped at the end:
- its HOME is a temp dir holding the catalog fixture (tests/sky_offline.py), and its environment has
  no cloud credentials at all, so nothing here can provision anything;
- once its on-boot `sky check` has found no cloud, Lambda and AWS are written into its state DB as
  enabled clouds, which is what `sky check` stores when credentials work: the server's optimizer
  then prices the real task;
- it listens on a free port of its own (SKYPILOT_API_SERVER_LOCAL_PORT), so it meets no other server.
This process is its client, one test at a time: the `server` fixture points SKYPILOT_API_SERVER_ENDPOINT
at it and clears the SDK's cached server URL before and after, so other test modules keep the
unreachable endpoint tests/sky_offline.py gives them. SkyPilot's launch needs rsync on PATH
(`make install` installs it).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from sky_offline import prepare, sky_env
from sky_offline import sky_home, sky_mod  # noqa: F401  (fixtures)

from gpt2cloud.backends import sky_sdk
from gpt2cloud.backends.sky_errors import ClusterGone, ControllerNotUp, sky_errors
from gpt2cloud.backends.skypilot import ClusterBackend, ManagedJobBackend, SkyHandle, to_sky_task
from gpt2cloud.errors import UserError
from gpt2cloud.runs import registry

# Start the server, let its on-boot `sky check` finish (offline it enables nothing, and it would
# overwrite what is written before), then write the enabled-cloud cache a working `sky check` writes.
SERVE = """
import sky
from sky import check, global_user_state, skypilot_config
from sky.clouds import cloud
from sky.server import constants

sky.api_start()
try:
    sky.get(constants.ON_BOOT_CHECK_REQUEST_ID)
except BaseException:  # no cloud is reachable offline: the check fails, as expected
    pass
workspace = skypilot_config.get_active_workspace()
# the allowed-cloud list must match the config's, or SkyPilot re-runs `sky check` and empties the cache
global_user_state.set_allowed_clouds(check._get_workspace_allowed_clouds(workspace), workspace)
global_user_state.set_enabled_clouds(['Lambda', 'AWS'], cloud.CloudCapability.COMPUTE, workspace)
"""
STOP = "import sky; sky.api_stop()"
TASK_CFG = {"run": "echo hi", "resources": {"infra": "lambda", "accelerators": "H100:8"}}
SECRET = "wJalrXUtnFEMI-not-a-real-secret-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def api_server(tmp_path_factory):
    """Start SkyPilot's API server; its URL. Stopped when the session ends."""
    if shutil.which("rsync") is None:
        pytest.fail("rsync is not installed: SkyPilot needs it to launch (`make install` installs it)")
    home = prepare(tmp_path_factory.mktemp("sky-server"))
    # Only the clouds the catalog fixture prices: a shorter `sky check`, and nothing else is considered.
    (home / ".sky" / "config.yaml").write_text("allowed_clouds:\n  - lambda\n  - aws\n")
    port = _free_port()
    # A bare environment: no cloud credentials or endpoints of the caller's reach the server.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "/usr/bin:/bin")])
    env = {"PATH": path, "LANG": "C.UTF-8", **sky_env(home), "SKYPILOT_API_SERVER_LOCAL_PORT": str(port)}
    del env["SKYPILOT_API_SERVER_ENDPOINT"]  # a local server of its own
    try:
        started = subprocess.run([sys.executable, "-c", SERVE], env=env, capture_output=True, text=True,
                                 timeout=300, check=False)
        if started.returncode != 0:
            pytest.fail(f"SkyPilot's API server did not start:\n{started.stdout[-1500:]}\n{started.stderr[-3000:]}")
        yield f"http://127.0.0.1:{port}"
    finally:
        subprocess.run([sys.executable, "-c", STOP], env=env, capture_output=True, timeout=120, check=False)


def _use_endpoint_env() -> None:
    from sky.server import common

    common.get_server_url.cache_clear()  # cached at the first call: re-read the environment
    common.is_api_server_local.cache_clear()


@pytest.fixture
def server(api_server, sky_mod, tmp_path, monkeypatch):
    """`sky`, with this process talking to the session's API server for the test."""
    monkeypatch.setenv("SKYPILOT_API_SERVER_ENDPOINT", api_server)
    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path / "g2"))
    _use_endpoint_env()
    yield sky_mod
    _use_endpoint_env()  # monkeypatch then restores the unreachable endpoint for the next module


def _record(run_id, kind="cluster", state="LAUNCHED", **kw):
    spec = registry.RunSpec(
        run_id=run_id, kind=kind, infra="lambda" if kind == "cluster" else "aws", run_url=f"s3://b/runs/{run_id}",
        bucket="s3://b/runs", data_url="s3://b/data", recipe="gpt2-124m", gpu_type="H100", gpus_per_node=8,
        nodes=1, spot=kind == "managed-job", price_per_gpu_hour=3.0, total_steps=10, estimate=None)
    return registry.RunRecord(spec=spec, started_at=1.0, state=state, **kw)


def _one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text and "\x1b" not in text, text
    return text


def test_dry_run_launch_of_the_real_task(server, monkeypatch, capfd):
    """The task gpt2cloud builds, through the real server and optimizer: priced, secrets not shown."""
    from gpt2cloud.launch.plan import plan
    from gpt2cloud.launch.start import write_build

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEYID0001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    for k in ("AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    p = plan(recipe="gpt2-124m", gpus="H100:8", infra="lambda", data="s3://bkt/data", bucket="s3://bkt/runs",
             name="g124", idle_minutes=7)
    write_build(p)  # the workdir the task ships (the client uploads it to the server)
    ids: list = []
    job_id = sky_sdk.launch_cluster(to_sky_task(p.task_cfg, p.secrets), p.run_id, p.spec.idle_minutes,
                                    dryrun=True, on_request=ids.append)
    out = capfd.readouterr()
    assert job_id is None and len(ids) == 1 and sky_sdk.request_statuses(ids) == {ids[0]: "SUCCEEDED"}
    assert "gpu_8x_h100_sxm5" in out.out and "Dryrun finished" in out.out
    assert SECRET not in out.out + out.err
    assert sky_sdk.cluster_status(p.run_id) is None  # a dry run makes nothing


def test_unknown_cluster_status_logs_and_down(server):
    assert sky_sdk.cluster_status("nope") is None and sky_sdk.cluster_status("nope", refresh=False) is None
    assert ClusterBackend().state(_record("nope")) == "TERMINATED"
    for call in (lambda: sky_sdk.down("nope"), lambda: sky_sdk.tail_logs("nope", 1, False),
                 lambda: sky_sdk.cluster_job_status("nope", 1)):
        with pytest.raises(ClusterGone) as info:
            with sky_errors("down nope"):
                call()
        assert "Cluster 'nope' does not exist." in _one_line(info.value)
    assert ClusterBackend().stop(_record("nope")) == "its cluster was already gone"


def test_managed_jobs_without_a_controller(server):
    for call in (lambda: sky_sdk.managed_jobs("nope"), lambda: sky_sdk.cancel_managed_jobs([7])):
        with pytest.raises(ControllerNotUp) as info:
            with sky_errors("status nope"):
                call()
        assert "managed-jobs controller is not up" in _one_line(info.value)
    rec = _record("nope", kind="managed-job", handle=SkyHandle(job_id=7))
    with pytest.raises(ControllerNotUp):
        ManagedJobBackend().logs(rec, follow=False)  # SkyPilot's own log call would print nothing and say 0
    assert ManagedJobBackend().stop(rec).startswith("no managed job was running")


def test_ctrl_c_mid_launch_cancels_the_request_on_the_server(server, monkeypatch, capsys):
    """A real launch (it could never provision: no credentials) interrupted while SkyPilot streams."""
    sky = server

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sky, "stream_and_get", ctrl_c)
    rec, saved = _record("ctrlc1", state="LAUNCHING"), []
    with pytest.raises(KeyboardInterrupt):
        ClusterBackend().start(rec, TASK_CFG, {}, save=lambda r: saved.append(r.handle.request_id))
    assert saved == [rec.handle.request_id] and rec.handle.request_id
    assert sky_sdk.request_statuses([rec.handle.request_id]) == {rec.handle.request_id: "CANCELLED"}
    assert sky_sdk.cluster_status("ctrlc1") is None
    assert "launch of ctrlc1 stopped: cancelled SkyPilot's launch request" in capsys.readouterr().err


def test_down_of_a_provisioning_run_cancels_its_request(server):
    """`gpt2cloud down` while another process's launch is still under way on the server."""
    sky = server
    task = to_sky_task(TASK_CFG)
    # The server fails this offline launch within a second or so; on a loaded machine it can finish before
    # the status call below. Only a launch caught while still under way tests `down`: try again, a few times.
    for _ in range(4):
        request_id = str(sky.launch(task, cluster_name="prov1", idle_minutes_to_autostop=5, down=True))
        rec = _record("prov1", state="LAUNCHING", handle=SkyHandle(cluster="prov1", request_id=request_id))
        if ClusterBackend().state(rec) in ("LAUNCHING", "CLUSTER_INIT"):
            break
        assert sky_sdk.request_statuses([request_id])[request_id] not in ("PENDING", "RUNNING")  # it ended
    else:
        pytest.fail("every launch request ended before it could be seen in progress")
    assert ClusterBackend().stop(rec) == f"cancelled its launch request {request_id}; no cluster was left"
    assert sky_sdk.request_statuses([request_id]) == {request_id: "CANCELLED"}
    with pytest.raises(UserError) as info:  # whoever streamed it hears why, in one line
        with sky_errors("launch prov1"):
            sky.get(request_id)
    assert "request was cancelled" in _one_line(info.value)


def test_what_the_server_says_of_requests_and_jobs_it_does_not_know(server):
    """A request id the server never handed out (or forgot when a local server restarted) is not under
    way, and nothing is cancelled; no ids: no call at all (SkyPilot's cancel of no ids cancels every
    request of the user)."""
    assert sky_sdk.request_statuses(["0123abcd-not-a-request"]) == {"0123abcd-not-a-request": None}
    assert sky_sdk.cancel_requests(["0123abcd-not-a-request"]) == []
    assert sky_sdk.request_statuses([]) == {} and sky_sdk.cancel_requests([]) == []
    sky_sdk.cancel_managed_jobs([])  # no ids: nothing is sent (the controller is not up: a call would raise)


def _signal_self(sig, wait_s=10.0):
    os.kill(os.getpid(), sig)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:  # the handler runs between these
        time.sleep(0.01)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_mid_launch_cancels_the_request_on_the_server(server, monkeypatch, capsys, sig):
    """A real launch request (it could never provision: no credentials) and the signal arriving while
    SkyPilot streams it, under the launch's guard (gpt2cloud/launch/start.py): Ctrl-C's road."""
    from gpt2cloud.launch.start import Terminated, stop_signals_interrupt

    sky = server
    monkeypatch.setattr(sky, "stream_and_get", lambda *a, **k: _signal_self(sig))
    mine = lambda *_: None  # noqa: E731 - a signal the guard misses must not end the test run
    previous = signal.signal(sig, mine)
    try:
        rec = _record(f"sig{int(sig)}", state="LAUNCHING")
        with pytest.raises(Terminated):
            with stop_signals_interrupt():
                ClusterBackend().start(rec, TASK_CFG, {}, save=None)
        assert signal.getsignal(sig) is mine
    finally:
        signal.signal(sig, previous)
    request_id = rec.handle.request_id
    assert request_id and rec.handle.request_ids == [request_id]
    # cancelled by the cleanup, unless the server had failed this offline launch already
    status = sky_sdk.request_statuses([request_id])[request_id]
    err = capsys.readouterr().err
    assert status in ("CANCELLED", "FAILED") and f"launch of {rec.run_id} stopped:" in err
    assert ("cancelled SkyPilot's launch request" in err) == (status == "CANCELLED"), (status, err)
    assert sky_sdk.cluster_status(rec.run_id) is None


def test_relaunch_check_and_down_ask_about_every_request_of_the_run(server):
    """Two launch requests of one run, the first from an attempt killed with -9: while either is under
    way a relaunch is refused; `down` cancels each one still under way and names exactly those."""
    from gpt2cloud.launch.start import earlier_attempt_gone

    sky = server
    task = to_sky_task(TASK_CFG)
    for _ in range(4):  # offline the server fails a launch within a second or so: catch them under way
        ids = [str(sky.launch(task, cluster_name="two1", idle_minutes_to_autostop=5, down=True)) for _ in range(2)]
        rec = _record("two1", state="LAUNCHING", handle=SkyHandle(cluster="two1", request_id=ids[1], request_ids=ids))
        try:
            earlier_attempt_gone(rec)
            continue  # both had ended already
        except UserError as e:
            assert "is still being launched" in _one_line(e)
        said = ClusterBackend().stop(rec)
        statuses = sky_sdk.request_statuses(ids)
        cancelled = [i for i in ids if statuses[i] == "CANCELLED"]
        if cancelled:
            break
    else:
        pytest.fail("every launch request ended before it could be seen in progress")
    assert not [i for i in ids if statuses[i] in ("PENDING", "WAITING", "RUNNING")], statuses
    assert said.startswith(f"cancelled its launch request{'s' if len(cancelled) > 1 else ''} "
                           f"{', '.join(cancelled)}"), (said, statuses)
    earlier_attempt_gone(rec)  # nothing of it under way any more: a relaunch may go on


def _launch_failing_with(run_id: str, cfg: dict, expected: str, tries: int = 4, retry_minutes: float = 0.0):
    """A launch's one-line failure containing `expected`, and its record and seconds. After the requests
    other tests cancelled (the server kills their workers) the server's next launch may die of its own
    transient fault (a broken process pool, an import race in a fresh worker): such a launch is tried again."""
    seen = []
    for attempt in range(tries):
        rec = _record(f"{run_id}-{attempt}", state="LAUNCHING")
        rec.spec = dataclasses.replace(rec.spec, retry_minutes=retry_minutes)
        t0 = time.monotonic()
        with pytest.raises(UserError) as info:
            ClusterBackend().start(rec, cfg, {}, save=None)
        if expected in _one_line(info.value):
            return rec, time.monotonic() - t0
        seen.append(str(info.value))
        time.sleep(2)
    pytest.fail(f"no launch failed with {expected!r}: {seen}")


def test_a_retrying_launch_is_cancelled_on_the_server_when_its_window_passes(server):
    """--retry-until-up through the real server. Offline, an AWS launch finds no credentials, so every
    region fails: without the flag SkyPilot gives up after one round (ResourcesUnavailableError); with it,
    SkyPilot retries round after round (it would forever), until the launch's window cancels the request
    on the server once --retry-minutes have passed; the launch fails in one line saying so, nothing left."""
    aws = {**TASK_CFG, "resources": {"infra": "aws", "accelerators": "H100:8"}}
    _launch_failing_with("retry-plain", aws, "no H100:8 available")  # one round, then SkyPilot's own error
    rec, waited = _launch_failing_with("retry-window", aws, "in the 0.2 min of --retry-minutes",
                                       retry_minutes=0.2)  # 12 s
    assert 12 <= waited < 120
    request_id = rec.handle.request_id
    assert sky_sdk.request_statuses([request_id]) == {request_id: "CANCELLED"}
    assert sky_sdk.cluster_status(rec.run_id) is None


def test_no_jobs_controller_on_the_server(server):
    """What `down --controller` asks SkyPilot, answered by the real server when no spot run ever started
    its controller: none there, nothing to remove, and no managed job is live."""
    from gpt2cloud.backends.skypilot import remove_jobs_controller

    assert sky_sdk.jobs_controller() is None
    with pytest.raises(ControllerNotUp):
        with sky_errors("down --controller"):
            sky_sdk.live_managed_jobs()
    assert remove_jobs_controller() == "SkyPilot's jobs controller is not there: nothing to remove"


def test_other_tests_keep_the_unreachable_endpoint(sky_mod):
    """After the tests above, this process no longer points at the server (sky_offline's endpoint)."""
    from sky.server import common

    assert common.get_server_url() == sky_env(".")["SKYPILOT_API_SERVER_ENDPOINT"]
