"""launch / status / logs / down through the SkyPilot SDK wrapper, with the wrapper as the only fake.

The fake (FakeSky) replaces gpt2cloud/backends/sky_sdk.py's functions and raises SkyPilot's real exception
classes, so gpt2cloud's error handling runs for real. Storage is real S3 semantics (moto in-process,
no endpoint), the task is a real sky.Task, the registry is a temp GPT2CLOUD_HOME.
"""

from __future__ import annotations

import inspect
import json
import os
from typing import Optional

import pytest
from sky_offline import sky_home, sky_mod  # noqa: F401  (fixtures)
from typer.testing import CliRunner

from gpt2cloud import home
from gpt2cloud.backends import backend_for, sky_sdk
from gpt2cloud.backends.skypilot import SkyHandle
from gpt2cloud.cli import app
from gpt2cloud.runs import registry

BUCKET = "gpt2-test-bucket"


# The wrapper's public functions: each one the fake must stand in for.
SDK_FUNCTIONS = sorted(n for n, f in vars(sky_sdk).items()
                       if inspect.isfunction(f) and not n.startswith("_") and f.__module__ == sky_sdk.__name__)


class FakeSky:
    """Stands in for gpt2cloud.backends.sky_sdk, bound to its real signatures: a call with a wrong or
    missing argument raises TypeError here as it would for real. Records calls as (name, {arg: value})
    with defaults filled in; `fail[name] = exc` makes a call raise exc before it does anything (for a
    launch: before SkyPilot hands out a request id); `mid_launch = exc` makes a launch raise exc after
    it handed out its request id, as Ctrl-C or a setup failure does while SkyPilot streams."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple] = []
        self.fail: dict[str, BaseException] = {}
        self.mid_launch: Optional[BaseException] = None
        self.cluster = "UP"  # what SkyPilot says of the cluster; None: it does not exist
        self.job = "RUNNING"
        self.managed = "RUNNING"
        self.request = "RUNNING"  # the launch request's state on the API server
        self.named_jobs: list[int] = []  # managed jobs in progress under the run's name
        for name in SDK_FUNCTIONS:
            assert hasattr(self, "_" + name), f"FakeSky has no stand-in for sky_sdk.{name}"
            monkeypatch.setattr(sky_sdk, name, self._make(name, inspect.signature(getattr(sky_sdk, name))))

    def _make(self, name, signature):
        def call(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)  # TypeError on a wrong argument, like the real one
            bound.apply_defaults()
            self.calls.append((name, dict(bound.arguments)))
            if name in self.fail:
                raise self.fail[name]
            return getattr(self, "_" + name)(**bound.arguments)  # the stand-ins use the real names too
        return call

    def _launched(self, on_request, result):
        if on_request is not None:
            on_request("req-1")
        if self.mid_launch is not None:
            raise self.mid_launch
        return result

    def _launch_cluster(self, task, cluster_name, idle_minutes, dryrun, on_request):
        return self._launched(on_request, 1)

    def _launch_managed_job(self, task, name, on_request):
        return self._launched(on_request, 7)

    def _cancel_request(self, request_id):
        if self.request != "RUNNING":
            return False  # finished already: nothing to cancel
        self.request = "CANCELLED"
        return True

    def _request_status(self, request_id):
        return self.request

    def _cluster_status(self, cluster_name, refresh):
        return self.cluster

    def _cluster_job_status(self, cluster_name, job_id):
        return self.job

    def _managed_job_status(self, job_id):
        return self.managed

    def _managed_job_ids(self, name):
        return list(self.named_jobs)

    def _down(self, cluster_name):
        from sky import exceptions as ex

        if self.cluster is None:
            raise ex.ClusterDoesNotExist(f"Cluster {cluster_name!r} does not exist.")
        self.cluster = None

    def _cancel_managed_job(self, job_id):
        return None

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
    r = CliRunner().invoke(app, ["down", "r1"])
    assert r.exit_code == 0 and ("cancel_managed_job", {"job_id": 7}) in cloud.calls


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
    assert fake.names() == ["launch_cluster", "cancel_request", "cluster_status", "down"]


def test_ctrl_c_mid_launch_cancels_the_request_and_removes_the_cluster(cloud):
    cloud.mid_launch = KeyboardInterrupt()
    r = launch("--infra", "lambda", "--yes")
    assert r.exit_code == 130, r.output
    assert cloud.names() == ["launch_cluster", "cancel_request", "cluster_status", "down"]
    assert cloud.args("cancel_request") == {"request_id": "req-1"} and cloud.request == "CANCELLED"
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
    cloud.fail["cancel_request"] = ex.ApiServerConnectionError("http://127.0.0.1:46580")  # it is gone...
    r = launch("--infra", "lambda", "--yes")  # ...and the teardown still runs (the SDK restarts a local one)
    assert r.exit_code == 2, r.output
    last = r.output.strip().splitlines()[-1]
    assert "lost the connection to the SkyPilot API server" in last and "removed cluster r1" in last
    assert cloud.names() == ["launch_cluster", "cancel_request", "cluster_status", "down"]


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
    cloud.named_jobs = [7]  # the controller got the job before Ctrl-C
    r = launch("--infra", "aws", "--spot", "--yes")
    assert r.exit_code == 130, r.output
    assert cloud.names() == ["launch_managed_job", "cancel_request", "managed_job_ids", "cancel_managed_job"]
    assert cloud.args("managed_job_ids") == {"name": "r1"} and cloud.args("cancel_managed_job") == {"job_id": 7}
    assert "cancelled managed job 7" in r.output


def test_down_of_a_provisioning_run_cancels_then_tears_down(fake, tmp_path):
    rec, _ = record(tmp_path)
    rec.state, rec.handle.request_id, rec.handle.job_id = "LAUNCHING", "req-9", None
    registry.save(rec)
    fake.cluster = None  # SkyPilot has not written the cluster down yet: status asks the request
    d = json.loads(CliRunner().invoke(app, ["status", "r1", "--json"]).stdout)
    assert d["state"] == "LAUNCHING" and fake.args("request_status") == {"request_id": "req-9"}
    fake.cluster = "INIT"
    fake.calls.clear()
    r = CliRunner().invoke(app, ["down", "r1"])
    assert r.exit_code == 0, r.output
    assert fake.names() == ["cancel_request", "down"]  # the request first: nothing provisions after the down
    assert "cancelled its launch request, then tore down cluster r1" in r.output
    assert registry.get("r1").state == "DOWN"


def test_down_of_a_provisioning_run_that_made_no_cluster(fake, tmp_path):
    rec, _ = record(tmp_path)
    rec.state, rec.handle.request_id = "LAUNCHING", "req-9"
    registry.save(rec)
    fake.cluster = None
    r = CliRunner().invoke(app, ["down", "r1"])
    assert r.exit_code == 0, r.output
    assert "cancelled its launch request; no cluster was left" in r.output and "already gone" not in r.output


def test_down_of_a_provisioning_managed_job_finds_it_by_name(fake, tmp_path):
    rec, _ = record(tmp_path, kind="managed-job")
    rec.state, rec.handle.request_id, rec.handle.job_id = "LAUNCHING", "req-9", None
    registry.save(rec)
    fake.named_jobs = [8]
    r = CliRunner().invoke(app, ["down", "r1"])
    assert r.exit_code == 0, r.output
    assert fake.names() == ["cancel_request", "managed_job_ids", "cancel_managed_job"]
    assert "cancelled its launch request, then cancelled managed job 8" in r.output


def test_down_of_a_managed_job_without_a_controller(fake, tmp_path):
    from sky import exceptions as ex

    record(tmp_path, kind="managed-job")
    fake.fail["cancel_managed_job"] = ex.ClusterNotUpError("No in-progress managed jobs.")
    r = CliRunner().invoke(app, ["down", "r1"])
    assert r.exit_code == 0 and "no managed job was running" in r.output


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
    assert r.exit_code == 2 and "still running" in r.output, r.output
    assert "launch_managed_job" not in cloud.names()
    cloud.request = "FAILED"  # the launch that made the record was killed: nothing is coming
    assert backend_for("managed-job").state(registry.get("r1")) == "UNKNOWN"
