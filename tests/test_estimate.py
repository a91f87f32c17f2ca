"""The estimator against published numbers, and the recipes it reads."""

import json

import pytest
from typer.testing import CliRunner

from gpt2cloud.cli import app
from gpt2cloud.errors import UserError
from gpt2cloud.cost.estimate import compare, estimate, max_micro_batch, memory_per_gpu
from gpt2cloud.cost.hardware import default_mfu
from gpt2cloud.cost.recipes import known_recipes, load_recipe

runner = CliRunner()


@pytest.mark.parametrize(
    "name, params, padded",
    [
        ("gpt2-124m", 124_439_808, 124_475_904),
        ("gpt2-350m", 354_823_168, 354_871_296),
        ("gpt2-774m", 774_030_080, 774_090_240),
        ("gpt2-1558m", 1_557_611_200, 1_557_686_400),
    ],
)
def test_parameter_counts_match_gpt2(name, params, padded):
    m = load_recipe(name).model.config()
    assert m.param_count() == params
    assert m.param_count(padded=True) == padded


def test_parameter_count_matches_the_torch_model():
    from model.gpt import GPT

    r = load_recipe("gpt2-tiny")
    model = GPT(r.to_train_config().model)
    assert model.num_params() == r.model.config().param_count()
    assert model.num_params(padded=True) == r.model.config().param_count(padded=True)


def test_flops_per_token_match_reference():
    assert load_recipe("gpt2-124m").model.config().flops_per_token() == pytest.approx(8.60e8, rel=2e-3)
    assert load_recipe("gpt2-1558m").model.config().flops_per_token() == pytest.approx(1.029e10, rel=1e-3)


def test_llmc_1558m_on_8xh100_at_half_mfu_is_about_a_day():
    e = estimate(load_recipe("gpt2-1558m"), "H100", 8, mfu=0.5, price=3.0)
    assert e.tokens == 32_000 * 1_048_576
    assert e.wall_hours == pytest.approx(24.2, abs=0.1)  # the shared notes' arithmetic
    assert e.gpu_hours == pytest.approx(8 * e.wall_hours)
    assert e.cost_usd == pytest.approx(e.gpu_hours * 3.0)


def test_lecture_example_with_default_efficiency():
    """The lecture: 32,000 steps x ~1M tokens on 8xH100 at ~$3/GPU-hour is about a day and ~$600."""
    e = estimate(load_recipe("gpt2-1558m"), "H100", 8, price=3.0)
    assert 22 <= e.wall_hours <= 27
    assert 550 <= e.cost_usd <= 700
    # the default MFU is llm.c's ~2.8 s/step, recomputed with our formula
    assert e.step_seconds == pytest.approx(2.8, rel=0.01)


def test_llmc_124m_calibration_reproduces_140ms_steps():
    e = estimate(load_recipe("gpt2-124m"), "H100", 8, price=3.0)
    assert e.step_seconds == pytest.approx(0.140, rel=0.01)
    assert e.wall_hours == pytest.approx(19_073 * 0.140 / 3600, rel=0.01)  # llm.c's ~45 min


def test_default_mfu_interpolates_and_names_its_source():
    small = default_mfu("H100", 124_439_808)
    big = default_mfu("H100", 1_557_611_200)
    mid = default_mfu("H100", 354_823_168)
    assert small.mfu < mid.mfu < big.mfu
    assert "llm.c" in small.source and "interpolated" in mid.source
    borrowed = default_mfu("B200", 124_439_808)
    assert borrowed.mfu == small.mfu and "no calibration for B200" in borrowed.source


def test_memory_verdicts():
    xl, small = load_recipe("gpt2-1558m").model.config(), load_recipe("gpt2-124m").model.config()
    assert memory_per_gpu(xl, 64).total_gib > 80  # needs recomputation at micro-batch 64
    assert memory_per_gpu(xl, 16).total_gib > 80  # llm.c's micro-batch 16: ~78 GiB traced, +3 GiB of context
    assert memory_per_gpu(xl, 8).total_gib <= 80 - 3  # the recipe's 8, with room to spare
    assert memory_per_gpu(small, 64).total_gib <= 80
    assert not estimate(load_recipe("gpt2-1558m"), "H100", 8, micro_batch=64).fits
    assert estimate(load_recipe("gpt2-124m"), "H100", 8).fits
    m = max_micro_batch(small, 80)
    assert memory_per_gpu(small, m).total_gib <= 80 < memory_per_gpu(small, m + 1).total_gib


def test_all_bundled_recipes_load_and_tiny_is_cpu_sized():
    assert set(known_recipes()) >= {"gpt2-124m", "gpt2-350m", "gpt2-774m", "gpt2-1558m", "gpt2-tiny"}
    for name in known_recipes():
        r = load_recipe(name)
        assert r.source
    tiny = load_recipe("gpt2-tiny")
    assert tiny.model.vocab_size == 50257 and tiny.eval.checkpoint_every == 5
    assert tiny.model.config().param_count() < 5_000_000
    r = load_recipe("gpt2-124m")
    assert (r.train.tokens_per_step, r.train.micro_batch, r.train.steps) == (524288, 64, 19073)
    assert (r.optimizer.lr, r.optimizer.warmup_steps, r.optimizer.min_lr_ratio) == (6e-4, 715, 0.1)
    cfg = r.to_train_config(steps=10, micro_batch=None)
    assert cfg.steps == 10 and cfg.micro_batch == 64 and cfg.beta2 == 0.95 and cfg.model.n_layer == 12
    with pytest.raises(TypeError):
        r.to_train_config(stpes=10)  # a misspelt override is an error, not a silent no-op


def _run(*args):
    return runner.invoke(app, list(args))


def test_cli_json_has_the_promised_fields():
    res = _run("estimate", "gpt2-1558m", "--gpus", "H100:8", "--price", "3", "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    for key in ("params", "flops_per_token", "tokens", "steps", "tokens_per_step", "gpu_type", "gpus", "nodes",
                "mfu", "tokens_per_second", "step_seconds", "wall_hours", "gpu_hours", "price_per_gpu_hour",
                "cost_usd", "memory_gb_per_gpu", "fits", "max_micro_batch"):
        assert key in d
    assert d["params"] == 1_557_611_200 and d["gpus"] == 8 and d["fits"] is True


def test_cli_table_and_compare():
    res = _run("estimate", "gpt2-1558m", "--gpus", "H100:8", "--price", "3")
    assert res.exit_code == 0 and "6N + 12*L*d*T" in res.output and "fits" in res.output
    res = _run("estimate", "gpt2-1558m", "--compare", "--json")
    rows = json.loads(res.output)
    costs = [r["all_in_cost_usd"] for r in rows if r["fits"]]
    assert costs == sorted(costs) and any(not r["fits"] for r in rows)
    assert not rows[-1]["fits"]  # what does not fit sorts last
    res = _run("estimate", "gpt2-124m", "--compare")
    assert res.exit_code == 0 and "cheapest all-in first" in res.output


def test_two_nodes_double_the_gpus():
    one = estimate(load_recipe("gpt2-1558m"), "H100", 8, nodes=1, price=3)
    two = estimate(load_recipe("gpt2-1558m"), "H100", 8, nodes=2, price=3)
    assert two.gpus == 16
    # twice the compute, but not twice as fast: the all-reduce between nodes (tests/test_estimate_network.py)
    assert two.compute_seconds == pytest.approx(one.step_seconds / 2)
    assert one.wall_hours / 2 < two.wall_hours < one.wall_hours


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--gpus", "H100:0"], "1 to 64"),
        (["--gpus", "H100:abc"], "not a whole number"),
        (["--gpus", "X9000:8"], "known GPUs: A100"),
        (["--price", "0"], "greater than 0"),
        (["--price", "-2"], "greater than 0"),
        (["--mfu", "0"], "greater than 0"),
        (["--mfu", "1.5"], "at most 1"),
        (["--mfu", "nan"], "finite number"),
        (["--price", "nan"], "finite number"),
        (["--price", "inf"], "finite number"),
        (["--gpus", "H100:3"], "not divisible"),
        (["--tokens-per-step", "1000"], "not divisible"),
        (["--steps", "0"], "greater than 0"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, needle):
    res = _run("estimate", "gpt2-124m", *args)
    assert res.exit_code == 2, res.output
    assert needle in res.output
    assert "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_unknown_recipe_lists_known_ones():
    res = _run("estimate", "gpt2-9000m")
    assert res.exit_code == 2 and "gpt2-124m" in res.output and "gpt2-tiny" in res.output


def _write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return str(p)


def test_recipe_yaml_syntax_error(tmp_path):
    path = _write(tmp_path, "name: [unclosed\n")
    res = _run("estimate", path)
    assert res.exit_code == 2 and "YAML syntax error at line" in res.output
    assert len(res.output.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "change, needle",
    [
        (("micro_batch: 64", "micro_batch: 0"), "train.micro_batch"),
        (("micro_batch: 64", "micro_batch: 64, bogus: 1"), "train.bogus: Extra inputs are not permitted"),
        (("n_head: 12", "n_head: 7"), "divisible by n_head"),
        (("lr: 6.0e-4", "lr: fast"), "optimizer.lr"),
        (("tokens_per_step: 524288", "tokens_per_step: 524289"), "train.tokens_per_step: tokens per step (524,289) is not divisible"),
    ],
)
def test_wrong_recipe_field_names_its_path(tmp_path, change, needle):
    from gpt2cloud.cost.recipes import _bundled_dir

    text = (_bundled_dir() / "gpt2-124m.yaml").read_text()
    assert change[0] in text
    path = _write(tmp_path, text.replace(change[0], change[1], 1))
    with pytest.raises(UserError, match="recipe"):
        load_recipe(path)
    res = _run("estimate", path)
    assert res.exit_code == 2 and needle in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1


def test_missing_recipe_file(tmp_path):
    res = _run("estimate", str(tmp_path / "nope.yaml"))
    assert res.exit_code == 2 and "not found" in res.output


def test_cpu_ranks_are_estimated_from_their_measured_point_and_left_out_of_compare():
    e = estimate(load_recipe("gpt2-tiny"), "CPU", 2, steps=30)
    assert e.mfu == 0.166 and "CPU ranks" in e.mfu_source
    assert 1500 < e.tokens_per_second < 4000  # the dev machine measured ~2,444 tokens/s
    assert all(r.gpu_type != "CPU" for r in compare(load_recipe("gpt2-124m")))


# ---- fast recipes: Muon's memory and FLOPs, the faithful recipe side by side ----

def test_muon_keeps_one_momentum_buffer_for_the_hidden_matrices():
    from gpt2cloud.cost.estimate import GIB
    from gpt2cloud.cost.optimizers import hidden_matrix_params

    xl = load_recipe("gpt2-1558m").model.config()
    assert hidden_matrix_params(xl) == 48 * 12 * 1600 * 1600
    adamw, muon = memory_per_gpu(xl, 8), memory_per_gpu(xl, 8, "muon")
    assert adamw.optimizer_gib - muon.optimizer_gib == pytest.approx(4 * hidden_matrix_params(xl) / GIB)
    assert muon.total_gib < adamw.total_gib and muon.activations_gib == adamw.activations_gib
    assert max_micro_batch(xl, 80, "muon") >= max_micro_batch(xl, 80)


def test_newton_schulz_flops_are_counted_in_the_step_time():
    from gpt2cloud.cost.optimizers import newton_schulz_flops

    xl = load_recipe("gpt2-1558m").model.config()
    # per step on one rank: c_attn's q, k, v as three d x d matrices, attention out, MLP up and down
    assert newton_schulz_flops(xl) == pytest.approx(5.9e13, rel=0.01)
    assert newton_schulz_flops(xl, 8) == pytest.approx(newton_schulz_flops(xl) / 8, rel=0.01)  # split over 8 ranks
    fast = estimate(load_recipe("gpt2-1558m-fast"), "H100", 8, price=3.0)
    faithful = estimate(load_recipe("gpt2-1558m"), "H100", 8, price=3.0)
    share = fast.optimizer_flops_per_step / (fast.flops_per_token * fast.tokens_per_step)
    assert 0.003 < share < 0.007  # each of 8 ranks orthogonalizes 1/8 of the 48 x 6 matrices
    # the step pays those FLOPs and a fixed time per matrix (tests/test_fast_recipes.py)
    assert fast.step_seconds == pytest.approx(faithful.step_seconds + fast.optimizer_seconds_per_step)
    assert fast.optimizer_seconds_per_step > faithful.step_seconds * share


def test_fast_recipe_estimate_puts_the_faithful_one_beside_it():
    fast = estimate(load_recipe("gpt2-1558m-fast"), "H100", 8, price=3.0)
    faithful = estimate(load_recipe("gpt2-1558m"), "H100", 8, price=3.0)
    assert fast.tokens == 24_000 * 1_048_576 and fast.token_ratio == 0.75 and "modded-nanogpt" in fast.basis
    assert fast.faithful["recipe"] == "gpt2-1558m" and fast.faithful["tokens"] == faithful.tokens
    assert fast.faithful["all_in_cost_usd"] == pytest.approx(faithful.all_in_cost_usd)
    assert fast.faithful["cost_usd"] == pytest.approx(faithful.cost_usd)
    # 0.75x the tokens, a little more per step for Muon: ~$450 of training against ~$600
    assert 0.75 * faithful.cost_usd < fast.cost_usd < 0.78 * faithful.cost_usd
    assert fast.fits and fast.memory_gb_per_gpu < faithful.memory_gb_per_gpu
    # and the other way round: the faithful recipe names its fast sibling
    assert faithful.fast["recipe"] == "gpt2-1558m-fast"
    assert faithful.fast["all_in_cost_usd"] == pytest.approx(fast.all_in_cost_usd)
    # --steps on the fast recipe: the faithful run it shortens is steps / 0.75 long
    short = estimate(load_recipe("gpt2-1558m-fast"), "H100", 8, price=3.0, steps=600)
    assert short.faithful["steps"] == 800


def test_cli_fast_recipe_says_what_it_rests_on():
    res = _run("estimate", "gpt2-1558m-fast", "--gpus", "H100:8", "--price", "3")
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())  # rich wraps long values
    assert "gpt2-1558m (faithful):" in text and "-> gpt2-1558m-fast:" in text
    assert "rests on modded-nanogpt 1.5B scale-up" in text and "0.75x-0.9x the tokens" in text
    assert "Newton-Schulz" in text and "24,000 steps" in text
    d = json.loads(_run("estimate", "gpt2-1558m-fast", "--gpus", "H100:8", "--price", "3", "--json").output)
    assert d["token_ratio"] == 0.75 and "modded-nanogpt" in d["basis"] and d["optimizer"] == "muon"
    assert d["faithful"]["recipe"] == "gpt2-1558m" and d["faithful"]["all_in_cost_usd"] > d["all_in_cost_usd"]
    assert "bench_optim_step_ratio" in d
    res = _run("estimate", "gpt2-1558m", "--gpus", "H100:8", "--price", "3")
    assert "fast recipe" in res.output and "gpt2-1558m-fast" in res.output


def test_cli_compare_shows_faithful_and_fast_dollars():
    rows = json.loads(_run("estimate", "gpt2-124m-fast", "--compare", "--json").output)
    assert rows and all(r["faithful"]["recipe"] == "gpt2-124m" for r in rows)
    assert all(r["all_in_cost_usd"] < r["faithful"]["all_in_cost_usd"] for r in rows)
    res = _run("estimate", "gpt2-1558m-fast", "--compare", "--price", "3")
    assert res.exit_code == 0 and "faithful all-in $" in res.output and "rests on" in res.output
    res = _run("estimate", "gpt2-1558m", "--compare", "--price", "3")
    assert res.exit_code == 0 and "fast all-in $" in res.output and "gpt2-1558m-fast" in res.output


def test_an_edited_faithful_recipe_has_no_fast_sibling(tmp_path):
    from gpt2cloud.cost.recipes import _bundled_dir

    text = (_bundled_dir() / "gpt2-1558m.yaml").read_text().replace("steps: 32000", "steps: 1000")
    e = estimate(load_recipe(_write(tmp_path, text)), "H100", 8, price=3.0)
    assert e.fast is None and e.faithful is None
