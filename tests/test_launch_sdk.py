"""launch / status / logs / down through the SkyPilot SDK wrapper, with the wrapper as the only fake.

The fake (FakeSky) replaces gpt2cloud/backends/sky_sdk.py's functions and raises SkyPilot's real exception
classes, so gpt2cloud's error handling runs for real. Storage is real S3 semantics (moto in-process,
no endpoint), the task is a real sky.Task, the registry is a temp GPT2CLOUD_HOME.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import time
from typing import Callable, Optional

import pytest
from sky_offline import sky_home, sky_mod  # noqa: F401  (fixtures)
from typer.testing import CliRunner

from gpt2cloud import home
from gpt2cloud.backends import backend_for, sky_sdk
from gpt2cloud.backends.skypilot import SkyHandle
from gpt2cloud.cli import app
from gpt2cloud.runs import registry
from model import stoprequest

BUCKET = "gpt2-test-bucket"


# The wrapper's public functions: each one the fake must stand in for.
SDK_FUNCTIONS = sorted(n for n, f in vars(sky_sdk).items()
                       if inspect.isfunction(f) and not n.startswith("_") and f.__module__ == sky_sdk.__name__)


class FakeSky:
    """Stands in for gpt2cloud.backends.sky_sdk, bound to its real signatures: a call with a wrong or
    missing argument raises TypeError here as it would for real. Records calls as (name, {arg: value})
    with defaults filled in; `fail[name] = exc` makes a call raise exc before it does anything (for a
    launch: before SkyPilot hands out a request id); `before[name] = fn` calls fn() first (a signal
    arriving during that call); `mid_launch = exc` makes a launch raise exc after it handed out its
    request id, as Ctrl-C or a setup failure does while SkyPilot streams (a callable is called there
    instead: one that signals this process)."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple] = []
        self.fail: dict[str, BaseException] = {}
        self.before: dict[str, Callable[[], None]] = {}
        self.mid_launch: Optional[BaseException | Callable[[], None]] = None
        self.cluster = "UP"  # what SkyPilot says of the cluster; None: it does not exist
        self.job = "RUNNING"
        self.managed = "RUNNING"  # the state a launched managed job has
        # Launch requests on the API server: each launch hands out req-1, req-2, ...; one that returned is
        # SUCCEEDED; any other (interrupted, or a test's own id) is in state `request` unless `requests` says
        self.requests: dict[str, str] = {}
        self.request = "RUNNING"
        self.launches = 0
        self.jobs: dict[int, str] = {}  # the managed jobs named after the run that SkyPilot's controller knows
        self.job_names: dict[int, str] = {}  # another user's or run's job among them: its name (else r1)
        self.controller: Optional[tuple] = None  # (name, status) of SkyPilot's jobs controller; None: none
        for name in SDK_FUNCTIONS:
            assert hasattr(self, "_" + name), f"FakeSky has no stand-in for sky_sdk.{name}"
            monkeypatch.setattr(sky_sdk, name, self._make(name, inspect.signature(getattr(sky_sdk, name))))

    def _make(self, name, signature):
        def call(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)  # TypeError on a wrong argument, like the real one
            bound.apply_defaults()
            self.calls.append((name, dict(bound.arguments)))
            if name in self.before:
                self.before[name]()
            if name in self.fail:
                raise self.fail[name]
            return getattr(self, "_" + name)(**bound.arguments)  # the stand-ins use the real names too
        return call

    def _launched(self, on_request):
        self.launches += 1
        request_id = f"req-{self.launches}"
        if on_request is not None:
            on_request(request_id)
        if isinstance(self.mid_launch, BaseException):
            raise self.mid_launch
        if self.mid_launch is not None:
            self.mid_launch()
        self.requests[request_id] = "SUCCEEDED"

    def _launch_cluster(self, task, cluster_name, idle_minutes, retry_until_up, dryrun, on_request):
        self._launched(on_request)
        return self.launches  # the job's id on the cluster

    def _launch_managed_job(self, task, name, on_request):
        self._launched(on_request)
        job_id = 6 + self.launches  # 7, 8, ...
        self.jobs[job_id] = self.managed
        return job_id

    def state_of_request(self, request_id):
        return self.requests.get(request_id, self.request)

    def _cancel_requests(self, request_ids):
        cancelled = [i for i in request_ids if self.state_of_request(i) in ("PENDING", "WAITING", "RUNNING")]
        self.requests.update({i: "CANCELLED" for i in cancelled})  # finished ones are left as they are
        return cancelled

    def _request_statuses(self, request_ids):
        return {i: self.state_of_request(i) for i in request_ids}

    def _cluster_status(self, cluster_name, refresh):
        return self.cluster

    def _cluster_job_status(self, cluster_name, job_id):
        return self.job

    def _managed_jobs(self, name):
        return dict(self.jobs)

    def _managed_job_records(self, name):  # jobs that never ran on a node: no attempt to count (test_unseen_attempts.py)
        return {j: {"status": state, "recovery_count": 0, "job_duration": 0.0, "submitted_at": None,
                    "last_recovered_at": None} for j, state in self.jobs.items()}

    def _jobs_controller(self):
        return self.controller

    def _live_managed_jobs(self):
        from sky import exceptions as ex

        if self.controller is None or self.controller[1] == "STOPPED":
            raise ex.ClusterNotUpError("Managed jobs controller is not up.", cluster_status=None)
        return {j: (self.job_names.get(j, "r1"), state) for j, state in self.jobs.items()
                if state not in ("SUCCEEDED", "FAILED", "CANCELLED")}

    def _down(self, cluster_name):
        from sky import exceptions as ex

        if self.controller is not None and cluster_name == self.controller[0]:
            self.controller = None
            return
        if self.cluster is None:
            raise ex.ClusterDoesNotExist(f"Cluster {cluster_name!r} does not exist.")
        self.cluster = None

    def _cancel_managed_jobs(self, job_ids):
        self.jobs.update({j: "CANCELLED" for j in job_ids})

    def _tail_logs(self, cluster_name, job_id, follow):
        print(f"fake log of {cluster_name} job {job_id}")
        return 0

    def _tail_managed_logs(self, job_id, follow):
        print(f"fake managed log of job {job_id}")
        return 0

    def names(self):
        return [c[0] for c in self.calls]

    def args(self, name) -> dict:
        """The arguments of the one call of `name`."""
        (found,) = [a for n, a in self.calls if n == name]
        return found


@pytest.fixture
def fake(sky_mod, tmp_path, monkeypatch):
    """The fake SDK and a temp registry."""
    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path / "g2"))
    return FakeSky(monkeypatch)


@pytest.fixture
def cloud(fake, monkeypatch):
    """Plus fake credentials and an in-process S3 (moto) holding a data set with its manifest."""
    from moto import mock_aws

    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")  # mock_aws sets fake credentials of its own
    # Under mock_aws SkyPilot's AWS catalog finds an identity and asks EC2 for zone mappings, which costs
    # moto seconds; offline (the fixture's point) there is no identity and no such lookup.
    from sky.catalog import aws_catalog

    monkeypatch.setattr(aws_catalog, "_get_az_mappings", lambda *a, **k: None)
    with mock_aws():
        import boto3

        from gpt2cloud.store import open_store

        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket=BUCKET)
        store = open_store(f"s3://{BUCKET}/data")
        store.put_bytes("x_val_000000.bin", b"v" * 10)
        store.put_bytes("manifest.json", json.dumps({"files": []}).encode())
        yield fake


def record(tmp_path, kind="cluster", **kw):
    """A registry record as `launch` writes it, with its bucket on file:// (status/logs/down tests)."""
    run_url = (tmp_path / "bucket" / "r1").as_uri()
    spec = registry.RunSpec(
        run_id="r1", kind=kind, infra="lambda" if kind == "cluster" else "aws", run_url=run_url,
        bucket=run_url.rsplit("/", 1)[0], data_url="s3://b/data", recipe="gpt2-124m", gpu_type="H100",
        gpus_per_node=8, nodes=1, spot=kind == "managed-job", price_per_gpu_hour=3.0, total_steps=10,
        estimate=None, **kw)
    handle = SkyHandle(cluster="r1", job_id=1) if kind == "cluster" else SkyHandle(job_id=7)
    rec = registry.RunRecord(spec=spec, started_at=1.0, handle=handle, state="LAUNCHED")
    registry.save(rec)
    from gpt2cloud.store import open_store

    return rec, open_store(run_url)


def launch(*extra, name="r1"):
    args = ["launch", "gpt2-124m", "--gpus", "H100:8", "--data", f"s3://{BUCKET}/data",
            "--bucket", f"s3://{BUCKET}/runs", "--name", name, *extra]
    return CliRunner().invoke(app, args)


def test_launch_cluster_records_the_run(cloud, tmp_path):
    r = launch("--infra", "lambda", "--max-cost", "40", "--idle-minutes", "7", "--yes", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["run"] == "r1" and out["kind"] == "cluster" and out["cluster"] == "r1" and out["job_id"] == 1
    call = cloud.args("launch_cluster")
    task = call["task"]
    import sky

    assert isinstance(task, sky.Task) and call["cluster_name"] == "r1" and call["idle_minutes"] == 7
    assert call["dryrun"] is False and callable(call["on_request"])
    secret, key_id = os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"]  # moto's fake ones
    assert task.secrets["AWS_SECRET_ACCESS_KEY"].get_secret_value() == secret
    (res,) = list(task.resources)
    assert res.autostop_config.down and res.autostop_config.idle_minutes == 7
    rec_text = registry.path_for("r1").read_text()
    rec = json.loads(rec_text)
    spec = rec["spec"]
    assert rec["handle"]["cluster"] == "r1" and spec["infra"] == "lambda" and spec["bucket"] == f"s3://{BUCKET}/runs"
    assert spec["recipe"] == "gpt2-124m" and spec["gpu_type"] == "H100" and spec["gpus_per_node"] == 8
    assert spec["estimate"]["cost_usd"] > 0 and spec["price_per_gpu_hour"] > 0 and rec["started_at"] > 0
    assert spec["max_cost_usd"] == 40 and rec["state"] == "LAUNCHED" and rec["handle"]["request_id"] == "req-1"
    assert rec["handle"]["request_ids"] == ["req-1"] and rec["handle"]["job_ids"] == [1]
    assert secret not in rec_text and key_id not in rec_text and secret not in r.output
    shipped = home.build_dir("r1")
    names = sorted(p.name for p in shipped.iterdir())
    assert len(names) == 3 and names[0] == "config.json" and names[1].endswith("-py3-none-any.whl")
    assert names[2] == "task.yaml"
    assert secret not in (shipped / "task.yaml").read_text() and secret not in (shipped / "config.json").read_text()
    from gpt2cloud.store import open_store

    run_json = json.loads(open_store(f"s3://{BUCKET}/runs/r1").get_bytes("run.json"))
    assert run_json["total_steps"] == 19073 and secret not in json.dumps(run_json)
    assert run_json == spec  # one spec, serialized once: the bucket's run.json and the registry agree


def test_spot_launches_a_managed_job(cloud):
    r = launch("--infra", "aws", "--spot", "--yes")
    assert r.exit_code == 0, r.output
    assert "launch_managed_job" in cloud.names() and "launch_cluster" not in cloud.names()
    call = cloud.args("launch_managed_job")
    task = call["task"]
    assert call["name"] == "r1" and all(res.use_spot and res.job_recovery for res in task.resources)
    rec = registry.get("r1")
    assert rec.spec.kind == "managed-job" and rec.handle.job_id == 7 and rec.spec.spot


def _exc(name):
    from sky import exceptions as ex

    return {
        "no-cloud": (ex.NoCloudAccessError("Cloud access is not set up. Run: sky check"), "run `sky check`"),
        "unavailable": (ex.ResourcesUnavailableError("Failed to acquire resources in all zones"),
                        "no H100:8 available on lambda"),
        "spot": (ex.ResourcesUnavailableError("Spot instances are not supported in Lambda."),
                 "lambda has no spot instances"),
        "cloud": (ex.CloudError("Invalid API key", "lambda", "AuthenticationError"), "the cloud refused"),
        "network": (ex.CloudError("requests error (ConnectionError): Max retries exceeded", "lambda",
                                  "ConnectionError"), "check this machine's internet connection"),
        "server": (ex.ApiServerConnectionError("http://127.0.0.1:46580"), "sky api start"),
        "controller": (ex.ClusterNotUpError("No in-progress managed jobs."), "managed-jobs controller is not up"),
        "cancelled": (ex.RequestCancelled("\x1b[33mCurrent 'sky.launch' request (ab12) is cancelled by another "
                                          "process.\x1b[0m"), "by `gpt2cloud down`"),
        "gone": (ex.ClusterDoesNotExist("\x1b[33mCluster 'r1' does not exist.\x1b[0m"),
                 "(Cluster 'r1' does not exist.)"),
        "mismatch": (ex.ResourcesMismatchError("Requested resources do not match the existing cluster."),
                     "`gpt2cloud down RUN` first"),
        "setup": (ex.CommandError(1, "pip install", "Failed to run setup.", None), "a command on the cluster failed"),
        # what a real launch with no Lambda key raises through the API server (not a SkyPilot class)
        "other": (AssertionError("Credentials not found"), "SkyPilot failed (AssertionError: Credentials not found)"),
    }[name]


@pytest.mark.parametrize("case", ["no-cloud", "unavailable", "spot", "cloud", "network", "server", "controller",
                                  "cancelled", "gone", "mismatch", "setup", "other"])
def test_sdk_errors_become_one_line_with_the_fix(fake, case):
    from gpt2cloud.backends.sky_errors import sky_errors
    from gpt2cloud.errors import UserError

    exc, message = _exc(case)
    with pytest.raises(UserError) as info:
        with sky_errors("launch r1", infra="lambda", gpus="H100:8"):
            raise exc
    assert message in str(info.value) and "\n" not in str(info.value) and "\x1b" not in str(info.value)


def test_ctrl_c_passes_through_the_error_mapping(fake):
    from gpt2cloud.backends.sky_errors import sky_errors

    with pytest.raises(KeyboardInterrupt):
        with sky_errors("launch r1"):
            raise KeyboardInterrupt


def test_launch_error_through_the_cli(cloud):
    exc, message = _exc("no-cloud")
    cloud.fail["launch_cluster"] = exc
    cloud.cluster = None  # SkyPilot refused before making anything
    r = launch("--infra", "lambda", "--yes")
    assert r.exit_code == 2, r.output
    last = r.output.strip().splitlines()[-1]
    assert message in last and last.startswith("error:") and "Traceback" not in r.output
    assert "removed" not in r.output and "down" not in cloud.names()  # nothing to clean up, nothing said
    assert registry.get("r1").state == "LAUNCH_FAILED"  # recorded, so `down` can still find it


def test_relaunch_waits_for_the_running_job(cloud):
    """The same run id launches again (and resumes) only once SkyPilot says its job is no longer running."""
    assert launch("--infra", "lambda", "--yes").exit_code == 0
    r = launch("--infra", "lambda", "--yes")
    assert r.exit_code == 2 and "still running" in r.output
    cloud.job = "SUCCEEDED"
    r = launch("--infra", "lambda", "--yes")
    assert r.exit_code == 0, r.output
    assert registry.get("r1").launches == 2 and [c[0] for c in cloud.calls].count("launch_cluster") == 2
    cloud.fail["launch_cluster"] = _exc("no-cloud")[0]
    assert launch("--infra", "lambda", "--yes").exit_code == 2
    cloud.cluster = None  # it never came up
    d = json.loads(CliRunner().invoke(app, ["status", "r1", "--json"]).stdout)
    assert d["state"] == "LAUNCH_FAILED"


def test_data_without_manifest(cloud):
    r = CliRunner().invoke(app, ["launch", "gpt2-124m", "--infra", "lambda", "--data", f"s3://{BUCKET}/nothing",
                                 "--bucket", f"s3://{BUCKET}/runs", "--yes"])
    assert r.exit_code == 2 and "no manifest.json there" in r.output and "gpt2cloud data upload" in r.output
    assert "launch_cluster" not in cloud.names()


def test_bucket_the_node_could_not_reach(cloud):
    r = CliRunner().invoke(app, ["launch", "gpt2-124m", "--infra", "lambda", "--data", f"s3://{BUCKET}/data",
                                 "--bucket", "s3://no-such-bucket-anywhere/runs", "--yes"])
    assert r.exit_code == 2 and "--bucket s3://no-such-bucket-anywhere/runs" in r.output
    assert "launch_cluster" not in cloud.names()


def test_confirmation_is_required(cloud):
    r = launch("--infra", "lambda", "--name", "r2")
    assert r.exit_code == 2 and "add --yes" in r.output
    assert "cost" in r.output and "launch_cluster" not in cloud.names()  # the estimate was shown


def _metrics(store, steps=5, total=10):
    lines = [{"event": "start", "world_size": 8, "config": {"steps": total}}]
    for s in range(1, steps + 1):
        lines.append({"step": s, "loss": 10.0 - s, "lr": 1e-3, "grad_norm": 1.0, "step_seconds": 3600.0,
                      "tokens_per_second": 1000.0, "mfu": 0.4, "tokens_seen": s * 1000,
                      "elapsed_seconds": s * 3600.0, "cost_usd": s * 8 * 3.0})
    lines.append({"step": steps, "val_loss": 4.5})
    store.put_bytes("metrics.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode())


def test_status_from_skypilot_and_the_bucket(fake, tmp_path):
    cloud = fake
    _, store = record(tmp_path, max_cost_usd=1000.0)
    _metrics(store)
    r = CliRunner().invoke(app, ["status", "r1", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["state"] == "RUNNING" and d["step"] == 5 and d["total_steps"] == 10 and d["loss"] == 5.0
    assert d["val_loss"] == 4.5 and d["tokens_per_second"] == 1000.0 and d["eta_hours"] == pytest.approx(5.0)
    assert d["cost_so_far_usd"] == pytest.approx(120.0)  # 5 h x 8 GPUs x $3
    assert d["cost_projected_usd"] == pytest.approx(240.0) and d["max_cost_usd"] == 1000
    cloud.cluster = None  # autostop tore it down
    assert json.loads(CliRunner().invoke(app, ["status", "r1", "--json"]).stdout)["state"] == "TERMINATED"
    r = CliRunner().invoke(app, ["status"])
    assert r.exit_code == 0 and "r1" in r.stdout
    r = CliRunner().invoke(app, ["runs"])
    assert r.exit_code == 0 and "r1" in r.stdout and "lambda" in r.stdout


def test_status_without_skypilot_still_shows_progress(fake, tmp_path):
    from sky import exceptions as ex

    cloud = fake
    record(tmp_path)
    cloud.fail["cluster_status"] = ex.ApiServerConnectionError("http://127.0.0.1:46580")
    d = json.loads(CliRunner().invoke(app, ["status", "r1", "--json"]).stdout)
    assert d["state"].startswith("UNKNOWN") and "sky api start" in d["state"]


def test_logs_and_down(fake, tmp_path):
    from sky import exceptions as ex

    cloud = fake
    _, store = record(tmp_path)
    r = CliRunner().invoke(app, ["logs", "r1"])
    assert r.exit_code == 0 and "fake log of r1 job 1" in r.stdout
    # after autostop-down, logs come from the bucket's copy
    store.put_bytes("logs/node-0.log", b"step 1/10 | loss 9.0\n")
    cloud.fail["tail_logs"] = ex.ClusterDoesNotExist("Cluster 'r1' does not exist.")
    r = CliRunner().invoke(app, ["logs", "r1"])
    assert r.exit_code == 0 and "step 1/10" in r.stdout
    r = CliRunner().invoke(app, ["down", "r1"])
    assert r.exit_code == 0 and "tore down cluster r1" in r.stdout and ("down", {"cluster_name": "r1"}) in cloud.calls
    assert registry.get("r1").state == "DOWN"
    cloud.fail["down"] = ex.ClusterDoesNotExist("Cluster 'r1' does not exist.")
    r = CliRunner().invoke(app, ["down", "r1"])
    assert r.exit_code == 0 and "already gone" in r.stdout


def test_down_cancels_a_managed_job(fake, tmp_path):
    cloud = fake
    record(tmp_path, kind="managed-job")
    cloud.jobs = {7: "RUNNING"}
    r = CliRunner().invoke(app, ["down", "r1"])
    assert r.exit_code == 0 and ("cancel_managed_jobs", {"job_ids": [7]}) in cloud.calls
    assert "cancelled managed job 7 (SkyPilot tears its cluster down)" in r.output


@pytest.mark.parametrize("cmd", [["status", "nope"], ["logs", "nope"], ["down", "nope"], ["fetch", "nope"]])
def test_unknown_run_id(fake, cmd):
    r = CliRunner().invoke(app, cmd)
    assert r.exit_code == 2 and "unknown run 'nope'" in r.output and "gpt2cloud runs" in r.output


# ---- money safety: an interrupted or failed launch leaves nothing billing ----

TASK_CFG = {"name": "r1", "run": "echo hi", "resources": {"infra": "lambda", "accelerators": "H100:8"}}


def test_request_id_is_saved_before_skypilot_streams(fake, tmp_path):
    """The request id reaches the registry the moment SkyPilot hands it out: a `down` from another
    terminal (or after this process died) can cancel the request."""
    from gpt2cloud.backends.skypilot import ClusterBackend

    rec, _ = record(tmp_path)
    rec.state = "LAUNCHING"
    fake.mid_launch = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        ClusterBackend().start(rec, TASK_CFG, {}, save=registry.save)
    saved = registry.get("r1")
    assert saved.handle.request_id == "req-1" and saved.state == "LAUNCHING"  # written mid-launch, before Ctrl-C
    assert saved.handle.request_ids == ["req-1"]
    assert fake.names() == ["launch_cluster", "cancel_requests", "cluster_status", "down"]


def test_ctrl_c_mid_launch_cancels_the_request_and_removes_the_cluster(cloud):
    cloud.mid_launch = KeyboardInterrupt()
    r = launch("--infra", "lambda", "--yes")
    assert r.exit_code == 130, r.output
    assert cloud.names() == ["launch_cluster", "cancel_requests", "cluster_status", "down"]
    assert cloud.args("cancel_requests") == {"request_ids": ["req-1"]} and cloud.requests["req-1"] == "CANCELLED"
    assert cloud.args("cluster_status") == {"cluster_name": "r1", "refresh": False}  # SkyPilot's record: INIT too
    assert cloud.args("down") == {"cluster_name": "r1"} and cloud.cluster is None
    assert "launch of r1 stopped: cancelled SkyPilot's launch request; removed cluster r1" in r.output
    rec = registry.get("r1")
    assert rec.state == "LAUNCH_FAILED" and rec.handle.request_id == "req-1"


def test_ctrl_c_before_anything_was_provisioned(cloud):
    cloud.mid_launch = KeyboardInterrupt()
    cloud.cluster = None
    r = launch("--infra", "lambda", "--yes")
    assert r.exit_code == 130 and "down" not in cloud.names()
    assert "cancelled SkyPilot's launch request" in r.output and "removed" not in r.output


def test_failure_after_provisioning_removes_the_cluster(cloud):
    from sky import exceptions as ex

    cloud.mid_launch = ex.CommandError(1, "bash setup.sh", "Failed to run setup.", "pip: no such package")
    cloud.request = "FAILED"  # the request ended with the error: nothing left to cancel
    r = launch("--infra", "lambda", "--yes")
    assert r.exit_code == 2, r.output
    last = r.output.strip().splitlines()[-1]
    assert "a command on the cluster failed" in last and "removed cluster r1, so nothing bills" in last
    assert "cancelled" not in last and cloud.args("down") == {"cluster_name": "r1"}
    assert "Traceback" not in r.output


def test_api_server_dying_mid_launch_removes_the_cluster(cloud):
    import requests

    from sky import exceptions as ex

    cloud.mid_launch = requests.exceptions.ConnectionError("Connection aborted.")
    cloud.fail["cancel_requests"] = ex.ApiServerConnectionError("http://127.0.0.1:46580")  # it is gone...
    r = launch("--infra", "lambda", "--yes")  # ...and the teardown still runs (the SDK restarts a local one)
    assert r.exit_code == 2, r.output
    last = r.output.strip().splitlines()[-1]
    assert "lost the connection to the SkyPilot API server" in last and "removed cluster r1" in last
    assert cloud.names() == ["launch_cluster", "cancel_requests", "cluster_status", "down"]


def test_a_failed_removal_warns_loudly(cloud):
    from sky import exceptions as ex

    cloud.mid_launch = ex.CommandError(1, "bash setup.sh", "Failed to run setup.", None)
    cloud.fail["down"] = ex.ApiServerConnectionError("http://127.0.0.1:46580")
    r = launch("--infra", "lambda", "--yes")
    assert r.exit_code == 2, r.output
    (warning,) = [line for line in r.output.splitlines() if line.startswith("WARNING:")]
    assert "cluster r1 MAY STILL BE RUNNING AND BILLING" in warning
    assert "`gpt2cloud down r1`" in warning and "`sky down r1`" in warning
    last = r.output.strip().splitlines()[-1]
    assert "could not remove cluster r1" in last and "gpt2cloud down r1" in last


def test_ctrl_c_mid_managed_launch_cancels_the_job_it_submitted(cloud):
    cloud.mid_launch = KeyboardInterrupt()
    cloud.jobs = {7: "PENDING"}  # the controller got the job before Ctrl-C
    r = launch("--infra", "aws", "--spot", "--yes")
    assert r.exit_code == 130, r.output
    assert cloud.names() == ["launch_managed_job", "cancel_requests", "managed_jobs", "cancel_managed_jobs"]
    assert cloud.args("managed_jobs") == {"name": "r1"} and cloud.args("cancel_managed_jobs") == {"job_ids": [7]}
    assert "cancelled managed job 7" in r.output and cloud.jobs == {7: "CANCELLED"}
    assert registry.get("r1").handle.job_ids == [7]  # found by name: the record knows it now


def test_down_of_a_provisioning_run_cancels_then_tears_down(fake, tmp_path):
    rec, _ = record(tmp_path)
    rec.state, rec.handle.request_id, rec.handle.job_id = "LAUNCHING", "req-9", None
    registry.save(rec)
    fake.cluster = None  # SkyPilot has not written the cluster down yet: status asks the request
    d = json.loads(CliRunner().invoke(app, ["status", "r1", "--json"]).stdout)
    assert d["state"] == "LAUNCHING" and fake.args("request_statuses") == {"request_ids": ["req-9"]}
    fake.cluster = "INIT"
    fake.calls.clear()
    r = CliRunner().invoke(app, ["down", "r1"])
    assert r.exit_code == 0, r.output
    assert fake.names() == ["cancel_requests", "down"]  # the request first: nothing provisions after the down
    assert "cancelled its launch request req-9, then tore down cluster r1" in r.output
    assert registry.get("r1").state == "DOWN"


def test_down_of_a_provisioning_run_that_made_no_cluster(fake, tmp_path):
    rec, _ = record(tmp_path)
    rec.state, rec.handle.request_id = "LAUNCHING", "req-9"
    registry.save(rec)
    fake.cluster = None
    r = CliRunner().invoke(app, ["down", "r1"])
    assert r.exit_code == 0, r.output
    assert "cancelled its launch request req-9; no cluster was left" in r.output and "already gone" not in r.output


def test_down_of_a_provisioning_managed_job_finds_it_by_name(fake, tmp_path):
    rec, _ = record(tmp_path, kind="managed-job")
    rec.state, rec.handle.request_id, rec.handle.job_id = "LAUNCHING", "req-9", None
    registry.save(rec)
    fake.jobs = {8: "STARTING"}
    r = CliRunner().invoke(app, ["down", "r1"])
    assert r.exit_code == 0, r.output
    assert fake.names() == ["cancel_requests", "managed_jobs", "cancel_managed_jobs"]
    assert "cancelled its launch request req-9, then cancelled managed job 8" in r.output


def test_down_of_a_managed_job_without_a_controller(fake, tmp_path):
    from sky import exceptions as ex

    record(tmp_path, kind="managed-job")
    fake.fail["managed_jobs"] = ex.ClusterNotUpError("No in-progress managed jobs.")
    r = CliRunner().invoke(app, ["down", "r1"])
    assert r.exit_code == 0 and "no managed job was running" in r.output
    assert "cancel_managed_jobs" not in fake.names()


def test_the_fake_refuses_a_wrong_argument(fake):
    with pytest.raises(TypeError):
        sky_sdk.launch_cluster(None, "r1", 10, idle_minutes_to_autostop=10)  # SkyPilot's name, not ours
    with pytest.raises(TypeError):
        sky_sdk.down()


def test_a_spot_launch_still_starting_holds_its_name_past_the_grace(cloud, tmp_path):
    """A spot launch may spend minutes starting the jobs controller before it has a job id: past the
    120 s grace, a second launch of the name still sees the request active and is refused (two managed
    jobs would bill on one bucket); once the request is over, the name is free again."""
    rec, _ = record(tmp_path, kind="managed-job")
    rec.state, rec.handle.request_id, rec.handle.job_id, rec.started_at = "LAUNCHING", "req-9", None, 1.0  # long ago
    registry.save(rec)
    cloud.request = "RUNNING"
    r = launch("--infra", "aws", "--spot", "--yes")
    assert r.exit_code == 2 and "is still being launched" in r.output, r.output
    assert "launch_managed_job" not in cloud.names()
    cloud.request = "FAILED"  # the launch that made the record was killed: nothing is coming
    assert backend_for("managed-job").state(registry.get("r1")) == "UNKNOWN"


# ---- SIGTERM and SIGHUP during a launch take Ctrl-C's road (issue 22) ----


def _signal_self(sig, wait_s=5.0):
    """Send sig to this process, as a closed terminal (SIGHUP) or `kill` (SIGTERM) does to the process
    running `launch`, and wait: Python runs the handler in the main thread, between bytecodes."""
    os.kill(os.getpid(), sig)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.fixture
def own_handlers():
    """Handlers of the test's own for SIGTERM and SIGHUP that do nothing: the launch must give them back,
    and a signal the launch fails to catch must not end the test run."""
    mine = {signal.SIGTERM: lambda *_: None, signal.SIGHUP: lambda *_: None}
    previous = {sig: signal.signal(sig, handler) for sig, handler in mine.items()}
    yield mine
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _handlers_are(handlers: dict) -> bool:
    return all(signal.getsignal(sig) is handler for sig, handler in handlers.items())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_mid_launch_cancels_the_request_and_removes_the_cluster(cloud, own_handlers, sig):
    """The signal reaches the process while SkyPilot streams the launch: as Ctrl-C, the request is
    cancelled and the cluster removed; the exit status is the signal's; the handlers come back."""
    cloud.mid_launch = lambda: _signal_self(sig)
    r = launch("--infra", "lambda", "--yes")
    assert r.exit_code == 128 + sig, r.output
    assert cloud.names() == ["launch_cluster", "cancel_requests", "cluster_status", "down"]
    assert cloud.args("cancel_requests") == {"request_ids": ["req-1"]} and cloud.requests["req-1"] == "CANCELLED"
    assert cloud.cluster is None
    assert "launch of r1 stopped: cancelled SkyPilot's launch request; removed cluster r1" in r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("error:") and f"stopped by {signal.Signals(sig).name}" in last
    assert "Traceback" not in r.output
    rec = registry.get("r1")
    assert rec.state == "LAUNCH_FAILED" and rec.handle.request_ids == ["req-1"]
    assert _handlers_are(own_handlers)


def test_sigterm_mid_spot_launch_cancels_the_job_it_submitted(cloud, own_handlers):
    cloud.jobs = {7: "PENDING"}  # the controller got the job before the signal
    cloud.mid_launch = lambda: _signal_self(signal.SIGTERM)
    r = launch("--infra", "aws", "--spot", "--yes")
    assert r.exit_code == 143, r.output
    assert cloud.names() == ["launch_managed_job", "cancel_requests", "managed_jobs", "cancel_managed_jobs"]
    assert cloud.jobs == {7: "CANCELLED"} and "cancelled managed job 7" in r.output
    assert registry.get("r1").state == "LAUNCH_FAILED" and _handlers_are(own_handlers)


def test_a_repeated_sighup_does_not_cut_the_cleanup_short(cloud, own_handlers):
    """A closed terminal sends SIGHUP more than once (the kernel to the foreground group, the shell to its
    jobs): the second, arriving while the first one's cleanup cancels the request, changes nothing."""
    cloud.mid_launch = lambda: _signal_self(signal.SIGHUP)
    cloud.before["cancel_requests"] = lambda: _signal_self(signal.SIGHUP, wait_s=0.3)
    r = launch("--infra", "lambda", "--yes")
    assert r.exit_code == 129, r.output
    assert cloud.names() == ["launch_cluster", "cancel_requests", "cluster_status", "down"]
    assert cloud.cluster is None and "removed cluster r1" in r.output and "MAY STILL BE RUNNING" not in r.output
    assert _handlers_are(own_handlers)


def test_the_signal_guard_gives_the_handlers_back(own_handlers):
    import threading

    from gpt2cloud.launch.start import Terminated, stop_signals_interrupt

    with pytest.raises(Terminated) as info:
        with stop_signals_interrupt():
            ours = signal.getsignal(signal.SIGTERM)
            assert ours is not own_handlers[signal.SIGTERM]
            with stop_signals_interrupt():  # nested (a launch inside a launch): the outer one's stay
                assert signal.getsignal(signal.SIGTERM) is ours
            assert signal.getsignal(signal.SIGTERM) is ours
            _signal_self(signal.SIGTERM)
    assert isinstance(info.value, KeyboardInterrupt) and info.value.exit_code == 143
    assert _handlers_are(own_handlers)
    seen: list = []

    def in_a_thread():  # Python installs handlers only in the main thread: there, nothing changes
        with stop_signals_interrupt():
            seen.append(signal.getsignal(signal.SIGTERM))

    t = threading.Thread(target=in_a_thread)
    t.start()
    t.join(timeout=10)
    assert seen == [own_handlers[signal.SIGTERM]]


# ---- a launch killed with -9, relaunches, and `down` of every attempt (issue 22) ----


def _launch_killed_with_9(cloud, *args) -> str:
    """Launch, and leave what a launch killed with -9 right after SkyPilot handed out its request leaves:
    the record as saved then (LAUNCHING, with the request id), and the request still provisioning on the
    server. (-9 runs no cleanup: this in-process launch ends with an exception, and what its cleanup did
    is put back.) Past the grace a launch under way in another process has. Returns the request id."""
    path, left = registry.path_for("r1"), {}

    def killed():
        left["record"] = json.loads(path.read_text())
        raise KeyboardInterrupt

    cloud.mid_launch = killed
    request_id = f"req-{cloud.launches + 1}"
    launch(*args)
    cloud.mid_launch = None
    left["record"]["started_at"] -= 3600
    path.write_text(json.dumps(left["record"]))
    cloud.requests.pop(request_id)  # in `cloud.request` again: RUNNING
    cloud.calls.clear()
    return request_id


def test_a_launch_killed_with_9_is_reconciled_and_holds_its_name(cloud):
    """No cleanup ran and the record says LAUNCHING: status and runs ask SkyPilot about the run's request,
    a relaunch is refused while it provisions, `down` cancels it and removes the cluster, and then the
    name launches again with both requests on record."""
    request_id = _launch_killed_with_9(cloud, "--infra", "lambda", "--yes")
    assert registry.get("r1").state == "LAUNCHING" and registry.get("r1").handle.request_ids == [request_id]
    cloud.cluster = None  # the request has not made the cluster yet
    d = json.loads(CliRunner().invoke(app, ["status", "r1", "--json"]).stdout)
    assert d["state"] == "LAUNCHING" and cloud.args("request_statuses") == {"request_ids": ["req-1"]}
    (row,) = json.loads(CliRunner().invoke(app, ["runs", "--json"]).stdout)["runs"]
    assert row["state"] == "LAUNCHING" and row["state_now"] == "LAUNCHING"
    for cluster in (None, "INIT"):  # before SkyPilot made the cluster, and while it provisions it
        cloud.cluster = cluster
        r = launch("--infra", "lambda", "--yes")
        assert r.exit_code == 2 and "is still being launched" in r.output and "gpt2cloud down r1" in r.output, r.output
    assert "launch_cluster" not in cloud.names()
    r = CliRunner().invoke(app, ["down", "r1"])
    assert r.exit_code == 0, r.output
    assert "cancelled its launch request req-1, then tore down cluster r1" in r.output
    assert cloud.requests["req-1"] == "CANCELLED" and cloud.cluster is None
    d = json.loads(CliRunner().invoke(app, ["status", "r1", "--json"]).stdout)
    assert d["state"] == "DOWN"
    r = launch("--infra", "lambda", "--yes")
    assert r.exit_code == 0, r.output
    rec = registry.get("r1")
    assert rec.launches == 2 and rec.handle.request_ids == ["req-1", "req-2"] and rec.handle.request_id == "req-2"


def test_a_relaunch_while_the_first_sets_its_cluster_up_is_refused(cloud):
    """The first launch's cluster is up but its job not submitted yet (setup, workdir sync): nothing live
    in the cluster's job queue, so only the request says a launch is under way. Until SkyPilot confirms
    the first attempt is gone, a relaunch (which would wait on the cluster lock and then run a second
    time) is refused; a state SkyPilot cannot give confirms nothing."""
    from sky import exceptions as ex

    _launch_killed_with_9(cloud, "--infra", "lambda", "--yes")
    cloud.cluster, cloud.job = "UP", None
    r = launch("--infra", "lambda", "--yes")
    assert r.exit_code == 2 and "is still being launched" in r.output, r.output
    cloud.fail["request_statuses"] = ex.ApiServerConnectionError("http://127.0.0.1:46580")
    r = launch("--infra", "lambda", "--yes")
    assert r.exit_code == 2 and "SkyPilot could not say" in r.output and "sky api start" in r.output, r.output
    del cloud.fail["request_statuses"]
    cloud.requests["req-1"] = "SUCCEEDED"  # the first launch's request ended: its job is on the cluster
    cloud.job = "RUNNING"
    r = launch("--infra", "lambda", "--yes")
    assert r.exit_code == 2 and "still running (RUNNING)" in r.output, r.output
    cloud.job = "SUCCEEDED"
    assert launch("--infra", "lambda", "--yes").exit_code == 0
    assert cloud.names().count("launch_cluster") == 1


def test_down_after_two_launches_cancels_both_requests(cloud):
    """Two launches of one run (as a relaunch of a run still launching was accepted before issue 22, or
    SkyPilot's word that the first had ended was wrong): `down` asks about both requests, cancels both,
    and says so, then removes the cluster."""
    assert launch("--infra", "lambda", "--yes").exit_code == 0
    cloud.job = "SUCCEEDED"
    assert launch("--infra", "lambda", "--yes").exit_code == 0
    assert registry.get("r1").handle.request_ids == ["req-1", "req-2"]
    cloud.requests.update({"req-1": "RUNNING", "req-2": "RUNNING"})
    cloud.calls.clear()
    r = CliRunner().invoke(app, ["down", "r1"])
    assert r.exit_code == 0, r.output
    assert cloud.names() == ["cancel_requests", "down"]
    assert cloud.args("cancel_requests") == {"request_ids": ["req-1", "req-2"]}
    assert "cancelled its launch requests req-1, req-2, then tore down cluster r1" in r.output
    assert cloud.requests == {"req-1": "CANCELLED", "req-2": "CANCELLED"}


@pytest.mark.parametrize("live", ["PENDING", "STARTING", "RECOVERING", "CANCELLING"])
def test_a_spot_relaunch_waits_until_every_managed_job_of_the_run_is_over(cloud, live):
    assert launch("--infra", "aws", "--spot", "--yes").exit_code == 0
    cloud.jobs[7] = live
    r = launch("--infra", "aws", "--spot", "--yes")
    assert r.exit_code == 2 and f"still running ({live})" in r.output, r.output
    cloud.jobs[7] = "SUCCEEDED"
    cloud.jobs[9] = "STARTING"  # submitted under the run's name by a launch killed before it learnt the id
    r = launch("--infra", "aws", "--spot", "--yes")
    assert r.exit_code == 2 and "still running (STARTING)" in r.output, r.output
    cloud.jobs[9] = "CANCELLED"
    assert launch("--infra", "aws", "--spot", "--yes").exit_code == 0
    assert cloud.names().count("launch_managed_job") == 2


def test_down_after_two_spot_launches_cancels_both_managed_jobs(cloud):
    from sky import exceptions as ex

    assert launch("--infra", "aws", "--spot", "--yes").exit_code == 0
    cloud.jobs[7] = "SUCCEEDED"
    assert launch("--infra", "aws", "--spot", "--yes").exit_code == 0
    rec = registry.get("r1")
    assert rec.handle.job_ids == [7, 8] and rec.handle.job_id == 8
    cloud.jobs[7] = "RUNNING"  # both write the run's bucket prefix: both must go
    d = json.loads(CliRunner().invoke(app, ["status", "r1", "--json"]).stdout)
    assert d["state"] == "RUNNING"
    cloud.calls.clear()
    r = CliRunner().invoke(app, ["down", "r1"])
    assert r.exit_code == 0, r.output
    assert cloud.names() == ["cancel_requests", "managed_jobs", "cancel_managed_jobs"]
    assert cloud.args("cancel_managed_jobs") == {"job_ids": [7, 8]} and cloud.jobs == {7: "CANCELLED", 8: "CANCELLED"}
    assert "cancelled managed jobs 7, 8 (SkyPilot tears their clusters down)" in r.output
    # once the jobs controller has autostopped, no managed job is in progress: the name is free again
    cloud.fail["managed_jobs"] = ex.ClusterNotUpError("No in-progress managed jobs.")
    assert launch("--infra", "aws", "--spot", "--yes").exit_code == 0


# ---- launch --retry-until-up --retry-minutes (issue 22, part 11) ----


def _until_cancelled(cloud, request_id="req-1", seconds=10.0):
    """A launch SkyPilot keeps retrying: it streams until its request is cancelled (by anyone), then ends
    as SkyPilot's stream does then, with RequestCancelled."""
    from sky import exceptions as ex

    def streaming():
        deadline = time.monotonic() + seconds
        while cloud.requests.get(request_id) != "CANCELLED":
            assert time.monotonic() < deadline, "the launch's window never cancelled its request"
            time.sleep(0.01)
        raise ex.RequestCancelled(f"Request {request_id} cancelled")
    return streaming


def test_retry_until_up_is_passed_to_skypilot_and_bounded(cloud):
    """SkyPilot retries until capacity turns up; past --retry-minutes the request is cancelled as Ctrl-C's
    cleanup does, and what was provisioned meanwhile (a cluster still in INIT) is removed."""
    cloud.mid_launch = _until_cancelled(cloud)
    cloud.cluster = "INIT"  # a round that got part of a node before the window passed
    t0 = time.monotonic()
    r = launch("--infra", "lambda", "--retry-until-up", "--retry-minutes", "0.01", "--yes")  # 0.6 s
    assert r.exit_code == 2, r.output
    assert 0.5 < time.monotonic() - t0 < 30
    assert cloud.args("launch_cluster")["retry_until_up"] is True
    assert cloud.names() == ["launch_cluster", "cancel_requests", "cancel_requests", "cluster_status", "down"]
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("error: launch r1: no H100:8 came up on lambda in the 0.01 min of --retry-minutes")
    assert "its launch request was cancelled" in last and "removed cluster r1, so nothing bills" in last
    assert cloud.cluster is None and registry.get("r1").state == "LAUNCH_FAILED"


def test_a_launch_that_comes_up_within_its_window_is_left_alone(cloud):
    r = launch("--infra", "lambda", "--retry-until-up", "--retry-minutes", "0.005", "--yes")
    assert r.exit_code == 0, r.output
    assert cloud.args("launch_cluster")["retry_until_up"] is True
    time.sleep(0.6)  # past the window: a launch that ended closes it, nothing is cancelled after
    assert "cancel_requests" not in cloud.names() and registry.get("r1").state == "LAUNCHED"
    r = launch("--infra", "lambda", "--yes", name="r2")  # without the flag SkyPilot does not retry
    assert r.exit_code == 0 and [a["retry_until_up"] for n, a in cloud.calls if n == "launch_cluster"] == [True, False]


def test_a_spot_launch_waits_at_most_retry_minutes_for_its_job_to_start(cloud, monkeypatch):
    from gpt2cloud.backends import skypilot

    monkeypatch.setattr(skypilot, "POLL_S", 0.02)
    cloud.managed = "STARTING"  # SkyPilot's controller keeps asking the clouds: no node comes up
    r = launch("--infra", "aws", "--spot", "--retry-until-up", "--retry-minutes", "0.005", "--yes")
    assert r.exit_code == 2, r.output
    last = r.output.strip().splitlines()[-1]
    assert "managed job 7 did not start in the 0.005 min of --retry-minutes" in last and "was STARTING" in last
    assert "cancelled managed job 7" in last and cloud.jobs == {7: "CANCELLED"}
    assert cloud.names()[:2] == ["launch_managed_job", "managed_jobs"]
    cloud.managed = "RUNNING"  # a node came up: the launch ends there
    r = launch("--infra", "aws", "--spot", "--retry-until-up", "--yes")
    assert r.exit_code == 0, r.output
    assert "SkyPilot's jobs controller stays after the run" in r.output and "gpt2cloud down --controller" in r.output


@pytest.mark.parametrize("args, needle", [
    (["--infra", "lambda", "--retry-minutes", "5"], "add --retry-until-up"),
    (["--infra", "lambda", "--retry-until-up", "--retry-minutes", "0"], "--retry-minutes 0"),
    (["--infra", "lambda", "--retry-until-up", "--retry-minutes", "5000"], "at most"),
], ids=["minutes without the flag", "zero minutes", "more than a day"])
def test_bad_retry_options_are_one_line(fake, args, needle):
    r = launch(*args, "--dry-run")
    assert r.exit_code == 2 and r.output.startswith("error: ") and needle in r.output, r.output
    assert "launch_cluster" not in fake.names()


def test_the_exported_task_says_how_to_retry_by_hand(fake, tmp_path):
    r = launch("--infra", "lambda", "--retry-until-up", "--retry-minutes", "30", "--dry-run")
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[1].endswith("--retry-until-up")
    assert "RETRY" not in r.stdout.split("envs:", 1)[1].split("setup:", 1)[0]  # a launch option, not a node's env
    plain = launch("--infra", "lambda", "--dry-run")
    assert plain.exit_code == 0 and "--retry-until-up" not in plain.stdout


# ---- down --controller (issue 22, part 11) ----

CONTROLLER = "sky-jobs-controller-1a2b3c4d"


def test_down_controller_refuses_while_a_managed_job_is_live(fake):
    fake.controller = (CONTROLLER, "UP")
    fake.jobs, fake.job_names = {3: "RUNNING", 4: "SUCCEEDED"}, {3: "someone-elses-run"}
    r = CliRunner().invoke(app, ["down", "--controller"])
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert ("still manages 1 live managed job: 3 (someone-elses-run, RUNNING)" in r.output
            and "down" not in fake.names() and fake.controller is not None)


@pytest.mark.parametrize("status", ["UP", "STOPPED"])
def test_down_controller_tears_it_down_once_no_job_is_live(fake, status):
    fake.controller = (CONTROLLER, status)
    fake.jobs = {3: "SUCCEEDED"}
    r = CliRunner().invoke(app, ["down", "--controller"])
    assert r.exit_code == 0, r.output
    assert f"controller: tore down SkyPilot's jobs controller {CONTROLLER} (it was {status})" in r.stdout
    assert fake.args("down") == {"cluster_name": CONTROLLER} and fake.controller is None
    r = CliRunner().invoke(app, ["down", "--controller", "--json"])
    assert json.loads(r.stdout)["controller"] == "SkyPilot's jobs controller is not there: nothing to remove"


def test_down_controller_of_one_starting_is_refused(fake):
    fake.controller = (CONTROLLER, "INIT")
    r = CliRunner().invoke(app, ["down", "--controller"])
    assert r.exit_code == 2 and "being started or repaired (INIT)" in r.output and "down" not in fake.names()


def test_down_of_a_spot_run_and_its_controller(fake, tmp_path):
    """The run's managed job is cancelled first (and said), then the controller goes: no job is live."""
    record(tmp_path, kind="managed-job")
    fake.controller, fake.jobs = (CONTROLLER, "UP"), {7: "RUNNING"}
    r = CliRunner().invoke(app, ["down", "r1", "--controller"])
    assert r.exit_code == 0, r.output
    assert "r1: cancelled managed job 7" in r.stdout and f"tore down SkyPilot's jobs controller {CONTROLLER}" in r.stdout
    assert fake.names().index("cancel_managed_jobs") < fake.names().index("down")


# ---- down --graceful, and what a plain down may lose (issue 22, part 10) ----


def _bucket_with_progress(store, checkpoint: int, last: int, finished: bool = False, now: float | None = None):
    """The run's bucket as its node leaves it: a complete checkpoint, the metrics up to `last`, the
    pusher's record."""
    now = time.time() if now is None else now
    store.put_bytes(f"checkpoints/step_{checkpoint:06d}/model.safetensors", b"w" * 64)
    store.put_bytes(f"checkpoints/step_{checkpoint:06d}/manifest.json", b"{}")
    lines = [{"event": "start", "world_size": 8, "config": {"steps": 100}}]
    lines += [{"step": s, "loss": 5.0, "time": now - 600 + s} for s in range(1, last + 1)]
    lines.insert(checkpoint + 1, {"event": "checkpoint", "step": checkpoint, "time": now - 600})
    if finished:
        lines.append({"event": "end", "step": last, "final_loss": 5.0})
    store.put_bytes("metrics.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode())
    store.put_bytes("push_status.json", json.dumps({"time": now - 30, "every": 60, "last_ok": now - 30,
                                                    "failing_since": None, "failures": 0}).encode())


def test_plain_down_says_what_it_may_lose(fake, tmp_path):
    _, store = record(tmp_path)
    _bucket_with_progress(store, checkpoint=20, last=25)
    r = CliRunner().invoke(app, ["down", "r1", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["may_lose"].startswith("the work since the bucket's newest checkpoint, step 20 (written ")
    assert "10 min ago)" in d["may_lose"] and "the bucket's metrics reach step 25" in d["may_lose"]
    assert "the node's last push that worked: " in d["may_lose"] and "under a minute ago" in d["may_lose"]
    assert fake.names() == ["down"]  # nothing asked of SkyPilot for it: it comes from the bucket


def test_plain_down_of_a_finished_run_loses_nothing(fake, tmp_path):
    _, store = record(tmp_path)
    _bucket_with_progress(store, checkpoint=25, last=25, finished=True)
    r = CliRunner().invoke(app, ["down", "r1"])
    assert r.exit_code == 0 and "may have lost" not in r.output, r.output


def test_down_graceful_waits_for_the_checkpoint_then_tears_down(fake, tmp_path, monkeypatch):
    """The node (here: the fake's job) sees the stop request in the bucket, stops with a checkpoint and
    pushes it; `down --graceful` sees the job end, tears the cluster down, and withdraws the request."""
    from gpt2cloud.runs import logs

    monkeypatch.setattr(logs, "POLL_S", 0.01)
    _, store = record(tmp_path)
    _bucket_with_progress(store, checkpoint=20, last=25)
    seen: list = []

    def node_reads_the_bucket():
        request = stoprequest.read(store)
        if request is not None and fake.job == "RUNNING":
            seen.append(request)
            _bucket_with_progress(store, checkpoint=27, last=27)  # stopped at its next check, pushed
            fake.job = "SUCCEEDED"

    fake.before["cluster_job_status"] = node_reads_the_bucket
    r = CliRunner().invoke(app, ["down", "r1", "--graceful", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert seen and seen[0]["who"] == stoprequest.who() and seen[0]["reason"] == "gpt2cloud down --graceful"
    assert d["graceful"]["asked"] and d["graceful"]["ended"] and d["graceful"]["state"] == "SUCCEEDED"
    assert d["action"] == "tore down cluster r1" and "may_lose" not in d
    assert fake.names()[-1] == "down" and fake.cluster is None
    assert stoprequest.read(store) is None  # withdrawn: a later job of the run is not stopped by it
    assert "asked the node to stop with a checkpoint" in r.output and "the job ended (SUCCEEDED)" in r.output


def test_down_graceful_whose_wait_runs_out_tears_down_and_says_what_is_lost(fake, tmp_path):
    _, store = record(tmp_path)
    _bucket_with_progress(store, checkpoint=20, last=25)
    t0 = time.monotonic()
    r = CliRunner().invoke(app, ["down", "r1", "--graceful", "--wait-minutes", "0.01"])  # the job never ends
    assert r.exit_code == 0, r.output
    assert time.monotonic() - t0 < 20
    assert "the job did not end within 0.01 min (RUNNING); tearing down now" in r.output
    assert "tore down cluster r1" in r.stdout and fake.cluster is None
    assert "r1: may have lost the work since the bucket's newest checkpoint, step 20" in r.output
    assert stoprequest.read(store) is None


def test_down_graceful_of_a_run_not_training_asks_nothing(fake, tmp_path):
    _, store = record(tmp_path)
    fake.job = "SUCCEEDED"
    r = CliRunner().invoke(app, ["down", "r1", "--graceful"])
    assert r.exit_code == 0 and "nothing is training (SUCCEEDED)" in r.output, r.output
    assert "tore down cluster r1" in r.stdout and not store.exists("stop_request.json")


def test_down_graceful_of_a_managed_job(fake, tmp_path, monkeypatch):
    """A spot run: the job ends with its checkpoint pushed, SkyPilot's controller removes its cluster, and
    `down` then finds nothing left to cancel."""
    from gpt2cloud.runs import logs

    monkeypatch.setattr(logs, "POLL_S", 0.01)
    _, store = record(tmp_path, kind="managed-job")
    fake.jobs = {7: "RUNNING"}

    def node():
        if stoprequest.read(store) is not None:
            fake.jobs[7] = "SUCCEEDED"

    fake.before["managed_jobs"] = node
    r = CliRunner().invoke(app, ["down", "r1", "--graceful"])
    assert r.exit_code == 0, r.output
    assert "the job ended (SUCCEEDED)" in r.output and "no managed job named r1 was in progress" in r.stdout
    assert "cancel_managed_jobs" not in fake.names() and stoprequest.read(store) is None


def test_ctrl_c_during_a_graceful_wait_tears_nothing_down_and_withdraws_the_request(fake, tmp_path):
    _, store = record(tmp_path)
    polls: list = []

    def ctrl_c_on_the_second_poll():
        polls.append(stoprequest.read(store))
        if len(polls) == 2:
            raise KeyboardInterrupt

    fake.before["cluster_job_status"] = ctrl_c_on_the_second_poll
    r = CliRunner().invoke(app, ["down", "r1", "--graceful"])
    assert r.exit_code == 130, r.output
    assert polls[1] is not None and stoprequest.read(store) is None  # written while it waited, then withdrawn
    assert "interrupted: nothing was torn down and the stop request is withdrawn" in r.output
    assert "down" not in fake.names() and fake.cluster == "UP" and registry.get("r1").state != "DOWN"
