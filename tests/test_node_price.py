"""The node's price and hard time limit, in Python (model/config.py): price_here, hard_limit_seconds and
the `python -m model.config` commands the node's run script calls."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from model.config import (HARD_LIMIT_GRACE_S, RESUME_MAY_CHANGE, TrainConfig, hard_limit_seconds, price_here,
                          resume_changes)
from trainer_helpers import REPO, write_config

ANY_OF = dict(price_per_gpu_hour=12.29, cloud_prices={"aws": 12.29, "gcp": 11.06, "lambda": 2.99})


def info(cloud) -> str:
    """SKYPILOT_CLUSTER_INFO as SkyPilot sets it on a node (the fields beside "cloud" do not matter)."""
    return json.dumps({"cluster_name": "gpt2-124m-a", "cloud": cloud, "region": "us-east-1", "num_nodes": 1})


def test_price_here_is_the_landed_clouds_price():
    cfg = TrainConfig(**ANY_OF)
    assert price_here(cfg, info("GCP")) == 11.06  # SkyPilot's names are capitalized; the prices' keys are not
    assert price_here(cfg, info("lambda")) == 2.99
    assert price_here(cfg, info("Lambda")) == 2.99


def test_price_here_falls_back_to_the_configs_conservative_price():
    cfg = TrainConfig(**ANY_OF)
    for cluster_info in (None, "", info("Azure"), info(None), "{not json", json.dumps(["aws"]), json.dumps({})):
        assert price_here(cfg, cluster_info) == 12.29, cluster_info
    one_cloud = TrainConfig(price_per_gpu_hour=3.0)  # not an any_of launch: cloud_prices is empty
    assert one_cloud.cloud_prices == {} and price_here(one_cloud, info("aws")) == 3.0
    assert price_here(TrainConfig(), info("aws")) == 0.0  # no price at all


def test_hard_limit_seconds():
    assert hard_limit_seconds(TrainConfig()) == 0  # no max_hours: no hard stop
    assert hard_limit_seconds(TrainConfig(max_hours=30.0)) == 30 * 3600 + HARD_LIMIT_GRACE_S == 108_600
    assert hard_limit_seconds(TrainConfig(max_hours=0.5)) == 1800 + 600
    assert hard_limit_seconds(TrainConfig(max_hours=1.0001)) == 3600 + 600  # whole seconds (3600.36 -> 3600)


def test_cloud_prices_travel_in_the_config_and_may_change_on_resume():
    cfg = TrainConfig(**ANY_OF)
    assert TrainConfig.from_dict(json.loads(cfg.to_json())).cloud_prices == ANY_OF["cloud_prices"]
    assert "cloud_prices" in RESUME_MAY_CHANGE
    older = json.loads(TrainConfig().to_json())
    del older["cloud_prices"]  # a checkpoint written before the field existed
    assert resume_changes(older, cfg) == []


def run_config_cli(*args, cluster_info=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SKYPILOT_CLUSTER_INFO"}
    if cluster_info is not None:
        env["SKYPILOT_CLUSTER_INFO"] = cluster_info
    return subprocess.run([sys.executable, "-m", "model.config", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("cluster_info, printed", [(info("AWS"), "12.29"), (info("GCP"), "11.06"),
                                                    (None, "12.29"), (info("azure"), "12.29")])
def test_cli_price_here(tmp_path, cluster_info, printed):
    config = write_config(tmp_path / "c.json", TrainConfig(**ANY_OF))
    p = run_config_cli("price-here", str(config), cluster_info=cluster_info)
    assert p.returncode == 0 and p.stdout == printed + "\n", p.stderr


def test_cli_price_here_prints_null_without_a_price_and_hard_limit_prints_seconds(tmp_path):
    config = write_config(tmp_path / "c.json", TrainConfig(max_hours=2.0))
    p = run_config_cli("price-here", str(config), cluster_info=info("aws"))
    assert p.returncode == 0 and p.stdout == "null\n", p.stderr  # JSON: the node's timeline line takes it as is
    p = run_config_cli("hard-limit", str(config))
    assert p.returncode == 0 and p.stdout == f"{2 * 3600 + HARD_LIMIT_GRACE_S}\n", p.stderr
    p = run_config_cli("hard-limit", str(write_config(tmp_path / "none.json", TrainConfig())))
    assert p.returncode == 0 and p.stdout == "0\n", p.stderr


def test_cli_refuses_a_bad_config_in_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"no_such_key": 1}))
    for path in (bad, tmp_path / "missing.json"):
        p = run_config_cli("price-here", str(path))
        assert p.returncode == 2 and p.stdout == ""
        assert p.stderr.startswith("error: config ") and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_the_config_cli_needs_no_torch():
    """The run script calls it before the trainer: it must start in a moment, with nothing but the stdlib."""
    p = subprocess.run([sys.executable, "-c", "import sys, model.config; print('torch' in sys.modules)"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "False", p.stderr


def test_node_up_is_the_hosts_boot_never_before_the_launch(tmp_path):
    """Billing starts at the host's boot (btime: a whole second, the same on every read, so two jobs on one
    node agree and count once), but never before the launch (a pod on a host up for weeks)."""
    from model.config import node_up

    stat = "cpu  1 2 3\nbtime 1796561162\nprocesses 9\n"
    assert node_up(TrainConfig(), stat) == 1796561162.0
    assert node_up(TrainConfig(launched_at=1796560000.5), stat) == 1796561162.0  # a VM booted after the launch
    assert node_up(TrainConfig(launched_at=1796599999.0), stat) == 1796599999.0  # a long-running host
    cfg = write_config(tmp_path / "c.json", TrainConfig(launched_at=1.0))
    runs = [subprocess.run([sys.executable, "-m", "model.config", "node-up", str(cfg)], cwd=REPO,
                           capture_output=True, text=True, timeout=60) for _ in range(2)]
    assert runs[0].returncode == 0 and runs[0].stdout == runs[1].stdout  # deterministic
    with open("/proc/stat") as f:
        btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    assert float(runs[0].stdout) == btime
