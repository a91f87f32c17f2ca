"""`gpt2cloud plot` / `report` and calibration feedback, on OUT dirs and registry entries the tests write."""

import dataclasses
import json
import math
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpt2cloud.runs import registry
from gpt2cloud.runs.calibrate import measured_mfu, record_calibration
from gpt2cloud.cli import app
from gpt2cloud.cost.estimate import estimate
from gpt2cloud.cost.hardware import default_mfu
from gpt2cloud.home import user_calibration_path
from gpt2cloud.runs.plot import title_lines
from gpt2cloud.cost.recipes import load_recipe
from gpt2cloud.runs.report import error_percent
from gpt2cloud.runs.rundata import load_run, read_metrics, run_estimate

runner = CliRunner()
STEPS, TOKENS_PER_STEP, WORLD = 100, 524288, 8
STEADY_TOK_S = 3.0e6  # after 5 slow warm-up steps at 0.3e6
PRICE = 2.5


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)  # `gpt2cloud fetch RUN` puts a run's OUT in ./runs/RUN
    return tmp_path / "home"


def write_metrics(out_dir, steps=STEPS, finished=True, peak=989e12, price=PRICE, device="cuda", hellaswag=True):
    """A gpt2-124m run's metrics.jsonl as model/train.py writes it (see gpt2cloud/rundata.py)."""
    cfg = load_recipe("gpt2-124m").to_train_config(steps=STEPS, peak_flops_per_gpu=peak, price_per_gpu_hour=price)
    lines = [{"event": "start", "world_size": WORLD, "config": dataclasses.asdict(cfg), "device": device}]
    elapsed = 0.0
    for s in range(1, steps + 1):
        tok_s = 0.3e6 if s <= 5 else STEADY_TOK_S
        dt = TOKENS_PER_STEP / tok_s
        elapsed += dt
        row = {"step": s, "loss": 3.3 + 7.6 * math.exp(-s / 15), "lr": 6e-4, "grad_norm": 1.0, "step_seconds": dt,
               "tokens_per_second": tok_s, "mfu": 0.3, "tokens_seen": s * TOKENS_PER_STEP, "elapsed_seconds": elapsed}
        if price:
            row["cost_usd"] = elapsed / 3600 * WORLD * price
        lines.append(row)
        if s % 20 == 0:
            lines.append({"step": s, "val_loss": 3.4 + 7.6 * math.exp(-s / 15)})
            lines.append({"step": s, "sample": f"Hello, I'm a language model, text at step {s}\nsecond line"})
        if hellaswag and s % 50 == 0:
            lines.append({"step": s, "hellaswag_acc_norm": 0.25 + s / 10000})
    if finished:
        lines.append({"event": "end", "step": steps, "final_loss": lines[-1].get("loss")})
    out_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in lines)
    (out_dir / "metrics.jsonl").write_text(text + '{"step": 101, "loss": 3.')  # a torn last line of a live run
    return elapsed


def make_spec(run_id, kind="cluster", gpu="H100", price=PRICE):
    est = estimate(load_recipe("gpt2-124m"), gpu_type=gpu, gpus_per_node=WORLD, price=price, steps=STEPS)
    return registry.RunSpec(
        run_id=run_id, kind=kind, infra="lambda", run_url=f"s3://b/{run_id}", bucket="s3://b", data_url="s3://b/data",
        recipe="gpt2-124m", gpu_type=gpu, gpus_per_node=WORLD, nodes=1, spot=False, price_per_gpu_hour=price,
        total_steps=STEPS, estimate=est)


def save_record(run_id, kind="cluster", gpu="H100"):
    spec = make_spec(run_id, kind, gpu)
    record = registry.RunRecord(spec=spec, started_at=time.time())
    registry.save(record)
    return record, spec.estimate


def fetched(run_id):
    """Where `gpt2cloud fetch RUN` (default --dest) puts a run's OUT: ./runs/RUN."""
    return Path("runs") / run_id


def expected_mfu():
    return STEADY_TOK_S * load_recipe("gpt2-124m").model.config().flops_per_token() / (WORLD * 989e12)


def test_run_data_parsing_and_title(tmp_path):
    elapsed = write_metrics(tmp_path / "out")
    data = read_metrics(tmp_path / "out")
    assert len(data.train) == STEPS and len(data.val) == 5 and len(data.hellaswag) == 2 and len(data.samples) == 5
    assert data.finished and data.world_size == WORLD and data.recipe == "gpt2-124m"
    assert data.steady_tokens_per_second() == STEADY_TOK_S  # the 5 warm-up steps are not in the median
    assert data.wall_seconds == pytest.approx(elapsed)
    assert data.cost_usd == pytest.approx(elapsed / 3600 * WORLD * PRICE)
    assert data.tokens_at(40) == 40 * TOKENS_PER_STEP
    head, sub = title_lines(data)
    assert "gpt2-124m" in head and "8 x GPU (989 TFLOPS peak)" in head
    assert f"${elapsed / 3600 * WORLD * PRICE:,.2f}" in sub and "step 100 of 100" in sub


def test_plot_command_writes_png(tmp_path):
    import matplotlib.image

    write_metrics(tmp_path / "out", hellaswag=False)
    for extra in ([], ["--log-x"]):
        png = tmp_path / f"p{len(extra)}.png"
        result = runner.invoke(app, ["plot", str(tmp_path / "out"), "--out", str(png), *extra])
        assert result.exit_code == 0, result.output
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        h, w, _ = matplotlib.image.imread(png).shape
        assert (w, h) == (1540, 990)


def test_plot_of_unknown_run_is_one_line_error(tmp_path):
    result = runner.invoke(app, ["plot", "no-such-run"])
    assert result.exit_code == 2 and "no-such-run" in result.output and "Traceback" not in result.output


def test_report_for_registry_run_compares_estimate_and_calibrates(home):
    record, est = save_record("gpt2-124m-test")
    elapsed = write_metrics(fetched(record.run_id))
    result = runner.invoke(app, ["report", record.run_id])
    assert result.exit_code == 0, result.output
    md_path = fetched(record.run_id) / "report.md"
    md = md_path.read_text()
    assert "launch-time estimate (run registry)" in md and "8 x H100" in md

    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:5]]
            for line in md.splitlines() if line.startswith("| ") and line.count("|") == 5}
    assert rows["wall time"][2] == f"{error_percent(est.wall_hours * 3600, elapsed):+.1f}%"
    assert rows["dollars"][2] == f"{error_percent(est.cost_usd, elapsed / 3600 * WORLD * PRICE):+.1f}%"
    assert rows["tokens/s (all GPUs)"][2] == f"{error_percent(est.tokens_per_second, STEADY_TOK_S):+.1f}%"
    assert rows["MFU"][1] == f"{expected_mfu():.1%}"
    assert f"| val loss (step 100) | {3.4 + 7.6 * math.exp(-100 / 15):.4f} | 3.2924" in md
    assert "HellaSwag acc_norm (step 100) | 0.2600" in md
    assert "**step 20**" in md and "**step 100**" in md and "> second line" in md
    assert "![training curves](report.png)" in md and (md_path.parent / "report.png").is_file()

    # The calibration point: written once, with the measured MFU, and used by the estimator.
    points = [json.loads(line) for line in user_calibration_path().read_text().splitlines()]
    assert len(points) == 1
    p = points[0]
    assert (p["gpu"], p["kind"], p["source"]) == ("H100", "measured", "gpt2cloud run gpt2-124m-test")
    assert p["params"] == load_recipe("gpt2-124m").model.config().param_count()
    assert p["mfu"] == pytest.approx(expected_mfu(), abs=1e-4)
    cal = default_mfu("H100", p["params"])
    assert cal.mfu == pytest.approx(p["mfu"]) and "gpt2cloud run gpt2-124m-test" in cal.source
    assert runner.invoke(app, ["report", record.run_id]).exit_code == 0
    assert len(user_calibration_path().read_text().splitlines()) == 1
    assert "already in" in (fetched(record.run_id) / "report.md").read_text()


def test_calibration_skips_local_unfinished_and_plain_dirs(tmp_path):
    local, _ = save_record("local-run", kind="local")
    write_metrics(fetched("local-run"), device="cpu", peak=0)
    unfinished, _ = save_record("running-run")
    write_metrics(fetched("running-run"), finished=False)
    done, _ = save_record("done-run")
    write_metrics(fetched("done-run"))
    write_metrics(tmp_path / "plain")

    assert record_calibration(load_run("local-run"))[0] is None
    assert "not finished" in record_calibration(load_run("running-run"))[1]
    assert "not a registry run" in record_calibration(load_run(str(tmp_path / "plain")))[1]
    assert measured_mfu(load_run(str(tmp_path / "plain"))) == pytest.approx(expected_mfu())

    point, message = record_calibration(load_run("done-run"))
    assert point["gpu"] == "H100" and point["mfu"] == pytest.approx(expected_mfu(), abs=1e-4), message
    assert record_calibration(load_run("done-run"))[0] is None  # once per run
    # 3M tokens/s of 124M on 8 A100s would be MFU 103%: a wrong record, not a calibration point.
    save_record("a100-run", gpu="A100-80GB")
    write_metrics(fetched("a100-run"))
    assert "not plausible" in record_calibration(load_run("a100-run"))[1]


def test_status_only_reads(tmp_path, monkeypatch):
    """`gpt2cloud status` of a finished GPU run shows its progress and writes no calibration point."""
    from gpt2cloud.runs.status import run_status

    spec = make_spec("bucket-run", gpu="H200")
    write_metrics(tmp_path / "bucket")
    spec = registry.RunSpec(**{**spec.__dict__, "run_url": (tmp_path / "bucket").as_uri()})
    record = registry.RunRecord(spec=spec, started_at=time.time(), state="DOWN")
    monkeypatch.setattr("gpt2cloud.runs.status.state_of", lambda r: "TERMINATED")
    d = run_status(record)
    assert d["finished"] and d["step"] == STEPS and d["tokens_per_second"] == pytest.approx(STEADY_TOK_S)
    assert not user_calibration_path().exists()


def test_fetched_dir_elsewhere_is_found_by_its_run_json(tmp_path):
    save_record("done-run")
    write_metrics(tmp_path / "mine")
    (tmp_path / "mine" / "run.json").write_text(json.dumps(make_spec("done-run").to_dict()))
    assert load_run(str(tmp_path / "mine")).record.run_id == "done-run"
    # Launched from another machine: not in this registry, but run.json still names the GPUs and price.
    write_metrics(tmp_path / "theirs", peak=312e12)
    theirs = make_spec("other-run", gpu="A100-80GB", price=1.5).to_dict()
    (tmp_path / "theirs" / "run.json").write_text(json.dumps({**theirs, "estimate": None}))
    data = load_run(str(tmp_path / "theirs"))
    assert data.record is None
    assert data.gpu_type == "A100-80GB" and data.hardware == "8 x A100-80GB" and data.price_per_gpu_hour == 1.5
    est, source = run_estimate(data)
    assert "computed now" in source and est.gpu_type == "A100-80GB" and est.price_per_gpu_hour == 1.5
    (tmp_path / "theirs" / "run.json").write_text(json.dumps(theirs))
    est, source = run_estimate(load_run(str(tmp_path / "theirs")))
    assert "launch-time" in source and est.gpu_type == "A100-80GB"


def test_report_for_plain_dirs(tmp_path):
    write_metrics(tmp_path / "gpu")  # the trainer was told the GPUs' peak: an estimate can be computed
    est, source = run_estimate(load_run(str(tmp_path / "gpu")))
    assert est is not None and "computed now" in source and est.gpu_type == "H100" and est.gpus == WORLD
    assert est.tokens == STEPS * TOKENS_PER_STEP

    write_metrics(tmp_path / "cpu", device="cpu", peak=0, price=0, hellaswag=False)
    out = tmp_path / "reports" / "cpu.md"
    result = runner.invoke(app, ["report", str(tmp_path / "cpu"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    md = out.read_text()
    assert "No estimate: no estimate was recorded" in md
    assert "unknown (no price per GPU-hour was given)" in md and "not measured" in md
    assert "![training curves](cpu.png)" in md and (tmp_path / "reports" / "cpu.png").is_file()
    assert not user_calibration_path().exists()
