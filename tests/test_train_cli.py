"""`gpt2cloud train` and `gpt2cloud sample` as a user runs them."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch
from typer.testing import CliRunner

from gpt2cloud.cli import app
from gpt2cloud.processes import kill_process_tree
from model import checkpoint as ckpt
from model.config import GPTConfig
from model.gpt import GPT
from model.shards import write_shard
from trainer_helpers import REPO, env, make_shards, read_metrics, tiny_config, TINY_RECIPE

runner = CliRunner()



@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_RECIPE)
    return path


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "gpt2cloud", *map(str, args)]


def _one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_train_refuses_bad_input_in_one_line(tmp_path, recipe):
    out = tmp_path / "out"
    _one_line_error(runner.invoke(app, ["train", str(recipe), "--data", str(tmp_path / "nope"), "--out", str(out)]),
                    "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(runner.invoke(app, ["train", str(recipe), "--data", str(empty), "--out", str(out)]),
                    "no .bin token shards")
    data = make_shards(tmp_path / "data")
    for bad_nproc, why in [("0", "greater than 0"), ("3", "not divisible")]:
        _one_line_error(runner.invoke(app, ["train", str(recipe), "--data", str(data), "--out", str(out),
                                            "--nproc", bad_nproc]), why)
    _one_line_error(runner.invoke(app, ["train", str(recipe), "--data", str(data), "--out", str(out),
                                        "--max-cost", "5"]), "--max-cost 5 needs --price")
    short = make_shards(tmp_path / "short", train_tokens=(200, 256))  # a step reads 256 + 1 tokens
    _one_line_error(runner.invoke(app, ["train", str(recipe), "--data", str(short), "--out", str(out)]),
                    "one step of tokens (257)", "tokens_per_step")
    corrupt = data / "tiny_train_000002.bin"
    corrupt.write_bytes(b"\x01\x02\x03\x04" + corrupt.read_bytes()[4:])
    _one_line_error(runner.invoke(app, ["train", str(recipe), "--data", str(data), "--out", str(out)]),
                    str(corrupt), "bad magic")
    assert not out.exists()  # nothing started


def test_train_json_and_resume_never(tmp_path, recipe):
    data, out = make_shards(tmp_path / "data"), tmp_path / "out"
    p = subprocess.run(_cli("train", recipe, "--data", data, "--out", out, "--nproc", 2, "--steps", 5, "--json"),
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout)  # stdout holds only the JSON; the trainer's lines went to stderr
    assert "step 5/5 | loss" in p.stderr
    assert result["steps"] == 5 and result["final_loss"] == read_metrics(out)[-1]["final_loss"]
    assert result["checkpoint"] == str(out / "checkpoints" / "step_000005")
    ckpt.verify_checkpoint(result["checkpoint"])
    assert json.loads((out / "config.json").read_text())["steps"] == 5
    assert read_metrics(out)[0]["world_size"] == 2
    _one_line_error(runner.invoke(app, ["train", str(recipe), "--data", str(data), "--out", str(out),
                                        "--resume", "never"]), "--resume auto")
    # a 256-token model has no GPT-2 text to show: said in one line
    _one_line_error(runner.invoke(app, ["sample", str(out), "--prompt", "Hello"]), "vocabulary")


def test_ctrl_c_ends_the_whole_process_tree(tmp_path, recipe):
    data, out = make_shards(tmp_path / "data"), tmp_path / "out"
    cli = subprocess.Popen(_cli("train", recipe, "--data", data, "--out", out, "--nproc", 2, "--steps", 10**6),
                           cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "metrics.jsonl").exists():
            time.sleep(0.1)
        time.sleep(0.5)
        tree = psutil.Process(cli.pid).children(recursive=True)
        workers = [p for p in tree if "model.train" in " ".join(p.cmdline()) and "torch.distributed.run" not in
                   " ".join(p.cmdline())]
        assert len(workers) == 2, [p.cmdline() for p in tree]
        cli.send_signal(signal.SIGINT)
        assert cli.wait(timeout=60) == 130
        gone, alive = psutil.wait_procs(tree, timeout=10)
        alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, [p.cmdline() for p in alive]
    finally:
        kill_process_tree(cli.pid)


@pytest.fixture
def full_vocab_checkpoint(tmp_path):
    """A tiny, untrained model with the GPT-2 vocabulary, saved as our checkpoint."""
    torch.manual_seed(0)
    cfg = tiny_config(model=GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64))
    model = GPT(cfg.model)
    opt = model.configure_optimizer(1e-3, 0.1, (0.9, 0.95), 1e-8, "cpu")
    state = {"step": 1, "tokens_seen": 0, "elapsed_seconds": 0.0, "loss": None,
             "data": {"shard": "x.bin", "position": 0}, "world_size": 1, "grad_accum": 1}
    out = tmp_path / "run"
    path = ckpt.write_checkpoint(out, 1, model, {"optimizer": opt.state_dict(), "scaler": None}, state,
                                 [ckpt.rng_state()], dataclasses.asdict(cfg), keep=1)
    return out, path, model


def test_sample_prints_text(full_vocab_checkpoint, tmp_path):
    out, path, model = full_vocab_checkpoint
    args = ["--prompt", "Hello world", "--max-new-tokens", "6", "--num-samples", "2", "--seed", "7", "--json"]
    first = runner.invoke(app, ["sample", str(path), *args])
    assert first.exit_code == 0, first.stderr
    result = json.loads(first.stdout)
    assert len(result["samples"]) == 2 and all(s.startswith("Hello world") for s in result["samples"])
    assert result["samples"][0] != result["samples"][1]
    again = runner.invoke(app, ["sample", str(out), *args])  # the run dir: its newest checkpoint
    assert json.loads(again.stdout)["samples"] == result["samples"]  # same seed, same text
    plain = runner.invoke(app, ["sample", str(out), "--prompt", "Hi", "--max-new-tokens", "3", "--seed", "1"])
    assert plain.exit_code == 0 and plain.stdout.startswith("Hi")

    from model.hf import save_hf  # an HF-format directory works the same way

    hf = save_hf(model, tmp_path / "hf")
    greedy = ["--prompt", "Hello world", "--max-new-tokens", "6", "--temperature", "0", "--json"]
    from_hf = runner.invoke(app, ["sample", str(hf), *greedy])
    assert from_hf.exit_code == 0, from_hf.stderr
    assert json.loads(from_hf.stdout)["samples"] == json.loads(runner.invoke(app, ["sample", str(path), *greedy]).stdout)["samples"]


def test_sample_refuses_a_damaged_checkpoint(full_vocab_checkpoint):
    out, path, _ = full_vocab_checkpoint
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _one_line_error(runner.invoke(app, ["sample", str(path), "--prompt", "Hi"]), str(weights), "truncated")
    (path / "manifest.json").unlink()
    _one_line_error(runner.invoke(app, ["sample", str(out), "--prompt", "Hi"]), "no complete checkpoint")
    _one_line_error(runner.invoke(app, ["sample", str(out / "missing"), "--prompt", "Hi"]), "no such file")


@pytest.mark.parametrize("flag, value", [("--price", "nan"), ("--max-cost", "nan"), ("--max-cost", "-1")])
def test_train_refuses_caps_that_are_not_caps(tmp_path, recipe, flag, value):
    data = make_shards(tmp_path / "data")
    args = ["train", str(recipe), "--data", str(data), "--out", str(tmp_path / "out"), flag, value]
    if flag == "--max-cost":
        args += ["--price", "3"]
    _one_line_error(runner.invoke(app, args), flag, "finite number greater than 0")
