"""`--gpus H100:8,A100-80GB:8`: SkyPilot's candidate lists, estimated and capped at the dearest candidate.

The tasks are built for real and handed to SkyPilot's own parser and optimizer offline (the catalog fixture of
tests/sky_offline.py: Lambda H100:8 $23.92/h and A100-80GB:8 $14.32/h; AWS p5 $98.32/h and p4de $40.96/h).
"""

from __future__ import annotations

import json

import pytest
from owned_helpers import one_line_error
from sky_offline import sky_home, sky_mod  # noqa: F401  (fixtures)
from test_launch_tasks import _optimize, _plan, env  # noqa: F401  (fixtures and helpers)
from typer.testing import CliRunner

from gpt2cloud.backends.skypilot import to_sky_task
from gpt2cloud.cli import app
from gpt2cloud.cost.hardware import parse_gpu_candidates
from gpt2cloud.errors import UserError
from model.config import TrainConfig, price_here, resolve_gpu


def test_a_pinned_cloud_tries_the_candidates_in_the_users_order(sky_mod, env):
    p = _plan(infra="lambda", gpus="H100:8,A100-80GB:8")
    assert p.task_cfg["resources"]["accelerators"] == ["H100:8", "A100-80GB:8"]
    task = to_sky_task(p.task_cfg, p.secrets)
    assert isinstance(task.resources, list)  # SkyPilot's ordered candidates
    assert [r.accelerators for r in task.resources] == [{"H100": 8}, {"A100-80GB": 8}]
    assert _optimize(sky_mod, task).instance_type == "gpu_8x_h100_sxm5"  # the first that is offered


def test_any_of_over_clouds_takes_the_candidates_as_a_set(sky_mod, env):
    p = _plan(gpus="H100:8,A100-80GB:8")
    assert p.task_cfg["resources"]["accelerators"] == {"H100": 8, "A100-80GB": 8}
    assert p.task_cfg["resources"]["any_of"] == [{"infra": "aws"}, {"infra": "lambda"}]
    task = to_sky_task(p.task_cfg, p.secrets)
    assert {(str(r.cloud), *r.accelerators) for r in task.resources} == {
        ("AWS", "H100"), ("AWS", "A100-80GB"), ("Lambda", "H100"), ("Lambda", "A100-80GB")}
    assert _optimize(sky_mod, task).instance_type == "gpu_8x_a100_80gb_sxm4"  # SkyPilot picks the cheapest


def test_the_estimate_is_the_dearest_candidate_and_the_cap_the_dearest_rate(sky_mod, env):
    h100 = _plan(infra="lambda", gpus="H100:1", name="a")
    a10 = _plan(infra="lambda", gpus="A10:1", name="b")
    both = _plan(infra="lambda", gpus="H100:1,A10:1", name="c", max_cost=5000.0)
    assert a10.est.all_in_cost_usd > h100.est.all_in_cost_usd  # ~8x slower at 0.3x the price
    assert both.est.gpu_type == "A10" and both.est.all_in_cost_usd == pytest.approx(a10.est.all_in_cost_usd)
    # the cap counts the dearest rate per GPU-hour (H100's) until the node knows its GPU
    assert both.spec.price_per_gpu_hour == pytest.approx(2.49) == both.train_cfg.price_per_gpu_hour
    cands = both.train_cfg.gpu_candidates
    assert set(cands) == {"H100", "A10"}
    assert cands["A10"]["price_per_gpu_hour"] == pytest.approx(0.75)
    assert cands["H100"]["peak_flops_per_gpu"] == pytest.approx(989e12)
    assert both.train_cfg.peak_flops_per_gpu == 0.0  # no MFU against the wrong GPU's peak
    note = " ".join(both.warnings)
    assert "estimated at the dearest whole run, A10 " in note and "$2.49/GPU-hour" in note


def test_the_candidates_share_the_micro_batch_that_fits_on_each(sky_mod, env):
    both = _plan(infra="lambda", gpus="H100:1,A10:1")
    h100, a10 = (_plan(infra="lambda", gpus=g, name=g.split(":")[0].lower()) for g in ("H100:1", "A10:1"))
    assert h100.train_cfg.micro_batch > a10.train_cfg.micro_batch  # 80 GB against 24 GB
    assert both.train_cfg.micro_batch == a10.train_cfg.micro_batch == both.est.micro_batch


def test_the_node_takes_the_figures_of_the_gpu_it_has():
    cfg = TrainConfig(price_per_gpu_hour=3.0, gpu_candidates={
        "H100": {"peak_flops_per_gpu": 989e12, "price_per_gpu_hour": 3.0, "cloud_prices": {"aws": 3.0, "lambda": 2.99}},
        "A100-80GB": {"peak_flops_per_gpu": 312e12, "price_per_gpu_hour": 1.79, "cloud_prices": {}}})
    resolve_gpu(cfg, "NVIDIA A100-SXM4-80GB")
    assert (cfg.gpu, cfg.peak_flops_per_gpu, cfg.price_per_gpu_hour) == ("A100-80GB", 312e12, 1.79)
    cfg2 = TrainConfig(price_per_gpu_hour=3.0, gpu_candidates=dict(cfg.gpu_candidates))
    resolve_gpu(cfg2, "NVIDIA H100 80GB HBM3")
    assert cfg2.gpu == "H100" and price_here(cfg2, json.dumps({"cloud": "Lambda"})) == 2.99
    unknown = TrainConfig(price_per_gpu_hour=3.0, gpu_candidates=dict(cfg.gpu_candidates))
    resolve_gpu(unknown, "NVIDIA L4")  # none matches: the launch's dearest rate, no MFU
    assert (unknown.gpu, unknown.price_per_gpu_hour, unknown.peak_flops_per_gpu) == ("", 3.0, 0.0)


@pytest.mark.parametrize("gpus, message", [
    ("H100:8,A100-80GB:4", "every candidate needs the same GPU count per node"),
    ("H100:8,H100:8", "listed twice"),
    ("H100:8,", "an empty candidate"),
    ("H100:8,B999:8", "unknown GPU 'B999'"),
])
def test_a_bad_candidate_list_is_one_line(gpus, message):
    with pytest.raises(UserError, match=message):
        parse_gpu_candidates(gpus)


def test_candidates_a_cloud_cannot_run_are_refused_before_anything_starts(sky_mod, env):
    with pytest.raises(UserError, match="aws does not offer A10:8"):
        _plan(infra="aws", gpus="H100:8,A10:8")
    with pytest.raises(UserError, match="a candidate list is for a cloud launch"):
        _plan(infra="local", gpus="H100:2,A100-80GB:2", recipe="gpt2-tiny", data="file:///tmp/d",
              bucket="file:///tmp/b")
    r = CliRunner().invoke(app, ["launch", "gpt2-124m", "--gpus", "H100:8,A100-80GB:4", "--infra", "lambda",
                                 "--data", "s3://bkt/d", "--bucket", "s3://bkt/r", "--dry-run"])
    one_line_error(r, "same GPU count")


def test_the_trainer_reads_its_gpu_before_it_prices_its_cloud(tmp_path, monkeypatch):
    """model/startup.py load_config: the candidate this node's CUDA device is, then its cloud's price."""
    import argparse

    import torch

    from model import startup

    cfg = TrainConfig(price_per_gpu_hour=12.29, gpu_candidates={
        "H100": {"peak_flops_per_gpu": 989e12, "price_per_gpu_hour": 12.29, "cloud_prices": {"aws": 12.29, "lambda": 2.99}},
        "A100-80GB": {"peak_flops_per_gpu": 312e12, "price_per_gpu_hour": 5.12, "cloud_prices": {"aws": 5.12, "lambda": 1.79}}})
    path = tmp_path / "config.json"
    path.write_text(cfg.to_json())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setenv("SKYPILOT_CLUSTER_INFO", json.dumps({"cloud": "Lambda"}))
    loaded = startup.load_config(argparse.Namespace(config=str(path), schedule_steps=None, steps=None))
    assert (loaded.gpu, loaded.price_per_gpu_hour, loaded.peak_flops_per_gpu) == ("A100-80GB", 1.79, 312e12)


# ---- a finished run over GPU candidates whose node had the cheaper one (A100-80GB of H100:8,A100-80GB:8)


def _candidate_run(tmp_path, nodes: int = 1, node_price: float | None = 1.79, gpu: str = "A100-80GB"):
    """(record, RunData) of a finished run launched at the dearest candidate's price (H100 $12.29) whose node
    found an A100-80GB (the trainer's config: its $5.12) and came up on a cloud billing `node_price`."""
    import dataclasses

    from run_helpers import local_record

    from gpt2cloud.cost.estimate import estimate
    from gpt2cloud.cost.recipes import load_recipe
    from gpt2cloud.runs.rundata import read_metrics

    r = load_recipe("gpt2-124m")
    est = estimate(r, "H100", 8, nodes=nodes, price=12.29, steps=40, side_by_side=False)
    rec = local_record(tmp_path, "cand", kind="cluster", infra="aws", gpu_type="H100", gpus_per_node=8, nodes=nodes,
                       price_per_gpu_hour=12.29, total_steps=40, estimate=est)
    cfg = dataclasses.asdict(r.to_train_config(steps=40, micro_batch=est.micro_batch, peak_flops_per_gpu=312e12,
                                               price_per_gpu_hour=5.12 if gpu else 12.29))
    cfg["gpu"] = gpu
    step = 4 * est.compute_seconds  # an A100's step: slower than the H100 estimate, a plausible MFU on an A100
    lines = [{"event": "start", "time": 1010.0, "world_size": 8 * nodes, "config": cfg, "device": "cuda"}]
    lines += [{"step": s, "time": 1010.0 + s * step, "loss": 3.5, "step_seconds": step,
               "tokens_per_second": cfg["tokens_per_step"] / step, "tokens_seen": s * cfg["tokens_per_step"]}
              for s in range(1, 41)]
    lines.append({"event": "end", "step": 40, "time": 1011.0 + 40 * step})
    timeline = [{"event": "node_up", "time": 1000.0, **({"price_per_gpu_hour": node_price} if node_price else {})},
                {"event": "setup", "start": 1000.0, "time": 1005.0}]
    bucket = tmp_path / "bucket" / "cand"
    for d in (tmp_path / "out", bucket):
        d.mkdir(parents=True, exist_ok=True)
        (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        (d / "timeline.jsonl").write_text("".join(json.dumps(x) + "\n" for x in timeline))
    return rec, read_metrics(tmp_path / "out", record=rec)


def test_a_candidate_runs_dollars_are_at_the_price_its_node_reported(tmp_path):
    from gpt2cloud.runs.rundata import price_of
    from gpt2cloud.runs.status import run_status

    rec, data = _candidate_run(tmp_path)
    assert data.spec.price_per_gpu_hour == 12.29 and data.gpu_type == "A100-80GB"
    assert price_of(data.spec, data.metrics) == data.price_per_gpu_hour == 1.79  # its node's, not the dearest
    assert data.cost_usd == pytest.approx(data.wall_seconds / 3600 * 8 * 1.79)
    assert run_status(rec)["price_per_gpu_hour"] == 1.79
    _, no_node_price = _candidate_run(tmp_path, node_price=None)
    assert no_node_price.price_per_gpu_hour == 5.12  # the trainer's, for the GPU it found
    _, no_gpu = _candidate_run(tmp_path, node_price=None, gpu="")
    assert no_gpu.price_per_gpu_hour == 12.29  # neither: the launch's


def test_a_candidate_run_calibrates_the_gpu_it_had_and_no_network_of_another(tmp_path):
    from gpt2cloud.home import user_calibration_path
    from gpt2cloud.runs.calibrate import record_calibration, record_phases

    _, data = _candidate_run(tmp_path, nodes=2)
    points, _ = record_phases(data)
    assert points and {p["gpu"] for p in points} == {"A100-80GB"}
    point, message = record_calibration(data)  # the estimate's network is of the H100 candidate's instance
    assert point is None and "network not recorded: the nodes had A100-80GB, not H100" in message, message
    assert not any(json.loads(line).get("kind") == "network" for line in user_calibration_path().read_text().splitlines())
