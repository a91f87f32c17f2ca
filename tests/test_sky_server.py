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

import os
import shutil
import socket
import subprocess
import sys

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
    assert job_id is None and len(ids) == 1 and sky_sdk.request_status(ids[0]) == "SUCCEEDED"
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
    for call in (lambda: sky_sdk.managed_job_status(7), lambda: sky_sdk.managed_job_ids("nope"),
                 lambda: sky_sdk.cancel_managed_job(7)):
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
    assert sky_sdk.request_status(rec.handle.request_id) == "CANCELLED"
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
        assert sky_sdk.request_status(request_id) not in ("PENDING", "RUNNING")  # it ended, not a wrong state
    else:
        pytest.fail("every launch request ended before it could be seen in progress")
    assert ClusterBackend().stop(rec) == "cancelled its launch request; no cluster was left"
    assert sky_sdk.request_status(request_id) == "CANCELLED"
    with pytest.raises(UserError) as info:  # whoever streamed it hears why, in one line
        with sky_errors("launch prov1"):
            sky.get(request_id)
    assert "request was cancelled" in _one_line(info.value)


def test_other_tests_keep_the_unreachable_endpoint(sky_mod):
    """After the tests above, this process no longer points at the server (sky_offline's endpoint)."""
    from sky.server import common

    assert common.get_server_url() == sky_env(".")["SKYPILOT_API_SERVER_ENDPOINT"]
