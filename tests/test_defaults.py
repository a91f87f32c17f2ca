"""Defaults that work the first time: a local launch without --gpus, and a micro-batch that divides
and fits picked (and said) where the recipe's does not."""

from __future__ import annotations

import json
import os

from typer.testing import CliRunner

from gpt2cloud.cli import app
from gpt2cloud.cost.estimate import estimate
from gpt2cloud.cost.recipes import load_recipe
from gpt2cloud.launch.plan import plan


def test_local_launch_without_gpus_uses_this_machines_cpu_cores(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path))
    p = plan("gpt2-tiny", None, infra="local", data="file:///tmp/d", bucket="file:///tmp/b")
    cores = os.cpu_count()
    assert (p.spec.gpu_type, p.spec.gpus_per_node) == ("CPU", cores)  # no CUDA here
    # gpt2-tiny's 1,024 tokens per step at micro-batch 8 x 64 tokens splits over 2 ranks; on more
    # cores the micro-batch shrinks until it divides, and the plan's config uses it
    assert p.train_cfg.tokens_per_step % (p.train_cfg.micro_batch * 64 * cores) == 0


def test_a_micro_batch_that_does_not_fit_is_replaced_by_one_that_does():
    e = estimate(load_recipe("gpt2-1558m"), gpu_type="A100", gpus_per_node=8)  # 40 GiB: the recipe's 8 does not fit
    assert e.fits and e.micro_batch < 8 and e.micro_batch * e.grad_accum * 1024 * 8 == 1_048_576
    assert "instead of the recipe's 8" in e.micro_batch_note and "fits in A100 memory" in e.micro_batch_note
    explicit = estimate(load_recipe("gpt2-1558m"), gpu_type="A100", gpus_per_node=8, micro_batch=8)
    assert not explicit.fits and explicit.micro_batch_note == ""  # what the user asked for is kept, and judged
    r = CliRunner().invoke(app, ["estimate", "gpt2-124m", "--compare", "--json"])
    rows = json.loads(r.stdout)
    small = next(x for x in rows if x["gpu_type"] == "A10" and x["gpus_per_node"] == 1)
    assert small["fits"] and small["micro_batch"] < 64 and small["micro_batch_note"]
    r = CliRunner().invoke(app, ["estimate", "gpt2-124m", "--compare"])
    assert "yes (mb " in r.output and "no (mb<=" not in r.output.split("A10:1")[1].split("\n")[0]


def test_train_picks_a_micro_batch_that_divides_over_the_ranks(tmp_path):
    from gpt2cloud.train import fit_to_ranks

    cfg = load_recipe("gpt2-tiny").to_train_config()  # 1,024 tokens/step, micro-batch 8 x 64
    notes = []

    class Out:
        write = notes.append

    fitted = fit_to_ranks(cfg, 4, Out)
    assert fitted.micro_batch == 4 and fitted.grad_accum(4) == 1 and "micro-batch 4 instead" in notes[0]
    assert fit_to_ranks(cfg, 2, Out) is cfg  # it divides already: unchanged, nothing said
