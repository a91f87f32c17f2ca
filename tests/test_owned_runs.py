"""Nothing you own is lost: local runs, resume, fetch and export (issue 20; docs/ownership.md).

Each row sets up what a user has (a fetched run, a trained run, their own files), runs one command as
the user would, and asserts the one-line refusal (exit 2, a needle, no traceback) and that every file
under the fingerprinted roots is byte-for-byte what it was. The last tests check the other side: the
same command on the same run stays a resume or a no-op.

The trained run is made once per module (a 6-step tiny run, checkpoints at steps 3 and 6) and copied
into each row; resume refusals are decided before torchrun starts, so those rows take milliseconds.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from owned_helpers import assert_refused, cli, fingerprint
from run_helpers import fake_checkpoint, local_record, metrics_lines
from trainer_helpers import REPO, env, TINY_RECIPE, make_shards

from gpt2cloud.store import open_store
from gpt2cloud.store.transfer import upload_dir

# recipe variants: name -> (text, replaced by)
VARIANTS = {
    "other_lr": ("lr: 1.0e-2", "lr: 5.0e-3"),
    "wider": ("n_embd: 32", "n_embd: 64"),
    "bigger_batch": ("tokens_per_step: 256", "tokens_per_step: 512"),
    "other_seed": ("seed: 1337", "seed: 7"),
    "more_eval": ("val_every: 3", "val_every: 2"),  # allowed on resume
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 6-step run of the tiny recipe (checkpoints 3 and 6), its data and recipe files."""
    from gpt2cloud.train import train

    root = tmp_path_factory.mktemp("owned-runs")
    (root / "tiny.yaml").write_text(TINY_RECIPE)
    for name, (text, new) in VARIANTS.items():
        assert text in TINY_RECIPE, name
        (root / f"{name}.yaml").write_text(TINY_RECIPE.replace(text, new, 1))
    data = make_shards(root / "data")
    make_shards(root / "other_data", train_tokens=(3000, 4000))
    with open(root / "train.log", "w") as log:
        train(str(root / "tiny.yaml"), data, root / "run", stream=log)
    assert (root / "run" / "checkpoints" / "step_000006" / "manifest.json").is_file()
    return root


@pytest.fixture(scope="module")
def gpt2_checkpoint(tmp_path_factory):
    """A run dir with one checkpoint of a tiny model with GPT-2's vocabulary (exportable, samplable)."""
    from model.checkpoint import rng_state, write_checkpoint
    from model.config import GPTConfig, TrainConfig
    from model.gpt import GPT

    out = tmp_path_factory.mktemp("gpt2-ckpt") / "run"
    torch.manual_seed(0)
    cfg = TrainConfig(model=GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32), recipe_name="gpt2-tiny")
    write_checkpoint(out, 7, GPT(cfg.model), {"optimizer": {}}, {"step": 7}, [rng_state()],
                     dataclasses.asdict(cfg), keep=2)
    return out


class World:
    """What a row sets up in its tmp_path: copies of the module's runs, fetchable runs, user files."""

    def __init__(self, tmp: Path, trained: Path, gpt2: Path):
        self.tmp, self.trained, self.gpt2 = tmp, trained, gpt2

    def run(self, name="run") -> Path:
        return Path(shutil.copytree(self.trained / "run", self.tmp / name))

    def recipe(self, name="tiny") -> str:
        return str(self.trained / f"{name}.yaml")

    def train(self, out, recipe="tiny", data="data", *extra) -> list:
        return ["train", self.recipe(recipe), "--data", self.trained / data, "--out", out, *extra]

    def checkpoint_run(self, name="ckrun") -> Path:
        return Path(shutil.copytree(self.gpt2, self.tmp / name))

    def bucket_run(self, run_id: str) -> None:
        """A registry run whose bucket holds checkpoints 5 and 10, metrics and run.json."""
        rec = local_record(self.tmp, run_id)
        store = open_store(rec.spec.run_url)
        for step in (5, 10):
            upload_dir(fake_checkpoint(self.tmp / f"src-{run_id}", step), store, f"checkpoints/step_{step:06d}",
                       progress=False)
        store.put_bytes("metrics.jsonl", metrics_lines(10, 20).encode())
        store.put_bytes("run.json", json.dumps({"run_id": run_id}).encode())

    def files(self, name: str, **files) -> Path:
        d = self.tmp / name
        d.mkdir(parents=True, exist_ok=True)
        for fname, text in files.items():
            (d / fname.replace("__", ".")).write_text(text)
        return d


@pytest.fixture
def world(tmp_path, trained, gpt2_checkpoint, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return World(tmp_path, trained, gpt2_checkpoint)


def truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


# ---------------------------------------------------------------- the rows
# Each returns (command arguments, roots to fingerprint).

def fetch_into_another_runs_dir(w):
    w.bucket_run("f1"), w.bucket_run("f2")
    assert cli(["fetch", "f1", "--dest", "dl"]).exit_code == 0
    return ["fetch", "f2", "--dest", "dl"], ["dl"]


def fetch_into_dir_with_unrelated_files(w):
    w.bucket_run("f1")
    w.files("mine", notes__txt="my notes\n", data__csv="a,b\n")
    return ["fetch", "f1", "--dest", "mine"], ["mine"]


def fetch_dest_is_a_file(w):
    w.bucket_run("f1")
    (w.tmp / "dl").write_text("a file\n")
    return ["fetch", "f1", "--dest", "dl"], ["dl"]


def fetch_dest_under_a_file(w):
    w.bucket_run("f1")
    (w.tmp / "dl").write_text("a file\n")
    return ["fetch", "f1", "--dest", "dl/sub"], ["dl"]


def fetch_into_a_local_training_run(w):
    w.bucket_run("f1")
    w.run()
    return ["fetch", "f1", "--dest", "run"], ["run"]


def fetch_into_dir_with_other_run_json(w):
    w.bucket_run("f1")
    w.files("old", run__json=json.dumps({"run_id": "someone-else"}), metrics__jsonl="{}\n")
    return ["fetch", "f1", "--dest", "old"], ["old"]


def fetch_over_a_user_metrics_file(w):
    w.bucket_run("f1")
    w.files("mine", metrics__jsonl='{"step": 1, "loss": 3.0}\n')
    return ["fetch", "f1", "--dest", "mine", "--all"], ["mine"]


def export_over_a_users_config_json(w):
    w.files("hf", config__json='{"model_type": "mine"}\n')
    return ["export", w.checkpoint_run(), "--hf", "hf"], ["hf"]


def export_into_the_runs_own_dir(w):
    run = w.checkpoint_run()
    (run / "config.json").write_text('{"lr": 0.1}\n')  # the trainer's
    (run / "metrics.jsonl").write_text("{}\n")
    return ["export", run, "--hf", run], [run]


def export_hf_is_a_file(w):
    (w.tmp / "hf").write_text("a file\n")
    return ["export", w.checkpoint_run(), "--hf", "hf"], ["hf"]


def export_over_a_users_model_safetensors(w):
    (w.files("hf") / "model.safetensors").write_bytes(b"\x00user weights")
    return ["export", w.checkpoint_run(), "--hf", "hf"], ["hf"]


def export_into_a_checkpoint_dir(w):
    run = w.checkpoint_run()
    return ["export", run, "--hf", run / "checkpoints" / "step_000007"], [run]


def export_into_an_export_with_a_users_readme(w):
    run = w.checkpoint_run()
    assert cli(["export", run, "--hf", "hf"]).exit_code == 0
    (w.tmp / "hf" / "README.md").write_text("# my model card\n")
    return ["export", run, "--hf", "hf"], ["hf", run]


def export_of_a_run_without_a_complete_checkpoint(w):
    run = w.checkpoint_run()
    (run / "checkpoints" / "step_000007" / "manifest.json").unlink()
    return ["export", run, "--hf", "hf"], [run, "hf"]


def export_of_a_tiny_vocabulary_run(w):
    return ["export", w.run(), "--hf", "hf"], ["run", "hf"]


def resume_with_another_lr(w):
    return w.train(w.run(), "other_lr"), ["run"]


def resume_with_a_wider_model(w):
    return w.train(w.run(), "wider"), ["run"]


def resume_with_another_schedule(w):
    return w.train(w.run(), "tiny", "data", "--schedule-steps", "9"), ["run"]


def resume_on_other_data(w):
    return w.train(w.run(), "tiny", "other_data"), ["run"]


def resume_with_another_batch(w):
    return w.train(w.run(), "bigger_batch"), ["run"]


def resume_with_another_seed(w):
    return w.train(w.run(), "other_seed"), ["run"]


def restart_before_a_checkpoint_with_another_lr(w):
    run = w.run()
    shutil.rmtree(run / "checkpoints")  # killed before its first checkpoint: config.json and metrics only
    return w.train(run, "other_lr"), ["run"]


def train_resume_never_on_a_run(w):
    return w.train(w.run(), "tiny", "data", "--resume", "never"), ["run"]


def train_out_is_a_file(w):
    (w.tmp / "out").write_text("a file\n")
    return w.train("out"), ["out"]


def train_out_with_user_files(w):
    w.files("mine", notes__txt="my notes\n")
    return w.train("mine"), ["mine"]


def train_out_is_an_hf_export(w):
    assert cli(["export", w.checkpoint_run(), "--hf", "hf"]).exit_code == 0
    return w.train("hf"), ["hf"]


def train_out_with_fetched_metrics_only(w):
    w.files("fetched", metrics__jsonl=metrics_lines(3, 10), run__json='{"run_id": "f1"}')
    return w.train("fetched"), ["fetched"]


def train_truncated_newest_checkpoint(w):
    """Refused by the trainer itself (under torchrun): its one line, not torchrun's traceback."""
    run = w.run()
    truncate(run / "checkpoints" / "step_000006" / "optimizer.pt")
    return w.train(run), ["run"]


def sample_truncated_checkpoint(w):
    run = w.checkpoint_run()
    truncate(run / "checkpoints" / "step_000007" / "model.safetensors")
    return ["sample", run, "--prompt", "Hi"], [run]


def eval_truncated_checkpoint(w):
    run = w.checkpoint_run()
    truncate(run / "checkpoints" / "step_000007" / "model.safetensors")
    return ["eval", run, "--val", w.trained / "data", "--device", "cpu"], [run]


def sample_checkpoint_without_manifest(w):
    run = w.checkpoint_run()
    (run / "checkpoints" / "step_000007" / "manifest.json").unlink()
    return ["sample", run / "checkpoints" / "step_000007", "--prompt", "Hi"], [run]


def eval_run_without_a_complete_checkpoint(w):
    run = w.checkpoint_run()
    (run / "checkpoints" / "step_000007" / "manifest.json").unlink()
    return ["eval", run, "--val", w.trained / "data", "--device", "cpu"], [run]


ROWS = [
    # fetch --dest
    (fetch_into_another_runs_dir, "holds run f1"),
    (fetch_into_dir_with_unrelated_files, "did not write"),
    (fetch_dest_is_a_file, "is a file"),
    (fetch_dest_under_a_file, "cannot be created"),
    (fetch_into_a_local_training_run, "did not write"),
    (fetch_into_dir_with_other_run_json, "holds run someone-else"),
    (fetch_over_a_user_metrics_file, "did not write"),
    # export --hf
    (export_over_a_users_config_json, "did not write (config.json)"),
    (export_into_the_runs_own_dir, "is a run directory"),
    (export_hf_is_a_file, "is a file"),
    (export_over_a_users_model_safetensors, "did not write (model.safetensors)"),
    (export_into_a_checkpoint_dir, "one of our checkpoints"),
    (export_into_an_export_with_a_users_readme, "README.md"),
    (export_of_a_run_without_a_complete_checkpoint, "no complete checkpoint"),
    (export_of_a_tiny_vocabulary_run, "vocabulary 256"),
    # train: resume is the same run, decided before anything is written
    (resume_with_another_lr, "lr 0.01 -> 0.005"),
    (resume_with_a_wider_model, "model n_embd 32 -> 64"),
    (resume_with_another_schedule, "--schedule-steps 6"),
    (resume_on_other_data, "data: 2 train shards, 14,048 bytes"),
    (resume_with_another_batch, "tokens_per_step 256 -> 512"),
    (resume_with_another_seed, "seed 1337 -> 7"),
    (restart_before_a_checkpoint_with_another_lr, "lr 0.01 -> 0.005"),
    (train_resume_never_on_a_run, "--resume auto"),
    # train --out
    (train_out_is_a_file, "is a file"),
    (train_out_with_user_files, "did not write (notes.txt)"),
    (train_out_is_an_hf_export, "not a gpt2cloud training config"),
    (train_out_with_fetched_metrics_only, "no complete checkpoint"),
    (train_truncated_newest_checkpoint, "and rerun the same command to resume from step_000003"),
    # sample, eval
    (sample_truncated_checkpoint, "truncated"),
    (eval_truncated_checkpoint, "truncated"),
    (sample_checkpoint_without_manifest, "incomplete checkpoint"),
    (eval_run_without_a_complete_checkpoint, "no complete checkpoint"),
]


@pytest.mark.parametrize("row, needle", ROWS, ids=[r.__name__ for r, _ in ROWS])
def test_refused_and_nothing_of_yours_changes(world, row, needle):
    args, roots = row(world)
    roots = [world.tmp / r for r in roots]
    before = fingerprint(*roots)
    result = cli(args)
    print(assert_refused(result, needle, before, fingerprint(*roots)))  # -s shows every refusal


# ---------------------------------------------------------------- what stays allowed

def test_truncated_checkpoint_gives_one_instruction(world):
    """The trainer's refusal reaches the user as its one line: no torchrun traceback, no second advice."""
    run = world.run()
    truncate(run / "checkpoints" / "step_000006" / "optimizer.pt")
    p = subprocess.run([sys.executable, "-m", "gpt2cloud", *map(str, world.train(run))], cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stdout + p.stderr and "ChildFailedError" not in p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert line.count("delete") == 1 and line.count("resume from") == 1 and "re-fetch" not in line, line


def test_refetch_of_the_same_run_is_a_no_op_and_marks_the_dir(world):
    world.bucket_run("f1")
    assert cli(["fetch", "f1", "--dest", "dl"]).exit_code == 0
    assert json.loads((world.tmp / "dl" / "gpt2cloud_fetch.json").read_text())["run"] == "f1"
    before = fingerprint(world.tmp / "dl")
    again = cli(["fetch", "f1", "--dest", "dl", "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.output)["checkpoints"][0]["downloaded"] == 0
    assert fingerprint(world.tmp / "dl") == before
    # a directory fetched before the marker existed: its run.json names the run
    (world.tmp / "dl" / "gpt2cloud_fetch.json").unlink()
    assert cli(["fetch", "f1", "--dest", "dl"]).exit_code == 0


def test_re_export_to_the_same_dir_replaces_only_its_own_export(world):
    run = world.checkpoint_run()
    assert cli(["export", run, "--hf", "hf"]).exit_code == 0
    marker = json.loads((world.tmp / "hf" / "gpt2cloud_export.json").read_text())
    assert marker["complete"] and marker["step"] == 7
    again = cli(["export", run, "--hf", "hf"])
    assert again.exit_code == 0, again.output


def test_resume_may_change_the_steps_and_the_eval_cadence(world):
    """A resume with only allowed changes (more steps, another val_every) continues the run."""
    run = world.run()
    result = cli(world.train(run, "more_eval", "data", "--steps", "8"))
    assert result.exit_code == 0, result.output
    assert (run / "checkpoints" / "step_000008" / "manifest.json").is_file()


def test_a_cloud_checkpoint_resumes_here_and_back():
    """`device` is how a run runs (cuda on a node, auto for `train`), not what it computes: a fetched
    cloud checkpoint resumes with `gpt2cloud train`, and a local run continues on a node."""
    from model.config import TrainConfig, resume_changes

    local = TrainConfig.from_dict(json.loads(TrainConfig().to_json()))
    cloud = json.loads(TrainConfig().to_json()) | {"device": "cuda"}
    assert local.device != "cuda" and resume_changes(cloud, local) == []
    assert resume_changes(cloud | {"lr": local.lr * 2}, local) == [f"lr {local.lr * 2:g} -> {local.lr:g}"]
