"""Muon (model/muon.py): orthogonalization, agreement with torch.optim.Muon, c_attn's q/k/v blocks, the ranks'
assignment, param groups, exact resume, the wsd schedule. (Newton-Schulz split over 2 ranks:
tests/test_muon_sharded.py; benchmarks/bench_optim.py: tests/test_bench_optim.py.)"""

from __future__ import annotations

import pytest
import torch

from gpt2cloud.cost.optimizers import newton_schulz_flops
from model import checkpoint as ckpt
from model.config import GPTConfig
from model.data import TokenLoader, find_shards
from model.muon import NS_COEFFS, NS_EPS, NS_STEPS, Job, MuonAdamW, assign, orthogonalize
from model.optim import build_optimizer
from model.step import get_lr, setup_training, train_step
from trainer_helpers import make_shards, tiny_config


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


def test_newton_schulz_in_bf16_is_torch_muons_iteration():
    """torch.optim.Muon always iterates in bf16; ours does on a GPU. Same coefficients, same ops: same bits."""
    from torch.optim._muon import _zeropower_via_newtonschulz

    g = torch.Generator().manual_seed(1)
    for shape in [(64, 256), (256, 64), (96, 96)]:
        G = torch.randn(shape, generator=g)
        theirs = _zeropower_via_newtonschulz(G, NS_COEFFS, NS_STEPS, NS_EPS)
        assert torch.equal(orthogonalize(G, dtype=torch.bfloat16), theirs), shape


def _least_squares_run(opt, weights, data, steps=20):
    """`steps` optimizer steps on sum ||x W^T - y||^2 / n: the gradient depends on the weights, so any
    difference in an update shows up in every later one."""
    for _ in range(steps):
        opt.zero_grad()
        loss = sum(((x @ w().T - y) ** 2).mean() for w, (x, y) in zip(weights, data))
        loss.backward()
        opt.step()


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_agrees_with_torch_optim_muon(monkeypatch, nesterov):
    """20 steps of MuonAdamW against torch.optim.Muon from the same start: a tall and a wide matrix, and a
    fused 3C x C c_attn-like matrix against torch's Muon on its three C x C blocks as separate parameters.

    The mapping: our momentum sums (buf = mu buf + g), torch's averages (buf = lerp(buf, g, 1 - mu)), a
    factor 1 - mu that Newton-Schulz's normalization removes; weight decay lr * wd on both; our shape rule is
    torch's adjust_lr_fn "original". torch runs Newton-Schulz in bf16 on any device, which alone moves the
    weights by ~5e-3 of their change here, so its iteration is set to fp32 for this comparison (in bf16 the
    two iterations are bit-identical: the test above). Measured: 2.5e-7 to 4.5e-7 of the distance moved;
    with c_attn orthogonalized as one matrix instead of three blocks, 0.4."""
    import torch.optim._muon as torch_muon

    def fp32_iteration(grad, ns_coefficients, ns_steps, eps):
        assert (tuple(ns_coefficients), ns_steps, eps) == (NS_COEFFS, NS_STEPS, NS_EPS)
        return orthogonalize(grad, ns_steps, dtype=torch.float32)

    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", fp32_iteration)
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(shape, generator=g) * 0.1 for shape in [(48, 16), (16, 48), (48, 16)]]
    data = [(torch.randn(64, w.size(1), generator=g), torch.randn(64, w.size(0), generator=g)) for w in start]
    hyper = dict(lr=0.02, momentum=0.95, nesterov=nesterov, weight_decay=0.1)

    ours = [w.clone().requires_grad_() for w in start]
    opt = MuonAdamW([dict(params=ours, muon=True, **hyper)], blocks={ours[2]: 3})
    _least_squares_run(opt, [lambda w=w: w for w in ours], data)

    theirs = [w.clone().requires_grad_() for w in start[:2]] + [b.clone().requires_grad_() for b in start[2].chunk(3)]
    ref = torch.optim.Muon(theirs, **hyper, ns_coefficients=NS_COEFFS, eps=NS_EPS, ns_steps=NS_STEPS,
                           adjust_lr_fn="original")
    as_matrices = [lambda: theirs[0], lambda: theirs[1], lambda: torch.cat(theirs[2:])]
    _least_squares_run(ref, as_matrices, data)

    for w0, mine, expected in zip(start, ours, (m().detach() for m in as_matrices)):
        moved = (expected - w0).norm()
        assert moved > 1.0  # 20 steps of lr 0.02 really moved every matrix
        assert (mine.detach() - expected).norm() / moved < 1e-6


def test_c_attn_blocks_change_no_state_layout():
    """The trainer's optimizer orthogonalizes each c_attn weight as 3 blocks, on one process unsharded; the
    blocks are not state: the state_dict has exactly the layout of one built without them, so a checkpoint
    written before per-block Newton-Schulz resumes (and one written now loads into older code)."""
    cfg = tiny_config(optimizer="muon")
    s = setup_training(cfg, "cpu")
    opt = s.optimizer
    assert {n for n, p in s.raw_model.named_parameters() if opt.blocks.get(p) == 3} == {
        f"transformer.h.{i}.attn.c_attn.weight" for i in range(cfg.model.n_layer)}
    assert set(opt.blocks.values()) == {3} and opt.shard is False
    plain = MuonAdamW([{k: v for k, v in g.items()} for g in opt.param_groups], lr=cfg.lr)
    for p in s.raw_model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    plain.step()
    mine, before = opt.state_dict(), plain.state_dict()
    assert mine["param_groups"] == before["param_groups"]
    assert {i: {k: v.shape for k, v in st.items()} for i, st in mine["state"].items()} == \
        {i: {k: v.shape for k, v in st.items()} for i, st in before["state"].items()}


@pytest.mark.parametrize("n_layer, n_embd, world", [(12, 768, 8), (48, 1600, 8), (3, 32, 2), (2, 32, 3)])
def test_ranks_share_newton_schulz_evenly(n_layer, n_embd, world):
    """assign(): every job once, one job per rank per round, rounds of one shape; the busiest rank does at
    most one matrix more than an even share (GPT-2 124M and 1558M on 8 GPUs: exactly an even share)."""
    d = n_embd
    jobs = []
    for _ in range(n_layer):  # what MuonAdamW makes of a block: c_attn's q, k, v; attn c_proj; MLP up, down
        qkv = torch.empty(3 * d, d, device="meta")
        jobs += [Job(qkv, slice(r, r + d), {}) for r in range(0, 3 * d, d)]
        jobs += [Job(torch.empty(rows, cols, device="meta"), slice(0, rows), {})
                 for rows, cols in ((d, d), (4 * d, d), (d, 4 * d))]
    rounds = assign(jobs, world)
    assert sorted(id(job) for r in rounds for _, job in r) == sorted(id(job) for job in jobs)
    for r in rounds:
        assert len({owner for owner, _ in r}) == len(r) <= world and len({job.shape for _, job in r}) == 1

    def flops(job):  # one Newton-Schulz iteration on it (gpt2cloud/cost/optimizers.py)
        a, b = sorted(job.shape)
        return 4 * a * a * b + 2 * a**3

    load = [sum(flops(job) for r in rounds for owner, job in r if owner == rank) for rank in range(world)]
    even = sum(flops(job) for job in jobs) / world
    assert max(load) <= even + max(flops(job) for job in jobs)
    if d >= 768:
        assert max(load) == min(load) == even
    # the estimate's Newton-Schulz FLOPs per rank follow the same assignment
    assert newton_schulz_flops(GPTConfig(n_layer=n_layer, n_embd=d), world) == NS_STEPS * max(load)

    def plan(rounds):
        return [[(owner, id(job)) for owner, job in r] for r in rounds]

    assert plan(assign(jobs, world)) == plan(rounds)  # the same plan every time: no rank is told it


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

