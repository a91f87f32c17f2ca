"""Every command, fed bad input, answers one line `error: ...` with exit code 2, no traceback, and
writes nothing: a table of probes, one per kind of mistake a user makes."""

from __future__ import annotations

import json

import pytest
from trainer_helpers import make_shards
from typer.testing import CliRunner

from gpt2cloud.cli import app
from gpt2cloud.cost.recipes import _bundled_dir

RECIPE = "gpt2-tiny"
# variants of the bundled gpt2-124m-fast recipe, one mistake each: file name -> (text, replaced by)
FAST_RECIPE_MISTAKES = {
    "opt_name": ("name: muon", "name: sgd"),
    "opt_schedule": ("schedule: wsd", "schedule: linear"),
    "cooldown_one": ("cooldown_frac: 0.4", "cooldown_frac: 1.0"),
    "cooldown_negative": ("cooldown_frac: 0.4", "cooldown_frac: -0.1"),
    "wsd_no_cooldown": ("cooldown_frac: 0.4", "cooldown_frac: 0"),
    "muon_lr_zero": ("muon_lr: 0.02", "muon_lr: 0"),
    "adamw_lr_negative": ("lr: 1.8e-3", "lr: -1.8e-3"),
    "muon_momentum_one": ("muon_momentum: 0.95", "muon_momentum: 1.0"),
    "muon_fields_on_adamw": ("name: muon", "name: adamw"),
    "token_ratio_above_1": ("token_ratio: 0.7", "token_ratio: 1.5"),
    "basis_missing": ("\nbasis: ", "\n# basis: "),
    "faster_than_unknown": ("faster_than: gpt2-124m", "faster_than: gpt2-125m"),
    "faster_than_a_fast_one": ("faster_than: gpt2-124m", "faster_than: gpt2-1558m-fast"),
    "fast_other_model": ("n_layer: 12", "n_layer: 6"),
    "fast_steps_not_the_ratio": ("steps: 13351", "steps: 19073"),
}
LOCAL = ["--infra", "local", "--gpus", "CPU:2"]


def _snapshot(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A place to probe from: data shards, a binary file, a text file, a run registry, S3 settings."""
    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path / "g2"))
    monkeypatch.chdir(tmp_path)
    make_shards(tmp_path / "data")
    (tmp_path / "binary.bin").write_bytes(b"\x00\xff\xfe\x80 not text \x81")
    (tmp_path / "notes.txt").write_text("hello\n")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "hellaswag.jsonl").write_bytes(b"\x00\xff\xfe garbage")
    (tmp_path / "out_file").write_text("a file, not a directory")
    (tmp_path / "empty").mkdir()
    (tmp_path / "g2" / "runs").mkdir(parents=True)
    (tmp_path / "g2" / "runs" / "broken.json").write_text("{not json")
    fast = (_bundled_dir() / "gpt2-124m-fast.yaml").read_text()
    for name, (text, replacement) in FAST_RECIPE_MISTAKES.items():
        assert text in fast, name
        (tmp_path / f"{name}.yaml").write_text(fast.replace(text, replacement, 1))
    return tmp_path


CASES = [
    # usage errors: Typer's own, as one line
    ("no command's argument", ["estimate"], "Missing argument"),
    ("unknown command", ["estmate", "gpt2-124m"], "No such command"),
    ("unknown option", ["estimate", "gpt2-124m", "--gpu", "H100:8"], "No such option"),
    ("int option given text", ["estimate", "gpt2-124m", "--steps", "many"], "--steps"),
    ("float option given text", ["estimate", "gpt2-124m", "--price", "cheap"], "--price"),
    ("data subcommand missing", ["data", "upload", "x"], "Missing argument"),
    # recipes
    ("unknown recipe", ["estimate", "gpt2-999m"], "unknown recipe"),
    ("recipe path missing", ["estimate", "nope.yaml"], "not found"),
    ("recipe is binary", ["estimate", "binary.bin"], "not a readable UTF-8 text file"),
    ("recipe YAML syntax", ["estimate", "bad.yaml"], "YAML syntax error"),
    ("recipe not a mapping", ["estimate", "list.yaml"], "expected a YAML mapping"),
    ("recipe is a directory", ["estimate", "empty"], "directory"),
    # recipe fields of the fast recipes: optimizer, schedule, and what a fast recipe shortens
    ("optimizer name", ["estimate", "opt_name.yaml"], "optimizer.name: Input should be 'adamw' or 'muon'"),
    ("schedule name", ["estimate", "opt_schedule.yaml"], "optimizer.schedule: Input should be 'cosine' or 'wsd'"),
    ("cooldown_frac 1", ["estimate", "cooldown_one.yaml"], "optimizer.cooldown_frac: Input should be less than 1"),
    ("cooldown_frac negative", ["estimate", "cooldown_negative.yaml"], "optimizer.cooldown_frac"),
    ("wsd without cooldown", ["estimate", "wsd_no_cooldown.yaml"], "needs cooldown_frac in (0, 1)"),
    ("muon_lr 0", ["estimate", "muon_lr_zero.yaml"], "optimizer.muon_lr: Input should be greater than 0"),
    ("adamw lr negative", ["estimate", "adamw_lr_negative.yaml"], "optimizer.lr: Input should be greater than 0"),
    ("muon_momentum 1", ["estimate", "muon_momentum_one.yaml"], "optimizer.muon_momentum"),
    ("muon fields with adamw", ["estimate", "muon_fields_on_adamw.yaml"], "only apply with name: muon"),
    ("token_ratio above 1", ["estimate", "token_ratio_above_1.yaml"], "token_ratio: Input should be less than 1"),
    ("fast recipe without basis", ["estimate", "basis_missing.yaml"], "missing basis"),
    ("faster_than unknown", ["estimate", "faster_than_unknown.yaml"], "faster_than: unknown recipe 'gpt2-125m'"),
    ("faster_than a fast one", ["estimate", "faster_than_a_fast_one.yaml"], "is itself a fast recipe"),
    ("fast recipe changes the model", ["estimate", "fast_other_model.yaml"], "keeps the architecture of gpt2-124m"),
    ("fast recipe steps off its ratio", ["estimate", "fast_steps_not_the_ratio.yaml"], "train.steps: 19,073 is not"),
    # GPUs and counts
    ("GPU count 0", ["estimate", "gpt2-124m", "--gpus", "H100:0"], "1 to 64"),
    ("GPU count missing", ["estimate", "gpt2-124m", "--gpus", "H100:"], "expected TYPE:COUNT"),
    ("GPU count text", ["estimate", "gpt2-124m", "--gpus", "H100:x"], "not a whole number"),
    ("GPU count huge", ["estimate", "gpt2-124m", "--gpus", "H100:100000"], "1 to 64"),
    ("GPU type unknown", ["estimate", "gpt2-124m", "--gpus", "X9:8"], "unknown GPU"),
    ("GPU type empty", ["estimate", "gpt2-124m", "--gpus", ":8"], "expected TYPE:COUNT"),
    ("nodes 0", ["estimate", "gpt2-124m", "--nodes", "0"], "--nodes"),
    # numbers: finite, positive, ints that fit
    ("price nan", ["estimate", "gpt2-124m", "--price", "nan"], "finite number"),
    ("price inf", ["estimate", "gpt2-124m", "--price", "inf"], "finite number"),
    ("price negative", ["estimate", "gpt2-124m", "--price", "-1"], "greater than 0"),
    ("price nan in compare", ["estimate", "gpt2-124m", "--compare", "--price", "nan", "--json"], "finite number"),
    ("mfu above 1", ["estimate", "gpt2-124m", "--mfu", "1.5"], "at most 1"),
    ("mfu nan", ["estimate", "gpt2-124m", "--mfu", "nan"], "finite number"),
    ("steps 0", ["estimate", "gpt2-124m", "--steps", "0"], "greater than 0"),
    ("steps too large", ["estimate", "gpt2-124m", "--steps", "10000000000000"], "at most"),
    ("tokens per step too large", ["estimate", "gpt2-124m", "--tokens-per-step", str(2**40)], "at most"),
    ("micro-batch 0", ["estimate", "gpt2-124m", "--micro-batch", "0"], "greater than 0"),
    ("tokens per step indivisible", ["estimate", "gpt2-124m", "--tokens-per-step", "1000"], "not divisible"),
    ("idle minutes 0", ["estimate", "gpt2-124m", "--idle-minutes", "0"], "--idle-minutes"),
    # launch: money inputs and URLs, before anything is built
    ("launch max-cost nan", ["launch", RECIPE, *LOCAL, "--data", "file:///d", "--bucket", "file:///b", "--max-cost", "nan"], "finite number"),
    ("launch max-cost negative", ["launch", RECIPE, *LOCAL, "--data", "file:///d", "--bucket", "file:///b", "--max-cost", "-1"], "greater than 0"),
    ("launch max-hours 0", ["launch", RECIPE, *LOCAL, "--data", "file:///d", "--bucket", "file:///b", "--max-hours", "0"], "--max-hours"),
    ("launch push-every 0", ["launch", RECIPE, *LOCAL, "--data", "file:///d", "--bucket", "file:///b", "--push-every", "0"], "--push-every"),
    ("launch idle-minutes 0", ["launch", RECIPE, *LOCAL, "--data", "file:///d", "--bucket", "file:///b", "--idle-minutes", "0"], "--idle-minutes"),
    ("launch price inf", ["launch", RECIPE, *LOCAL, "--data", "file:///d", "--bucket", "file:///b", "--price", "inf"], "finite number"),
    ("launch data scheme", ["launch", RECIPE, *LOCAL, "--data", "gs://x/y", "--bucket", "file:///b"], "use s3://"),
    ("launch bucket not a URL", ["launch", RECIPE, *LOCAL, "--data", "file:///d", "--bucket", "just-a-name"], "use s3://"),
    ("launch bad run name", ["launch", RECIPE, *LOCAL, "--data", "file:///d", "--bucket", "file:///b", "--name", "Bad_Name"], "not valid"),
    ("launch local nodes", ["launch", RECIPE, *LOCAL, "--data", "file:///d", "--bucket", "file:///b", "--nodes", "0"], "at least 1 node"),
    ("launch local spot", ["launch", RECIPE, *LOCAL, "--data", "file:///d", "--bucket", "file:///b", "--spot"], "no spot"),
    ("launch data missing", ["launch", RECIPE, *LOCAL, "--data", "file:///nonexistent/d", "--bucket", "file:///tmp/b", "--yes"], "manifest"),
    # train
    ("train steps 0", ["train", RECIPE, "--data", "data", "--out", "out", "--steps", "0"], "--steps"),
    ("train nproc 0", ["train", RECIPE, "--data", "data", "--out", "out", "--nproc", "0"], "--nproc"),
    ("train out is a file", ["train", RECIPE, "--data", "data", "--out", "out_file"], "is a file"),
    ("train data missing", ["train", RECIPE, "--data", "nope", "--out", "out"], "does not exist"),
    ("train data is a file", ["train", RECIPE, "--data", "notes.txt", "--out", "out"], "is a file"),
    ("train data empty", ["train", RECIPE, "--data", "empty", "--out", "out"], "no .bin token shards"),
    ("train price nan", ["train", RECIPE, "--data", "data", "--out", "out", "--price", "nan"], "finite number"),
    ("train max-cost without price", ["train", RECIPE, "--data", "data", "--out", "out", "--max-cost", "1"], "needs --price"),
    ("train resume value", ["train", RECIPE, "--data", "data", "--out", "out", "--resume", "sometimes"], "--resume"),
    # sample, eval, export: checkpoints and devices
    ("sample no checkpoint", ["sample", "nothing_here"], "no such file"),
    ("sample a text file", ["sample", "notes.txt"], "cannot sample"),
    ("sample num-samples 0", ["sample", "data", "--num-samples", "0"], "--num-samples"),
    ("eval nothing to do", ["eval", "data"], "nothing to evaluate"),
    ("eval bogus device", ["eval", "data", "--val", "data", "--device", "gpu7"], "--device"),
    ("eval binary hellaswag", ["eval", "data", "--hellaswag", "hellaswag.jsonl", "--device", "cpu"], ""),
    ("eval limit 0", ["eval", "data", "--hellaswag", "hellaswag.jsonl", "--limit", "0"], "--limit"),
    ("export not a checkpoint", ["export", "empty", "--hf", "hf_out"], "not a checkpoint"),
    # storage URLs
    ("upload prefix with ..", ["data", "upload", "data", "s3://bucket/a/../b"], "'..'"),
    ("upload no bucket", ["data", "upload", "data", "s3://"], "no bucket"),
    ("upload scheme", ["data", "upload", "data", "ftp://host/x"], "unsupported URL scheme"),
    ("upload missing dir", ["data", "upload", "nope", "file:///tmp/x"], "no such directory"),
    ("download nothing there", ["data", "download", "file:///nonexistent/set", "dl"], "no manifest"),
    ("download hf no repo", ["data", "download", "hf://onlyorg", "dl"], "name the repo as ORG/REPO"),
    ("download hf ..", ["data", "download", "hf://org/repo/../x", "dl"], "'..'"),
    ("download hf space", ["data", "download", "hf://spaces/org/app", "dl"], "use a dataset repo"),
    ("download hf endpoint-url", ["data", "download", "hf://org/repo", "dl", "--endpoint-url", "http://x"], "HF_ENDPOINT"),
    ("launch data hf no repo", ["launch", RECIPE, *LOCAL, "--data", "hf://org", "--bucket", "file:///b"], "name the repo"),
    ("launch data hf ..", ["launch", RECIPE, *LOCAL, "--data", "hf://org/r/../x", "--bucket", "file:///b"], "'..'"),
    ("launch bucket on the hub", ["launch", RECIPE, *LOCAL, "--data", "hf://org/r", "--bucket", "hf://org/b"], "read-only"),
    ("prepare missing source", ["data", "prepare", "nope.txt", "--out", "shards"], ""),
    # data prepare --on-cloud: refused before SkyPilot is imported or anything is built
    ("prepare on-cloud local out", ["data", "prepare", "owner/set:cfg", "--out", "shards", "--on-cloud", "--dry-run"], "s3://"),
    ("prepare on-cloud file out", ["data", "prepare", "owner/set:cfg", "--out", "file:///tmp/s", "--on-cloud", "--dry-run"], "cannot reach a file://"),
    ("prepare on-cloud cpus 0", ["data", "prepare", "owner/set:cfg", "--out", "s3://b/s", "--on-cloud", "--cpus", "0", "--dry-run"], "--cpus 0"),
    ("prepare on-cloud local source", ["data", "prepare", "notes.txt", "--out", "s3://b/s", "--on-cloud", "--dry-run"], "cannot read"),
    ("prepare on-cloud bad name", ["data", "prepare", "owner/set:cfg", "--out", "s3://b/s", "--on-cloud", "--name", "my_train", "--dry-run"], "--name"),
    ("prepare cloud flag without on-cloud", ["data", "prepare", "notes.txt", "--out", "shards", "--cpus", "8"], "only with --on-cloud"),
    # runs
    ("status unknown run", ["status", "nope"], "unknown run"),
    ("status broken record", ["status", "broken"], "not a readable run record"),
    ("logs unknown run", ["logs", "nope"], "unknown run"),
    ("down unknown run", ["down", "nope"], "unknown run"),
    ("fetch unknown run", ["fetch", "nope"], "unknown run"),
    ("fetch two choices", ["fetch", "file:///tmp/x/r", "--all", "--step", "3"], "choose one"),
    ("plot unknown run", ["plot", "nope"], "nope"),
    ("report unknown run", ["report", "nope"], "nope"),
]


@pytest.mark.parametrize("what, args, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(world, what, args, needle):
    before = _snapshot(world)
    r = CliRunner().invoke(app, args)
    # a damaged state file met on the way is named in a warning line; the error itself is one line
    out = "\n".join(line for line in r.output.strip().splitlines() if not line.startswith("warning: "))
    assert r.exit_code == 2, f"{what}: exit {r.exit_code}\n{r.output}"
    assert out.startswith("error: ") and "\n" not in out, f"{what}: not one line\n{r.output}"
    assert "Traceback" not in r.output and needle in out, f"{what}: {out}"
    assert _snapshot(world) == before, f"{what}: wrote {set(_snapshot(world)) - set(before)}"


def test_there_are_at_least_60_probes():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


def test_a_broken_record_does_not_break_the_listing(world):
    r = CliRunner().invoke(app, ["runs", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["runs"] == []
    assert "broken.json: not a readable run record" in r.output
