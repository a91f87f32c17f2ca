"""Muon (model/muon.py): orthogonalization, param groups, exact resume, the wsd schedule, bench_optim --quick."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from model import checkpoint as ckpt
from model.data import TokenLoader, find_shards
from model.muon import MuonAdamW, orthogonalize
from model.optim import build_optimizer
from model.step import get_lr, setup_training, train_step
from trainer_helpers import REPO, env, make_shards, tiny_config


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (96, 96)])
def test_newton_schulz_is_near_orthogonal(shape):
    g = torch.Generator().manual_seed(0)
    G = torch.randn(shape, generator=g)
    before = torch.linalg.svdvals(G)
    assert before.max() / before.min() > 2  # a gradient-like matrix, far from orthogonal
    O = orthogonalize(G)
    assert O.shape == G.shape and O.dtype == G.dtype
    after = torch.linalg.svdvals(O)
    # five quintic iterations bring every singular value to roughly 0.7-1.2 (that is all Muon needs);
    # only a nearly-null direction of a square matrix may still lag behind. These bounds are the iteration's, not
    # rounding's: fp32 moves the singular values by <= 1e-6 from an fp64 run; the margins are >= 0.05 (observed
    # 0.51-1.20, 99% above 0.65, cos 0.984)
    assert after.max() < 1.25 and after.min() > 0.45
    assert (after > 0.65).float().mean() > 0.95
    # and it is the polar factor U V^T of G, not just any orthogonal matrix
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    cos = torch.nn.functional.cosine_similarity((U @ Vh).flatten(), O.flatten(), dim=0)
    assert cos > 0.97


def _names(model, params):
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)] for p in params}


def test_param_groups_put_block_matrices_on_muon_and_never_decay_biases_or_layernorm():
    cfg = tiny_config(optimizer="muon", lr=1e-3, muon_lr=0.02, muon_weight_decay=0.01, weight_decay=0.1)
    s = setup_training(cfg, "cpu")
    opt, model = s.optimizer, s.raw_model
    assert isinstance(opt, MuonAdamW)
    muon = [g for g in opt.param_groups if g["muon"]]
    adam = [g for g in opt.param_groups if not g["muon"]]
    muon_names = set().union(*(_names(model, g["params"]) for g in muon))
    expected = {f"transformer.h.{i}.{m}.weight" for i in range(cfg.model.n_layer)
                for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert muon_names == expected
    # 0.02 / 1e-3 in float64: within an ulp of 20 (approx's default rel 1e-6 is margin)
    assert all(g["lr_ratio"] == pytest.approx(20.0) and g["weight_decay"] == 0.01 for g in muon)
    decayed = set().union(*(_names(model, g["params"]) for g in adam if g["weight_decay"] > 0))
    assert decayed == {"transformer.wte.weight", "transformer.wpe.weight"}  # lm_head is wte (tied)
    undecayed = set().union(*(_names(model, g["params"]) for g in adam if g["weight_decay"] == 0))
    assert undecayed == {n for n, p in model.named_parameters() if p.dim() == 1}
    assert all(g["lr_ratio"] == 1.0 for g in adam)
    # every parameter exactly once
    all_params = [p for g in opt.param_groups for p in g["params"]]
    assert len(all_params) == len({id(p) for p in all_params}) == len(list(model.parameters()))


def test_adamw_path_is_configure_optimizer():
    cfg = tiny_config()
    s = setup_training(cfg, "cpu")
    assert type(s.optimizer) is torch.optim.AdamW
    ref = s.raw_model.configure_optimizer(cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps, "cpu")
    for mine, theirs in zip(s.optimizer.param_groups, ref.param_groups, strict=True):
        assert [id(p) for p in mine["params"]] == [id(p) for p in theirs["params"]]
        assert mine["weight_decay"] == theirs["weight_decay"] and mine["lr_ratio"] == 1.0
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(s.raw_model, tiny_config(optimizer="sgd"), "cpu")


def test_an_optimizer_is_one_registry_line(monkeypatch):
    """model/optim.py's OPTIMIZERS: the trainer's setup builds whatever cfg.optimizer names there, and an
    unknown name lists the registered ones."""
    from model import optim

    assert set(optim.OPTIMIZERS) == {"adamw", "muon"}
    assert type(setup_training(tiny_config(optimizer="muon"), "cpu").optimizer) is MuonAdamW

    def sgd(raw_model, cfg, device_type):
        return torch.optim.SGD([dict(params=list(raw_model.parameters()), lr_ratio=1.0)], lr=cfg.lr)

    monkeypatch.setitem(optim.OPTIMIZERS, "sgd", sgd)
    s = setup_training(tiny_config(optimizer="sgd"), "cpu")
    assert type(s.optimizer) is torch.optim.SGD
    with pytest.raises(ValueError, match=r"unknown optimizer 'lion' \(adamw or muon or sgd\)"):
        build_optimizer(s.raw_model, tiny_config(optimizer="lion"), "cpu")


def _train(cfg, loader, s, steps):
    for step in steps:
        train_step(s.model, s.optimizer, s.scaler, loader, 2, s.amp, cfg.grad_clip, get_lr(step, cfg), False, "cpu")


def test_muon_resume_is_bit_exact(tmp_path):
    """6 steps straight == 3 steps, a checkpoint written and loaded by model/checkpoint.py, 3 more steps."""
    cfg = tiny_config(optimizer="muon", muon_lr=0.05, muon_weight_decay=0.01, steps=6, warmup_steps=2,
                      schedule="wsd", cooldown_frac=0.5, tokens_per_step=256, micro_batch=4)
    cfg.model.block_size = 32  # 4 x 32 x 2 micro-steps = 256 tokens per step
    train, _ = find_shards(make_shards(tmp_path / "data"))

    def loader():
        return TokenLoader(train, cfg.micro_batch, cfg.model.block_size, 0, 1, 2)

    straight = setup_training(cfg, "cpu")
    _train(cfg, loader(), straight, range(6))

    first = setup_training(cfg, "cpu")
    data = loader()
    _train(cfg, data, first, range(3))
    path = ckpt.write_checkpoint(tmp_path / "out", 3, first.raw_model,
                                 ckpt.to_host({"optimizer": first.optimizer.state_dict()}),
                                 {"step": 3, "data": data.state()}, [], {"model": {}}, keep=2)
    resumed = setup_training(cfg, "cpu")
    state = ckpt.load_training_state(path, resumed.raw_model, resumed.optimizer, resumed.scaler, 0, "cpu")
    data2 = loader()
    data2.set_state(state["data"])
    assert resumed.optimizer.state_dict()["param_groups"][0]["muon"] is True
    _train(cfg, data2, resumed, range(3, 6))

    # the same ops on the same tensors in one process, from an exactly restored state: bitwise equal
    for (name, a), b in zip(straight.raw_model.state_dict().items(), resumed.raw_model.state_dict().values()):
        assert torch.equal(a, b), name
    moved = next(iter(first.optimizer.state.values()))
    assert "momentum_buffer" in moved  # the Muon momentum really was checkpointed


def test_train_step_sets_each_groups_lr_from_its_ratio(tmp_path):
    cfg = tiny_config(optimizer="muon", lr=2e-3, muon_lr=0.04)
    s = setup_training(cfg, "cpu")
    train, _ = find_shards(make_shards(tmp_path / "data"))
    data = TokenLoader(train, cfg.micro_batch, cfg.model.block_size, 0, 1, 2)
    train_step(s.model, s.optimizer, s.scaler, data, 2, s.amp, cfg.grad_clip, 1e-3, False, "cpu")
    lrs = {g["muon"]: g["lr"] for g in s.optimizer.param_groups}
    assert lrs[True] == pytest.approx(0.02) and lrs[False] == pytest.approx(1e-3)  # float64: within an ulp


def test_wsd_schedule_warms_up_holds_then_cools_down_linearly():
    cfg = tiny_config(schedule="wsd", lr=1.0, min_lr_ratio=0.1, warmup_steps=10, steps=100, cooldown_frac=0.2)
    lrs = [get_lr(i, cfg) for i in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup (float64, ulps off)
    assert all(lr == 1.0 for lr in lrs[10:81])  # stable at the peak until the last 20 steps
    cool = lrs[80:100]
    assert all(a > b for a, b in zip(cool, cool[1:]))  # strictly down...
    steps = [a - b for a, b in zip(cool, cool[1:])]
    # ...linearly: each lr (~0.1-1) is within an ulp (2.2e-16), so steps of 0.045 agree to ~1e-15; a cosine
    # cooldown's steps would differ by ~0.07
    assert max(steps) - min(steps) < 1e-9
    assert lrs[99] == pytest.approx(0.1 + 0.9 / 20) and lrs[100:] == [pytest.approx(0.1)] * 10
    # the default stays cosine: decreasing from the end of warmup on
    cos = tiny_config(lr=1.0, warmup_steps=10, steps=100)
    assert get_lr(50, cos) < get_lr(20, cos) < 1.0


def test_bench_optim_quick_writes_table_json_and_png(tmp_path):
    data = make_shards(tmp_path / "data", train_tokens=(20000,), val_tokens=2000)
    png, js = tmp_path / "curves.png", tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_optim.py"), "--quick", "--data", str(data),
           "--jobs", "1", "--png", str(png), "--json", str(js)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=120)
    assert out.returncode == 0, out.stderr
    assert "final val loss" in out.stdout and "steps to AdamW final" in out.stdout and "wall time" in out.stdout
    rows = [line.split()[0] for line in out.stdout.splitlines() if line.startswith(("adamw ", "muon "))]
    assert rows == ["adamw", "muon"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    d = json.loads(js.read_text())
    assert sorted((r["optimizer"], r["seed"]) for r in d["runs"]) == [(o, s) for o in ("adamw", "muon")
                                                                       for s in (0, 1, 2)]
    assert all(r["curve"][-1][0] == 8 for r in d["runs"])
    assert "final_mean" in d["summary"]["adamw"] and "final_mean" in d["summary"]["muon"]
