"""launch / status / logs / down through the SkyPilot SDK wrapper, with the wrapper as the only fake.

The fake (FakeSky) replaces gpt2cloud/backends/sky_sdk.py's functions and raises SkyPilot's real exception
classes, so gpt2cloud's error handling runs for real. Storage is real S3 semantics (moto in-process,
no endpoint), the task is a real sky.Task, the registry is a temp GPT2CLOUD_HOME.
"""

from __future__ import annotations

import json
import os

import pytest
from sky_offline import sky_home, sky_mod  # noqa: F401  (fixtures)
from typer.testing import CliRunner

from gpt2cloud import home
from gpt2cloud.backends import sky_sdk
from gpt2cloud.runs import registry
from gpt2cloud.cli import app

BUCKET = "gpt2-test-bucket"


class FakeSky:
    """Stands in for gpt2cloud.backends.sky_sdk: records calls; `fail[name] = exc` makes a call raise exc."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple] = []
        self.fail: dict[str, BaseException] = {}
        self.cluster = "UP"
        self.job = "RUNNING"
        self.managed = "RUNNING"
        for name in ("launch_cluster", "launch_managed_job", "cluster_status", "cluster_job_status",
                     "managed_job_status", "down", "cancel_managed_job", "tail_logs", "tail_managed_logs"):
            monkeypatch.setattr(sky_sdk, name, self._make(name))

    def _make(self, name):
        def call(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            if name in self.fail:
                raise self.fail[name]
            return getattr(self, "_" + name)(*args, **kwargs)
        return call

    def _launch_cluster(self, task, cluster_name, idle_minutes):
        return 1

    def _launch_managed_job(self, task, name):
        return 7

    def _cluster_status(self, name):
        return self.cluster

    def _cluster_job_status(self, name, job_id):
        return self.job

    def _managed_job_status(self, job_id):
        return self.managed

    def _down(self, name):
        return None

    def _cancel_managed_job(self, job_id):
        return None

    def _tail_logs(self, cluster, job_id, follow):
        print(f"fake log of {cluster} job {job_id}")
        return 0

    def _tail_managed_logs(self, job_id, follow):
        print(f"fake managed log of job {job_id}")
        return 0

    def names(self):
        return [c[0] for c in self.calls]


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
    rec = registry.RunRecord(spec=spec, started_at=1.0, cluster="r1" if kind == "cluster" else None,
                             job_id=1 if kind == "cluster" else 7, state="LAUNCHED")
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
    (name, (task, cluster, idle), _), = [c for c in cloud.calls if c[0] == "launch_cluster"]
    import sky

    assert isinstance(task, sky.Task) and cluster == "r1" and idle == 7
    secret, key_id = os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"]  # moto's fake ones
    assert task.secrets["AWS_SECRET_ACCESS_KEY"].get_secret_value() == secret
    (res,) = list(task.resources)
    assert res.autostop_config.down and res.autostop_config.idle_minutes == 7
    rec_text = registry.path_for("r1").read_text()
    rec = json.loads(rec_text)
    spec = rec["spec"]
    assert rec["cluster"] == "r1" and spec["infra"] == "lambda" and spec["bucket"] == f"s3://{BUCKET}/runs"
    assert spec["recipe"] == "gpt2-124m" and spec["gpu_type"] == "H100" and spec["gpus_per_node"] == 8
    assert spec["estimate"]["cost_usd"] > 0 and spec["price_per_gpu_hour"] > 0 and rec["started_at"] > 0
    assert spec["max_cost_usd"] == 40 and rec["state"] == "LAUNCHED"
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
    (_, (task, name), _), = [c for c in cloud.calls if c[0] == "launch_managed_job"]
    assert name == "r1" and all(res.use_spot and res.job_recovery for res in task.resources)
    rec = registry.get("r1")
    assert rec.spec.kind == "managed-job" and rec.job_id == 7 and rec.spec.spot


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
    }[name]


@pytest.mark.parametrize("case", ["no-cloud", "unavailable", "spot", "cloud", "network", "server"])
def test_sdk_errors_become_one_line_with_the_fix(fake, case):
    from gpt2cloud.backends.sky_errors import sky_errors
    from gpt2cloud.errors import UserError

    exc, message = _exc(case)
    with pytest.raises(UserError) as info:
        with sky_errors("launch r1", infra="lambda", gpus="H100:8"):
            raise exc
    assert message in str(info.value) and "\n" not in str(info.value)


def test_launch_error_through_the_cli(cloud):
    exc, message = _exc("no-cloud")
    cloud.fail["launch_cluster"] = exc
    r = launch("--infra", "lambda", "--yes")
    assert r.exit_code == 2, r.output
    last = r.output.strip().splitlines()[-1]
    assert message in last and last.startswith("error:") and "Traceback" not in r.output
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
    assert r.exit_code == 0 and "tore down cluster r1" in r.stdout and ("down", ("r1",), {}) in cloud.calls
    assert registry.get("r1").state == "DOWN"
    cloud.fail["down"] = ex.ClusterDoesNotExist("Cluster 'r1' does not exist.")
    r = CliRunner().invoke(app, ["down", "r1"])
    assert r.exit_code == 0 and "already gone" in r.stdout


def test_down_cancels_a_managed_job(fake, tmp_path):
    cloud = fake
    record(tmp_path, kind="managed-job")
    r = CliRunner().invoke(app, ["down", "r1"])
    assert r.exit_code == 0 and ("cancel_managed_job", (7,), {}) in cloud.calls


@pytest.mark.parametrize("cmd", [["status", "nope"], ["logs", "nope"], ["down", "nope"], ["fetch", "nope"]])
def test_unknown_run_id(fake, cmd):
    r = CliRunner().invoke(app, cmd)
    assert r.exit_code == 2 and "unknown run 'nope'" in r.output and "gpt2cloud runs" in r.output
