"""--tracker on `train` and `launch`, a recipe's eval.trackers and `gpt2cloud config set tracker`: where the
names come from, the one-line refusals, and what a node gets for them: its packages (build.NODE_EXTRAS_ENV)
and WANDB_API_KEY as a SkyPilot secret only when wandb is asked for, never in the YAML."""

from __future__ import annotations

import pytest
import yaml
from sky_offline import sky_home, sky_mod  # noqa: F401  (fixtures)
from test_config_defaults import one_line_error
from typer.testing import CliRunner

from gpt2cloud import settings
from gpt2cloud.cli import app
from gpt2cloud.errors import UserError
from gpt2cloud.launch import build
from gpt2cloud.launch.plan import plan
from model import trackers
from trainer_helpers import TINY_RECIPE, make_shards

KEY = "wandb-key-not-a-real-one-0123456789abcdef"
LOCAL_RUN = ["launch", "gpt2-tiny", "--infra", "local", "--gpus", "CPU:2", "--data", "file:///nowhere/shards",
             "--bucket", "file:///nowhere/runs", "--dry-run"]


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])



def envs(r) -> dict:
    return yaml.safe_load(r.stdout)["envs"]


@pytest.fixture
def recipe(tmp_path):
    def write(names=None):
        path = tmp_path / "tiny.yaml"
        path.write_text(with_trackers(names))
        return path
    return write


def with_trackers(names=None) -> str:
    """The tiny recipe, with eval.trackers set to `names` (YAML flow text, e.g. "[wandb]")."""
    return TINY_RECIPE if names is None else TINY_RECIPE.replace("keep_checkpoints: 2}",
                                                                 f"keep_checkpoints: 2, trackers: {names}}}")


@pytest.fixture(autouse=True)
def no_wandb_env(monkeypatch):
    for k in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_BASE_URL", "TRACKIO_SPACE_ID",
              "TRACKIO_SERVER_URL", "TRACKIO_WRITE_TOKEN", "HF_TOKEN"):
        monkeypatch.delenv(k, raising=False)


# ---- the names ----


def test_a_bad_tracker_name_is_one_line_exit_2_everywhere(tmp_path, recipe):
    data = make_shards(tmp_path / "data")
    one_line_error(cli("train", recipe(), "--data", data, "--out", tmp_path / "out", "--tracker", "tensorboard",
                       "--tracker", "nope"),
                   "--tracker nope: not a tracker the trainer knows (known: tensorboard, wandb, trackio)")
    assert not (tmp_path / "out").exists()  # refused before anything was written
    one_line_error(cli("train", recipe("[nope]"), "--data", data, "--out", tmp_path / "out"),
                   "recipe test-tiny: eval.trackers: nope: not a tracker the trainer knows")
    one_line_error(cli("train", recipe("[two words]"), "--data", data, "--out", tmp_path / "out"),
                   "eval.trackers: 'two words' is not a tracker name")
    one_line_error(cli(*LOCAL_RUN, "--tracker", "nope"), "--tracker nope: not a tracker the trainer knows")
    one_line_error(cli("config", "set", "tracker", "nope"), "not a tracker the trainer knows")


def test_train_and_a_local_launch_need_the_package_here(tmp_path, recipe, monkeypatch):
    monkeypatch.setitem(trackers.TRACKERS, "absent", trackers.Tracker(None, requirement="absent-pkg",
                                                                       module="no_such_module_here"))
    data = make_shards(tmp_path / "data")
    one_line_error(cli("train", recipe(), "--data", data, "--out", tmp_path / "out", "--tracker", "absent"),
                   "no_such_module_here is not installed here; pip install 'gpt2cloud[absent]'")
    one_line_error(cli(*LOCAL_RUN, "--tracker", "absent"), "no_such_module_here is not installed here")


def test_the_flag_wins_over_the_config_file_which_wins_over_the_recipe(tmp_path):
    yaml_recipe = tmp_path / "r.yaml"
    yaml_recipe.write_text(with_trackers("[wandb]"))
    run = [LOCAL_RUN[0], str(yaml_recipe), *LOCAL_RUN[2:]]

    def chosen(r):
        assert r.exit_code == 0, r.output
        rows = {line.split()[1]: line for line in r.stdout.splitlines() if line.startswith("#   ")}
        return envs(r).get(build.NODE_EXTRAS_ENV), rows["tracker"]

    extras, row = chosen(cli(*run))
    assert extras == "wandb" and "recipe test-tiny" in row
    assert cli("config", "set", "tracker", "tensorboard", "trackio").exit_code == 0
    extras, row = chosen(cli(*run))
    assert extras == "tensorboard trackio" and f"config file {settings.path()}" in row
    extras, row = chosen(cli(*run, "--tracker", "tensorboard"))
    assert extras == "tensorboard" and "flag --tracker" in row


# ---- what a cloud node gets ----


def _plan(**kw):
    args = dict(recipe="gpt2-124m", gpus="H100:8", infra="lambda", data="s3://bkt/fineweb", bucket="s3://bkt/runs",
                name="g124", offline=True)
    args.update(kw)
    return plan(**args)


def test_wandb_on_a_cloud_needs_its_key_which_travels_as_a_secret_only(sky_mod, monkeypatch):
    with pytest.raises(UserError, match=r"^--tracker wandb: WANDB_API_KEY is not set here"):
        _plan(trackers=["wandb"])
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    monkeypatch.setenv("WANDB_PROJECT", "gpt2-runs")
    p = _plan(trackers=["wandb", "tensorboard"])
    cfg = p.task_cfg
    assert p.secrets["WANDB_API_KEY"] == KEY and cfg["secrets"]["WANDB_API_KEY"] is None
    assert cfg["envs"][build.NODE_EXTRAS_ENV] == "wandb tensorboard" and cfg["envs"]["WANDB_PROJECT"] == "gpt2-runs"
    assert "WANDB_API_KEY" not in cfg["envs"] and KEY not in yaml.safe_dump(cfg)
    assert p.train_cfg.trackers == ["wandb", "tensorboard"] and KEY not in p.job.config_json
    sky_mod.Task.from_yaml_config(cfg)  # SkyPilot's own schema takes it
    # not asked for: neither the key nor any package goes to the node
    p = _plan()
    assert "WANDB_API_KEY" not in p.secrets and build.NODE_EXTRAS_ENV not in p.task_cfg["envs"]
    assert p.train_cfg.trackers == []


def test_wandb_offline_needs_no_key_and_says_where_the_run_stays(sky_mod, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    p = _plan(trackers=["wandb"])
    assert "WANDB_API_KEY" not in p.secrets and p.task_cfg["envs"]["WANDB_MODE"] == "offline"
    assert any("WANDB_MODE=offline" in w for w in p.warnings)


def test_the_dry_run_and_export_hold_no_key(sky_mod, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    args = ["launch", "gpt2-124m", "--gpus", "H100:8", "--infra", "lambda", "--data", "s3://bkt/fineweb",
            "--bucket", "s3://bkt/runs", "--name", "g124", "--tracker", "wandb"]
    r = cli(*args, "--dry-run")
    assert r.exit_code == 0, r.output
    assert KEY not in r.output and yaml.safe_load(r.stdout)["secrets"]["WANDB_API_KEY"] is None
    r = cli(*args, "--export-yaml", tmp_path / "task.yaml")
    assert r.exit_code == 0, r.output
    text = (tmp_path / "task.yaml").read_text()
    assert KEY not in text and "--secret WANDB_API_KEY" in text
    assert all(KEY not in f.read_bytes().decode("latin-1") for f in tmp_path.rglob("*") if f.is_file())
