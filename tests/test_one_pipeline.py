"""One launch pipeline (issue 21): a training run and the prepare VM are both a Job, built into a task by
one builder, with one URL check, one storage path and one price resolved once; money travels launch ->
RunSpec -> config.json and nowhere else; docs/layout.md's "Where a change goes" names real files.

Offline: SkyPilot's catalog is the CSV fixture of tests/sky_offline.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from sky_offline import enable, sky_home, sky_mod  # noqa: F401  (fixtures)

from gpt2cloud.cost import prices
from gpt2cloud.cost.prices import Price
from gpt2cloud.errors import UserError
from gpt2cloud.launch import clouds, prepare_job, task
from gpt2cloud.launch.plan import plan

REPO = Path(__file__).resolve().parents[1]
KEY_ID, SECRET = "AKIAONEPIPELINE00001", "one-pipeline-not-a-real-secret-0123456789"


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path / "g2"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    for k in ("AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_PROFILE", "HF_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    return tmp_path


def _train(**kw):
    args = dict(recipe="gpt2-124m", gpus="H100:8", data="s3://bkt/fineweb", bucket="s3://bkt/runs", name="g124")
    return plan(**{**args, **kw})


def test_a_training_run_and_the_prepare_vm_are_one_job_shape(sky_mod, env):
    train = _train(infra="aws")
    prep = prepare_job.plan_job("owner/set:sample-10BT", "s3://bkt/shards", infra="aws", cpus=8)
    for job in (train.job, prep.job):
        assert isinstance(job, task.Job) and isinstance(job.price, Price)
        cfg = task.build_config(job)  # the one builder: the same keys, secrets named and empty
        assert set(cfg) == {"name", "workdir", "num_nodes", "resources", "envs", "setup", "run", "secrets"}
        assert cfg["secrets"] == {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}
        assert cfg["resources"]["autostop"]["down"] and cfg["resources"]["infra"] == "aws"
        assert SECRET not in json.dumps(cfg) and SECRET not in task.to_yaml(cfg)
    assert train.task_cfg["resources"]["accelerators"] == "H100:8" and train.job.price.per == prices.GPU
    assert prep.task_cfg["resources"]["cpus"] == "8+" and "accelerators" not in prep.task_cfg["resources"]
    assert prep.job.price.per == prices.VM and prep.spec.price_per_gpu_hour == prep.job.price.usd_per_hour / 8
    assert prep.est.usd_per_hour == prep.job.price.usd_per_hour  # the estimate made from that one price


def test_one_url_check_for_every_launch(sky_mod, env, monkeypatch):
    """The same check refuses a file:// path a cloud machine cannot reach, for --data, --bucket and --out."""
    with pytest.raises(UserError, match="a cloud node cannot reach a file:// path"):
        _train(infra="aws", bucket="file:///tmp/runs")
    with pytest.raises(UserError, match="a cloud VM cannot reach a file:// path"):
        prepare_job.plan_job("owner/set:cfg", "file:///tmp/shards", infra="aws", cpus=8)
    with pytest.raises(UserError, match="read-only"):
        prepare_job.plan_job("owner/set:cfg", "hf://org/repo", infra="aws", cpus=8)
    # one storage path: an S3 endpoint on this machine's loopback is refused for a cloud VM too
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    with pytest.raises(UserError, match="loopback"):
        prepare_job.plan_job("owner/set:cfg", "s3://bkt/shards", infra="aws", cpus=8)
    with pytest.raises(UserError, match="loopback"):
        _train(infra="aws")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("HF_ENDPOINT", "http://localhost:8080")  # a mirror on this machine: not for a cloud VM
    with pytest.raises(UserError, match="HF_ENDPOINT http://localhost:8080 is on this machine's loopback"):
        prepare_job.plan_job("owner/set:cfg", "s3://bkt/shards", infra="aws", cpus=8)


def test_the_price_is_resolved_once_per_launch(sky_mod, env, monkeypatch):
    calls = []
    real = clouds.catalog_price

    def counted(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(clouds, "catalog_price", counted)
    p = _train(infra="aws", max_cost=300)
    assert len(calls) == 1  # one catalog lookup, used by the estimate, the spec and the trainer's cap
    assert p.est.price_per_gpu_hour == p.spec.price_per_gpu_hour == p.train_cfg.price_per_gpu_hour
    assert p.job.price.cloud == "aws" and p.job.price.instance == "p5.48xlarge"
    calls.clear()
    anyof = _train(max_cost=300)  # any_of over the fixture's AWS and Lambda: one lookup each
    assert len(calls) == 2 and dict(anyof.job.price.candidates) == anyof.spec.cloud_prices


def test_money_travels_in_the_spec_and_config_never_in_envs(sky_mod, env):
    p = _train(max_cost=300, max_hours=5.0)  # any_of: the candidates' prices too
    config = json.loads(p.job.config_json)
    for key in ("max_cost_usd", "price_per_gpu_hour", "max_hours", "cloud_prices"):
        assert config[key] == getattr(p.spec, key), key
    assert config["cloud_prices"] == {"aws": pytest.approx(12.29), "lambda": pytest.approx(2.99)}
    # the budget stop keeps room for what bills after it: the trainer's exit and final push, then the idle
    # minutes before autostop (the estimate's finish and idle phases)
    hours = p.est.breakdown_hours
    assert config["after_stop_seconds"] == pytest.approx((hours["finish"] + hours["idle"]) * 3600, abs=0.1)
    assert config["after_stop_seconds"] >= 10 * 60  # --idle-minutes 10
    envs = p.task_cfg["envs"]
    assert not [k for k in envs if re.search("PRICE|COST|MAX_SECONDS|MAX_HOURS", k)], envs
    run = p.task_cfg["run"]
    assert "model.config price-here" in run and "model.config hard-limit" in run
    assert "GPT2CLOUD_PRICE_PER_GPU_HOUR" not in run and "GPT2CLOUD_CLOUD_PRICES" not in run


def test_most_expensive_candidate_and_the_table_fallback():
    a = Price(2.0, "A", cloud="lambda")
    b = Price(12.0, "B", cloud="aws")
    top = prices.most_expensive([a, b])
    assert top.usd_per_hour == 12.0 and top.candidates == (("aws", 12.0), ("lambda", 2.0))
    assert top.source.startswith("the most expensive of 2 any_of candidates: B")
    assert prices.most_expensive([a]) is a and prices.most_expensive([]) is None
    assert prices.table_price("H100").source.startswith("table fallback: ")
    assert prices.table_price("NOPE") is None
    vm = prices.cpu_vm_fallback(32)
    assert vm.per == prices.VM and vm.usd_per_hour == pytest.approx(32 * prices.FALLBACK_USD_PER_CPU_HOUR)
    assert vm.per_gpu(32) == pytest.approx(prices.FALLBACK_USD_PER_CPU_HOUR)


def test_one_micro_batch_rule_for_estimate_launch_and_train():
    """The estimate, the launch (through the estimate) and `train` choose the micro-batch by one function."""
    from gpt2cloud.cost.estimate import choose_micro_batch, estimate, memory_per_gpu
    from gpt2cloud.cost.recipes import load_recipe

    r = load_recipe("gpt2-124m")
    cfg = r.to_train_config()
    fitted, note = choose_micro_batch(cfg, 8, 24.0, "A10G")  # small memory: memory-aware, and says so
    assert fitted.micro_batch < cfg.micro_batch and "fits in A10G memory" in note
    assert memory_per_gpu(cfg.model, fitted.micro_batch, cfg.optimizer).total_gib <= 24.0
    assert cfg.tokens_per_step % (fitted.micro_batch * cfg.model.block_size * 8) == 0
    e = estimate(r, gpu_type="A10G", gpus_per_node=8)
    assert e.micro_batch == fitted.micro_batch and e.micro_batch_note == note
    same, quiet = choose_micro_batch(cfg, 8, None)  # memory unknown (CPU ranks): divisibility only
    assert same is cfg and quiet == ""


def test_the_change_table_names_files_that_exist():
    """docs/layout.md "Where a change goes": every path it names exists, except the new module a change adds
    (marked "(new)"), and no row names more than 3 files."""
    text = (REPO / "docs" / "layout.md").read_text()
    table = text.split("## Where a change goes", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| change")
            and not set(line) <= set("|- ")]
    assert len(rows) >= 5
    for row in rows:
        change, files = row.split("|")[1:3]
        paths = re.findall(r"`([\w./-]+\.(?:py|yaml|toml))`( \(new\))?", files)
        assert 1 <= len(paths) <= 3, row
        for path, new in paths:
            assert new or (REPO / path).is_file(), f"{change.strip()}: {path}"


def test_a_budget_that_cannot_pay_for_start_up_and_teardown_is_refused(sky_mod, env):
    """8 x p5 at $12.29/GPU-hour: ~20 min of provisioning, setup, compile, final push and idle minutes cost
    ~$32 before a single step; a $30 cap would bill that and stop at step 0."""
    with pytest.raises(UserError, match=r"--max-cost 30: this launch bills ~\$3\d\.\d\d outside its training loop"):
        _train(infra="aws", max_cost=30)
    assert _train(infra="aws", max_cost=300).train_cfg.max_cost_usd == 300
