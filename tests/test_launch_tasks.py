"""SkyPilot tasks built for real and validated offline: SkyPilot's own parser, schema and optimizer.

The catalogs are a small CSV fixture under a temp HOME (tests/sky_offline.py); Lambda and AWS are
"enabled" by patching SkyPilot's cached credential check, as SkyPilot's own tests do. Nothing here
reaches a cloud, an API server or a bucket.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from sky_offline import enable, sky_home, sky_mod  # noqa: F401  (fixtures)
from typer.testing import CliRunner

from gpt2cloud.backends.skypilot import to_sky_task
from gpt2cloud.launch import scripts
from gpt2cloud.launch import task as tasks
from gpt2cloud.launch.plan import plan
from gpt2cloud.cli import app
from gpt2cloud.errors import UserError

SECRET = "wJalrXUtnFEMI-not-a-real-secret-0123456789"
KEY_ID = "AKIAEXAMPLEKEYID0001"


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path / "g2"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return tmp_path


def _plan(**kw):
    args = dict(recipe="gpt2-124m", gpus="H100:8", data="s3://bkt/fineweb", bucket="s3://bkt/runs", name="g124")
    args.update(kw)
    return plan(**args)


def _optimize(sky, task):
    with sky.Dag() as dag:
        dag.add(task)
    sky.optimizer.Optimizer.optimize(dag, minimize=sky.OptimizeTarget.COST, quiet=True)
    return task.best_resources


def _clean(cfg: dict) -> dict:
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    return json.loads(json.dumps(cfg, sort_keys=True, default=str))


def test_h100x8_on_lambda(sky_mod, env):
    sky = sky_mod
    p = _plan(infra="lambda", max_cost=50.0)
    task = to_sky_task(p.task_cfg, p.secrets)
    assert isinstance(task, sky.Task) and task.num_nodes == 1 and task.name == "g124"
    (res,) = list(task.resources)
    assert res.accelerators == {"H100": 8} and str(res.cloud) == "Lambda" and not res.use_spot
    assert res.autostop_config.enabled and res.autostop_config.down and res.autostop_config.idle_minutes == 10
    assert task.envs["GPT2CLOUD_RUN_URL"] == "s3://bkt/runs/g124"
    assert task.envs["GPT2CLOUD_RECIPE"] == "gpt2-124m" and p.train_cfg.max_cost_usd == 50 == p.spec.max_cost_usd
    # money travels one road, launch -> RunSpec -> config.json: no env carries or overrides it
    assert not [k for k in task.envs if any(w in k for w in ("COST", "PRICE", "MAX_SECONDS", "MAX_HOURS"))]
    assert "AWS_SECRET_ACCESS_KEY" not in task.envs and SECRET not in json.dumps(task.envs)
    assert {k: v.get_secret_value() for k, v in task.secrets.items()} == {
        "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET}
    # The node installs the shipped wheel with --no-deps, plus only what the trainer imports.
    assert "pip install -q --no-deps" in task.setup
    assert not [line for line in task.setup.splitlines() if "pip" in line and "skypilot" in line]
    from gpt2cloud.launch.build import NODE_REQUIREMENTS

    assert f'DEPS="$GPT2CLOUD_TORCH_SPEC {" ".join(NODE_REQUIREMENTS)}"' in task.setup
    best = _optimize(sky, task)
    assert best.instance_type == "gpu_8x_h100_sxm5"
    config = json.loads(p.train_cfg.to_json())  # what start.py writes to the workdir
    assert config["max_cost_usd"] == 50.0 and config["price_per_gpu_hour"] == p.est.price_per_gpu_hour
    assert config["peak_flops_per_gpu"] == 989e12 and config["steps"] == 19073


def test_two_nodes_torchrun_over_all_nodes(sky_mod, env):
    p = _plan(infra="lambda", nodes=2, micro_batch=32)
    task = to_sky_task(p.task_cfg, p.secrets)
    assert task.num_nodes == 2
    run = task.run
    assert 'MASTER_ADDR="$(echo "$SKYPILOT_NODE_IPS" | head -n1)"' in run
    for flag in ('--nnodes="$SKYPILOT_NUM_NODES"', '--nproc_per_node="$SKYPILOT_NUM_GPUS_PER_NODE"',
                 '--node_rank="$RANK"', '--master_addr="$MASTER_ADDR"'):
        assert flag in run
    assert "model.sync pull" in run and "model.sync push" in run and "model.sync data" in run
    assert run.index("model.sync pull") < run.index("torch.distributed.run")
    assert p.est.gpus == 16 and p.train_cfg.micro_batch == 32
    assert _optimize(sky_mod, task).instance_type == "gpu_8x_h100_sxm5"


def test_spot_on_aws_is_a_managed_job_with_recovery(sky_mod, env):
    p = _plan(infra="aws", spot=True)
    assert p.spec.kind == "managed-job"
    task = to_sky_task(p.task_cfg, p.secrets)
    (res,) = list(task.resources)
    assert res.use_spot and str(res.cloud) == "AWS"
    assert res.job_recovery["strategy"] == tasks.JOB_RECOVERY["strategy"]
    best = _optimize(sky_mod, task)
    assert best.instance_type == "p5.48xlarge" and best.use_spot


def test_any_of_over_enabled_clouds(sky_mod, env, monkeypatch):
    p = _plan()  # no --infra
    assert p.spec.infra == "any" and p.job.resources.clouds == ("aws", "lambda")
    assert p.task_cfg["resources"]["any_of"] == [{"infra": "aws"}, {"infra": "lambda"}]
    task = to_sky_task(p.task_cfg, p.secrets)
    assert {str(r.cloud) for r in task.resources} == {"AWS", "Lambda"}
    assert str(_optimize(sky_mod, task).cloud) == "Lambda"  # the cheaper one in the fixture
    # spot: Lambda has none, so only AWS is left
    assert _plan(spot=True).job.resources.clouds == ("aws",)
    # a GPU only Lambda's catalog has
    assert _plan(recipe="gpt2-tiny", gpus="A10:1").job.resources.clouds == ("lambda",)


def test_yaml_round_trips_and_holds_no_secret(sky_mod, env):
    p = _plan(infra="lambda")
    out = env / "task.yaml"
    r = CliRunner().invoke(app, ["launch", "gpt2-124m", "--gpus", "H100:8", "--infra", "lambda",
                                 "--data", "s3://bkt/fineweb", "--bucket", "s3://bkt/runs", "--name", "g124",
                                 "--export-yaml", str(out)])
    assert r.exit_code == 0, r.output
    text = out.read_text()
    assert SECRET not in text and KEY_ID not in text and SECRET not in r.output
    parsed = yaml.safe_load(text)
    assert parsed["secrets"] == {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}
    from_file = sky_mod.Task.from_yaml(str(out))
    built = to_sky_task(p.task_cfg)
    assert _clean(from_file.to_yaml_config()) == _clean(built.to_yaml_config())
    # `sky launch FILE --secret NAME` fills the values in, exactly as our launch does
    filled = sky_mod.Task.from_yaml_config(yaml.safe_load(text), secrets_overrides=list(p.secrets.items()))
    assert filled.secrets["AWS_SECRET_ACCESS_KEY"].get_secret_value() == SECRET
    # nothing was launched, nothing recorded
    assert not (env / "g2" / "runs").exists()


def test_dry_run_prints_yaml_only(sky_mod, env):
    r = CliRunner().invoke(app, ["launch", "gpt2-124m", "--gpus", "H100:8", "--infra", "aws", "--spot",
                                 "--data", "s3://bkt/fineweb", "--bucket", "s3://bkt/runs", "--name", "g124",
                                 "--dry-run"])
    assert r.exit_code == 0, r.output
    assert SECRET not in r.stdout and KEY_ID not in r.stdout
    cfg = yaml.safe_load(r.stdout)
    assert cfg["resources"]["use_spot"] is True and "job_recovery" in cfg["resources"]
    sky_mod.Task.from_yaml_config(cfg)


@pytest.mark.parametrize("kw, message", [
    (dict(infra="lambda", spot=True), "lambda has no spot instances"),
    (dict(infra="lambda", gpus="H100:4"), "lambda does not offer H100:4; lambda offers H100 in counts 1, 8"),
    (dict(infra="aws", recipe="gpt2-tiny", gpus="A10:1"), "aws does not offer A10:1"),
    (dict(infra="nocloud"), "unknown cloud 'nocloud'"),
    (dict(infra="lambda", data="file:///tmp/data"), "a cloud node cannot reach a file:// path"),
    (dict(infra="lambda", recipe="gpt2-1558m", gpus="A10:8"), "does not fit even at micro-batch 1"),
    (dict(infra="lambda", bucket="gs://x/y"), "use s3://BUCKET/PREFIX"),
    (dict(infra="local", nodes=0), "need at least 1 node"),
    (dict(infra="lambda", recipe="gpt2-tiny", gpus="CPU:2"), "CPU ranks are for --infra local"),
])
def test_launch_errors_before_anything_is_provisioned(sky_mod, env, kw, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        _plan(**kw)


def test_no_cloud_enabled(sky_mod, env, monkeypatch):
    enable(monkeypatch, ())
    with pytest.raises(UserError, match=r"run `sky check`.*lambda_keys"):
        _plan()
    r = CliRunner().invoke(app, ["launch", "gpt2-124m", "--data", "s3://bkt/d", "--bucket", "s3://bkt/r", "--yes"])
    assert r.exit_code == 2 and "sky check" in r.output
    assert r.output.strip().count("\n") == 0  # one line


def test_loopback_endpoint_is_refused_for_a_cloud(sky_mod, env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    with pytest.raises(UserError, match="a cloud node cannot reach"):
        _plan(infra="lambda")
    p = _plan(infra="local", gpus="H100:2", recipe="gpt2-tiny")
    assert p.task_cfg["envs"]["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"


def test_local_cpu_ranks_get_a_cpu_estimate_and_their_peak_for_mfu(sky_mod, env):
    p = _plan(infra="local", gpus="CPU:2", recipe="gpt2-tiny", data="file:///tmp/d", bucket="file:///tmp/b")
    assert p.est.gpu_type == "CPU" and p.est.gpus == 2 and p.est.fits
    assert "gpt2cloud train gpt2-tiny, 2 CPU ranks" in p.est.mfu_source  # the measured calibration point
    assert p.train_cfg.peak_flops_per_gpu == pytest.approx(p.est.peak_tflops_per_gpu * 1e12)
    stand_in = _plan(infra="local", gpus="H100:2", recipe="gpt2-tiny", data="file:///tmp/d", bucket="file:///tmp/b",
                     name="g2")
    assert stand_in.train_cfg.peak_flops_per_gpu == 0.0  # CPU ranks standing in for H100s: no meaningful MFU


def test_dry_run_writes_nothing(sky_mod, env):
    """`launch --dry-run` has no side effects: no build, no registry, nothing under $GPT2CLOUD_HOME."""
    r = CliRunner().invoke(app, ["launch", "gpt2-tiny", "--gpus", "H100:1", "--infra", "lambda",
                                 "--data", "s3://bkt/d", "--bucket", "s3://bkt/r", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert not (env / "g2").exists()
    wheel = yaml.safe_load(r.stdout)["workdir"]
    assert not Path(wheel).exists()  # --export-yaml writes the build the file names; --dry-run does not


def test_node_scripts_use_the_constants_they_name(sky_mod, env):
    p = _plan(infra="lambda")
    run, setup = p.task_cfg["run"], p.task_cfg["setup"]
    import re

    assert not re.findall(r"@[A-Z_]+@", run + setup)  # every placeholder filled
    from model.sync import EXIT_BUCKET, EXIT_DATA

    assert f"|| exit {EXIT_BUCKET}" in run and f'RC="${{RC:-{EXIT_DATA}}}"' in run
    assert f"--master_port=\"${{GPT2CLOUD_MASTER_PORT:-{scripts.MASTER_PORT}}}\"" in run
    assert scripts.NODE_HOME_DEFAULT in run and scripts.NODE_HOME_DEFAULT in setup


def test_export_is_safe_to_launch_by_hand(sky_mod, env):
    """The exported task: autostop with down that waits for jobs only, the GPU check in setup, recovery
    only on a stall, --max-hours as a hard limit; a spot export says `sky jobs launch`, never `sky launch`."""
    out = env / "spot.yaml"
    r = CliRunner().invoke(app, ["launch", "gpt2-124m", "--gpus", "H100:8", "--infra", "aws", "--spot",
                                 "--data", "s3://bkt/fineweb", "--bucket", "s3://bkt/runs", "--name", "g124",
                                 "--max-hours", "30", "--dry-run", "--export-yaml", str(out)])
    assert r.exit_code == 0, r.output
    text = out.read_text()
    assert text.startswith("# Generated by gpt2cloud. Launch with\n#   sky jobs launch THIS_FILE --secret")
    assert f"sky jobs launch {out}" in r.output and "sky launch" not in r.output.replace("sky jobs launch", "")
    cfg = yaml.safe_load(text)
    res = cfg["resources"]
    assert res["autostop"] == {"idle_minutes": 10, "down": True, "wait_for": "jobs"}
    # a stall, a hung setup or trainer start-up (model/deadman.py RECOVERABLE): transient faults of one node
    assert res["job_recovery"]["recover_on_exit_codes"] == [75, 80, 83]
    assert res["job_recovery"]["max_restarts_on_errors"] == 0
    assert cfg["envs"]["GPT2CLOUD_DEVICE"] == "cuda" and cfg["envs"]["GPT2CLOUD_GPUS_PER_NODE"] == "8"
    # the hard limit comes from config.json (max_hours), read on the node by model/config.py
    config = json.loads((Path(cfg["workdir"]) / "config.json").read_text())
    assert config["max_hours"] == 30 and "model.config hard-limit" in cfg["run"]
    assert "torch.cuda.device_count()" in cfg["setup"] and "timeout --kill-after" in cfg["run"]
    task = sky_mod.Task.from_yaml(str(out))  # SkyPilot's own schema accepts all of it
    (res,) = list(task.resources)
    assert res.autostop_config.down and res.job_recovery["recover_on_exit_codes"] == [75, 80, 83]
    on_demand = _plan(infra="lambda", max_hours=2.0)
    assert on_demand.train_cfg.max_hours == 2.0 and on_demand.train_cfg.device == "cuda"
    assert on_demand.train_cfg.stall_minutes >= 20 and "use_spot" not in on_demand.task_cfg["resources"]
    assert tasks.sky_command(on_demand.task_cfg).startswith("sky launch THIS_FILE")


@pytest.mark.parametrize("flag, value", [
    ("--max-cost", "nan"), ("--max-cost", "-1"), ("--max-cost", "inf"), ("--price", "nan"), ("--max-hours", "nan"),
    ("--max-hours", "0"), ("--push-every", "0"), ("--idle-minutes", "0"),
])
def test_money_inputs_must_be_finite_and_positive(sky_mod, env, flag, value):
    r = CliRunner().invoke(app, ["launch", "gpt2-124m", "--infra", "lambda", "--data", "s3://bkt/d",
                                 "--bucket", "s3://bkt/r", "--dry-run", flag, value])
    assert r.exit_code == 2 and r.output.startswith(f"error: {flag}") and r.output.count("\n") == 1, r.output


def test_credentials_that_expire_before_the_end_are_refused(sky_mod, env, monkeypatch):
    import datetime

    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-value")
    soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
    monkeypatch.setenv("AWS_CREDENTIAL_EXPIRATION", soon.isoformat())
    with pytest.raises(UserError, match=r"the S3 credentials expire in 1\.0 h .* long-lived keys"):
        _plan(infra="lambda")  # 124M on 8 H100s: ~1.5 h with margins
    later = soon + datetime.timedelta(hours=48)
    monkeypatch.setenv("AWS_CREDENTIAL_EXPIRATION", later.isoformat())
    assert _plan(infra="lambda").warnings == ()
    monkeypatch.delenv("AWS_CREDENTIAL_EXPIRATION")
    assert "expiry is unknown" in _plan(infra="lambda").warnings[0]


def test_prices_come_from_the_catalog_of_the_cloud(sky_mod, env):
    """The fixture's catalog: Lambda 8xH100 $23.92/h, AWS p5.48xlarge $98.32/h on demand and $40/h spot."""
    from gpt2cloud.launch.clouds import catalog_price

    lam = catalog_price("lambda", "H100", 8)
    assert (lam.usd_per_hour, lam.source) == (23.92 / 8, "SkyPilot catalog: Lambda gpu_8x_h100_sxm5 on-demand, us-east-1")
    assert (lam.cloud, lam.region, lam.instance, lam.per, lam.spot) == ("lambda", "us-east-1", "gpu_8x_h100_sxm5", "gpu", False)
    assert catalog_price("aws", "H100", 8).usd_per_hour == pytest.approx(98.32 / 8)
    spot = catalog_price("aws/us-west-2", "H100", 8, spot=True)
    assert (spot.usd_per_hour, spot.source) == (42.0 / 8, "SkyPilot catalog: AWS p5.48xlarge spot, us-west-2")
    assert catalog_price("lambda", "H100", 8, spot=True) is None  # Lambda has no spot
    # no region pinned: SkyPilot may land in any region, so the launch is estimated and capped at the dearest
    dearest = catalog_price("aws", "H100", 8, spot=True)
    assert dearest.usd_per_hour == 42.0 / 8 and dearest.region == "us-west-2"
    assert "the dearest of 2 regions (pin one: --infra CLOUD/REGION)" in dearest.source
    assert catalog_price("aws/us-east-1", "H100", 8, spot=True).usd_per_hour == 40.0 / 8
    aws = _plan(infra="aws", max_cost=300)
    assert aws.est.price_per_gpu_hour == pytest.approx(12.29) and aws.est.price_source.startswith("SkyPilot catalog: AWS")
    assert aws.train_cfg.price_per_gpu_hour == pytest.approx(12.29)  # the node's cap counts at AWS's price
    assert aws.spec.price_per_gpu_hour == pytest.approx(12.29)
    # any_of over Lambda and AWS: estimated and capped at the most expensive candidate
    anyof = _plan(max_cost=300)
    assert anyof.job.resources.clouds == ("aws", "lambda") and anyof.train_cfg.price_per_gpu_hour == pytest.approx(12.29)
    assert "most expensive of 2 any_of candidates" in anyof.est.price_source
    # ... and the node, once it knows its cloud, caps at that cloud's price: the candidates travel in the
    # spec and config.json (model/config.py price_here picks), never in an env
    assert anyof.train_cfg.cloud_prices == {"aws": pytest.approx(12.29), "lambda": pytest.approx(2.99)}
    assert anyof.spec.cloud_prices == anyof.train_cfg.cloud_prices
    assert aws.train_cfg.cloud_prices == {} and not [k for k in anyof.task_cfg["envs"] if "PRICE" in k]
    # --price still wins; the estimate command reads the same catalog
    assert _plan(infra="aws", price=3.0).est.price_per_gpu_hour == 3.0
    r = CliRunner().invoke(app, ["estimate", "gpt2-124m", "--infra", "aws", "--json"])
    d = json.loads(r.stdout)
    assert d["price_per_gpu_hour"] == pytest.approx(12.29) and d["price_source"].startswith("SkyPilot catalog")
    r = CliRunner().invoke(app, ["estimate", "gpt2-124m", "--compare", "--infra", "lambda,aws", "--json"])
    rows = json.loads(r.stdout)
    assert {(x["gpu_type"], x["gpus_per_node"], round(x["price_per_gpu_hour"], 2)) for x in rows} >= {
        ("H100", 8, 2.99), ("H100", 8, 12.29), ("A10", 1, 0.75)}
    fits = [x["all_in_cost_usd"] for x in rows if x["fits"]]
    assert fits == sorted(fits)


def test_the_all_in_estimate_counts_every_phase(sky_mod, env):
    p = _plan(infra="aws", spot=True)
    e = p.est
    assert set(e.breakdown_hours) == {"provisioning", "setup", "data", "compile", "training", "evals", "finish", "idle",
                                      "recovery"}
    assert sum(e.breakdown_hours.values()) == pytest.approx(e.all_in_hours, rel=1e-5)
    assert e.breakdown_hours["training"] == pytest.approx(e.wall_hours) and e.breakdown_hours["recovery"] > 0
    assert e.controller_usd > 0 and e.all_in_cost_usd == pytest.approx(
        e.all_in_hours * e.gpus * e.price_per_gpu_hour + e.controller_usd)
    assert all(e.phase_sources[k] for k in e.breakdown_hours)
    local = _plan(infra="local", gpus="CPU:2", recipe="gpt2-tiny", data="file:///tmp/d", bucket="file:///tmp/b").est
    assert local.breakdown_hours["provisioning"] == 0 and local.breakdown_hours["idle"] == 0
