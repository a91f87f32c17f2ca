"""The step's gradient all-reduce between nodes (gpt2cloud/cost/network.py): its cost in the estimate, the
interconnect table, --interconnect-gbps, --compare-nodes, and a multi-node run's calibration."""

import dataclasses
import json

import pytest
from owned_helpers import one_line_error
from sky_offline import sky_home, sky_mod  # noqa: F401  (fixtures)
from typer.testing import CliRunner

from gpt2cloud.cli import app
from gpt2cloud.cost.estimate import compare_nodes, estimate
from gpt2cloud.cost.hardware import default_mfu, gpu_spec, table
from gpt2cloud.cost.network import comm_from_exposed, exposed_seconds, interconnect_for, ring_seconds
from gpt2cloud.cost.prices import Price
from gpt2cloud.cost.recipes import known_recipes, load_recipe
from gpt2cloud.home import user_calibration_path
from gpt2cloud.runs import registry
from gpt2cloud.runs.calibrate import record_calibration
from gpt2cloud.runs.rundata import read_metrics

runner = CliRunner()
P5 = Price(98.32 / 8, "SkyPilot catalog: AWS p5.48xlarge on-demand, us-east-1", cloud="aws", region="us-east-1",
           instance="p5.48xlarge")


def _json(*args):
    res = runner.invoke(app, ["estimate", *args, "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def test_two_nodes_are_priced_below_twice_one_node_and_json_names_the_assumption():
    one = _json("gpt2-124m", "--gpus", "H100:8")
    two = _json("gpt2-124m", "--gpus", "H100:8", "--nodes", "2")
    assert one["step_seconds"] == pytest.approx(0.140, rel=0.01)  # one node: the calibrated step, as before
    assert one["comm_seconds"] == 0 and one["scaling_efficiency"] == 1
    assert 0 < one["intra_node_comm_seconds"] < 0.01  # NVLink: shown, inside the calibrated MFU
    assert two["tokens_per_second"] < 2 * one["tokens_per_second"]
    assert two["step_seconds"] == pytest.approx(two["compute_seconds"] + two["comm_exposed_seconds"])
    assert two["comm_exposed_seconds"] > 0 and 0 < two["comm_overlap"] < 1 and 0 < two["scaling_efficiency"] < 1
    # the table price names no cloud: the conservative default, and the fp32 gradients of the padded model
    assert two["interconnect_gbps"] == table("interconnects")["default"]["gbps"]
    assert "conservative default" in two["interconnect_source"]
    assert two["link_efficiency"] == 0.8 and "assumed" in two["link_efficiency_source"]
    assert two["gradient_bytes"] == 4 * load_recipe("gpt2-124m").model.config().param_count(padded=True)


def test_a_faster_interconnect_scales_better():
    r = load_recipe("gpt2-1558m")
    eff = [estimate(r, "H100", 8, nodes=2, price=3.0, interconnect_gbps=g, side_by_side=False).scaling_efficiency
           for g in (100, 400, 3200)]
    assert eff[0] < eff[1] < eff[2] < 1
    assert eff[2] > 0.95  # EFA-class: the backward hides nearly all of it


def test_the_table_row_follows_the_price_and_the_flag_overrides_it():
    r = load_recipe("gpt2-124m")
    on_p5 = estimate(r, "H100", 8, nodes=2, price=P5, side_by_side=False)
    assert on_p5.interconnect_gbps == 3200 and "EFA" in on_p5.interconnect_source
    assert on_p5.interconnect_key == "aws p5.48xlarge"
    given = estimate(r, "H100", 8, nodes=2, price=P5, interconnect_gbps=200, side_by_side=False)
    assert given.interconnect_gbps == 200 and given.interconnect_source == "--interconnect-gbps"
    assert given.scaling_efficiency < on_p5.scaling_efficiency
    assert _json("gpt2-124m", "--nodes", "2", "--interconnect-gbps", "3200")["interconnect_gbps"] == 3200
    # an any_of launch may land on any of its clouds: the conservative default, whatever the dearest one has
    any_of = dataclasses.replace(P5, candidates=(("aws", 12.29), ("lambda", 2.99)))
    assert interconnect_for(any_of, "H100").gbps == table("interconnects")["default"]["gbps"]


@pytest.mark.parametrize("args, needle", [
    (["--interconnect-gbps", "0"], "greater than 0"),
    (["--interconnect-gbps", "-100"], "greater than 0"),
    (["--interconnect-gbps", "nan"], "finite number"),
    (["--interconnect-gbps", "inf"], "finite number"),
    (["--compare-nodes", "0,2"], "1 to 1024"),
    (["--compare-nodes", "1,two"], "1 to 1024"),
    (["--compare-nodes", "1,2", "--compare"], "pick one"),
])
def test_bad_network_options_are_one_line_and_exit_2(args, needle):
    one_line_error(runner.invoke(app, ["estimate", "gpt2-124m", "--nodes", "2", *args]), needle)


def test_every_interconnect_row_names_its_source_and_the_default_is_the_slowest():
    t = table("interconnects")
    rows = t["offerings"]
    assert rows and all(r["source"] and r["as_of"] and r["fabric"] and r["gbps"] > 0 for r in rows)
    assert t["default"]["source"] and t["default"]["gbps"] <= min(r["gbps"] for r in rows)
    assert t["link_efficiency"]["source"] and 0 < t["link_efficiency"]["value"] <= 1
    assert all(v["source"] and v["gbytes_per_s"] > 0 for v in t["intra_node"].values())
    assert t["network_tier_clouds"] and set(t["network_tier_clouds"]) <= {r["cloud"] for r in rows}
    for row in rows:  # every row can match, and each listed instance type is found by the lookup (cloud +
        # instance, as the catalog spells it): with the fabric, the row's figure; a row whose fabric needs
        # network_tier: best where the launch never asks for it, the default
        assert row["instances"] or row.get("gpus"), row
        assert row.get("network_tier") in (None, "best"), row
        asked = row.get("network_tier") is None or row["cloud"] in t["network_tier_clouds"]
        for instance in row["instances"]:
            price = Price(1.0, "catalog", cloud=row["cloud"], instance=instance.replace("*", "x"))
            net = interconnect_for(price, "H100")
            assert net.gbps == (row["gbps"] if asked else t["default"]["gbps"]), instance
            assert net.source.startswith(row["fabric"]) == asked, net.source
        for gpu in row.get("gpus", ()):
            assert interconnect_for(None, gpu).gbps == (row["gbps"] if asked else t["default"]["gbps"]), gpu
    assert interconnect_for(Price(1.0, "catalog", cloud="aws", instance="g4dn.xlarge"), "T4").gbps == \
        t["default"]["gbps"]


def test_a_fabric_the_launch_never_asks_for_is_not_counted():
    """GCP's a3 fabrics need network_tier: best, which a launch asks for only on AWS (gpt2cloud/launch/task.py
    reads the same list), and never beside a cloud machine image: those estimates get the default, and say so."""
    t = table("interconnects")
    a3 = Price(1.0, "catalog", cloud="gcp", instance="a3-highgpu-8g")
    net = interconnect_for(a3, "H100")
    assert net.gbps == t["default"]["gbps"] and net.key == "gcp a3-highgpu-8g without network_tier"
    assert "not GPUDirect-TCPX" in net.source and "network_tier: best on gcp" in net.source
    assert interconnect_for(None, "H100-MEGA").gbps == t["default"]["gbps"]  # GCP's A3 Mega: no tier either
    e = estimate(load_recipe("gpt2-124m"), "H100", 8, nodes=2, price=P5, image="ami-0abc", side_by_side=False)
    assert e.interconnect_gbps == t["default"]["gbps"] and "beside a cloud machine image" in e.interconnect_source
    assert e.interconnect_key == "aws p5.48xlarge without network_tier"  # its measured network is not EFA's
    with_docker = estimate(load_recipe("gpt2-124m"), "H100", 8, nodes=2, price=P5, image="docker:x/y",
                           side_by_side=False)
    assert with_docker.interconnect_gbps == 3200 and with_docker.interconnect_key == "aws p5.48xlarge"


def test_a_launch_is_estimated_on_the_network_it_asks_for(sky_mod, tmp_path, monkeypatch):
    """The launch's own estimate and its task agree: EFA with network_tier: best; the default without it."""
    from gpt2cloud.launch.plan import plan

    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path / "g2"))
    for image, gbps in (("", 3200), ("docker:x/y", 3200), ("ami-0abc", table("interconnects")["default"]["gbps"])):
        p = plan(recipe="gpt2-124m", gpus="H100:8", infra="aws", nodes=2, data="s3://bkt/d", bucket="s3://bkt/r",
                 name="net-img", image=image)
        assert p.job.estimate.interconnect_gbps == gbps, image
        assert ("network_tier" in p.task_cfg["resources"]) == (gbps == 3200), image


def test_the_overlap_model_and_its_inverse():
    assert ring_seconds(8e9, 16, 1e9) == pytest.approx(2 * 15 / 16 * 8)
    assert ring_seconds(8e9, 1, 1e9) == 0
    assert exposed_seconds(1.0, 0.9, 10.0) == pytest.approx(0.1)  # the embeddings' share never hides
    assert exposed_seconds(1.0, 0.9, 0.2) == pytest.approx(0.8)  # the backward ends first
    for comm in (0.05, 0.5, 2.0):
        for window in (0.01, 0.3):
            assert comm_from_exposed(exposed_seconds(comm, 0.7, window), 0.7, window) == pytest.approx(comm)


def test_compare_nodes_shows_where_another_node_stops_paying():
    rows = compare_nodes(load_recipe("gpt2-124m"), [4, 1, 2, 2], gpu_type="H100", gpus_per_node=8, price=3.0)
    assert [e.nodes for e in rows] == [1, 2, 4]
    assert rows[0].tokens_per_second < rows[1].tokens_per_second < rows[2].tokens_per_second
    assert rows[0].scaling_efficiency > rows[1].scaling_efficiency > rows[2].scaling_efficiency
    d = json.loads(runner.invoke(app, ["estimate", "gpt2-124m", "--compare-nodes", "1,2,4", "--json"]).output)
    assert [r["nodes"] for r in d] == [1, 2, 4] and all("scaling_efficiency" in r for r in d)
    res = runner.invoke(app, ["estimate", "gpt2-1558m", "--compare-nodes", "1,2", "--interconnect-gbps", "3200"])
    assert res.exit_code == 0, res.output
    assert "3,200 Gb/s between nodes" in res.output and "$ per all-in hour saved" in res.output
    line = next(x for x in res.output.splitlines() if x.strip("│ ").startswith("2 "))
    assert "16" in line and "100%" in line  # 2 nodes, 16 GPUs, ~all of one node's step kept at 3.2 Tb/s


def test_published_calibration_points_reproduce_their_mfu_per_step_where_known():
    """Each point's MFU recomputed from the figures it names (6N + 12*L*d*T, dense bf16 peak)."""
    by_params = {load_recipe(n).model.config().param_count(): load_recipe(n).model.config() for n in known_recipes()}
    for p in table("calibration")["points"]:
        assert p["basis"] in ("per-step", "wall-clock") and p["source"], p
        if "step_seconds" in p:
            tokens_per_second = p["tokens_per_step"] / p["step_seconds"]
        elif "wall_hours" in p:
            tokens_per_second = p["tokens"] / (p["wall_hours"] * 3600)
        else:
            tokens_per_second = p["tokens_per_second"]
        mfu = tokens_per_second * by_params[p["params"]].flops_per_token() / (p["gpus"] * gpu_spec(p["gpu"]).peak_bf16_tflops * 1e12)
        assert mfu == pytest.approx(p["mfu"], rel=0.01), p["source"]
    h100 = [p for p in table("calibration")["points"] if p["gpu"] == "H100"]
    assert all(p["basis"] == "per-step" for p in h100)  # llm.c's logs give the step time: never the wall clock


def _multi_node_run(tmp_path, extra: float):
    """A finished 2 x H100:8 run on p5 (launch estimate recorded) whose steady steps took `extra` seconds
    longer than the calibrated compute."""
    r = load_recipe("gpt2-124m")
    est = estimate(r, "H100", 8, nodes=2, price=P5, steps=100, side_by_side=False)
    measured_step = est.compute_seconds + extra
    spec = registry.RunSpec(
        run_id="two-nodes", kind="cluster", infra="aws", run_url="s3://b/two-nodes", bucket="s3://b",
        data_url="s3://b/data", recipe="gpt2-124m", gpu_type="H100", gpus_per_node=8, nodes=2, spot=False,
        price_per_gpu_hour=P5.usd_per_hour, total_steps=100, estimate=est)
    cfg = r.to_train_config(steps=100, micro_batch=est.micro_batch, peak_flops_per_gpu=989e12)
    lines = [{"event": "start", "world_size": 16, "config": dataclasses.asdict(cfg), "device": "cuda"}]
    for s in range(1, 101):
        lines.append({"step": s, "loss": 3.5, "step_seconds": measured_step,
                      "tokens_per_second": cfg.tokens_per_step / measured_step, "tokens_seen": s * cfg.tokens_per_step})
    lines.append({"event": "end", "step": 100})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return read_metrics(tmp_path, spec=spec), est


def test_a_multi_node_run_calibrates_the_network_not_the_mfu(tmp_path):
    before = default_mfu("H100", 124_439_808)
    data, est = _multi_node_run(tmp_path, 0.030)  # 30 ms per step beyond the compute: the exposed all-reduce
    point, message = record_calibration(data)
    assert point["kind"] == "network" and "mfu" not in point, message
    assert (point["nodes"], point["interconnect"], point["interconnect_gbps"]) == (2, "aws p5.48xlarge", 3200)
    assert 0 < point["link_efficiency"] < 0.8 and "link efficiency" in message
    assert default_mfu("H100", 124_439_808) == before  # single-node estimates keep the single-node MFU
    again = estimate(load_recipe("gpt2-124m"), "H100", 8, nodes=2, price=P5, steps=100, side_by_side=False)
    assert again.link_efficiency == pytest.approx(point["link_efficiency"])
    assert "your multi-node runs" in again.link_efficiency_source
    assert again.step_seconds == pytest.approx(est.compute_seconds + 0.030, rel=5e-3)  # the run (point rounded)
    assert record_calibration(data)[0] is None  # once per run
    assert len(user_calibration_path().read_text().splitlines()) == 1


def test_an_mfu_point_from_several_nodes_is_never_single_node_mfu(tmp_path):
    before = default_mfu("H100", 124_439_808)
    user_calibration_path().parent.mkdir(parents=True, exist_ok=True)
    user_calibration_path().write_text(json.dumps({"gpu": "H100", "params": 124_439_808, "mfu": 0.2, "nodes": 4,
                                                   "kind": "measured", "source": "x", "date": "2026"}) + "\n")
    assert default_mfu("H100", 124_439_808) == before
