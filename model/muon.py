"""Muon for the transformer blocks' 2-D weights, AdamW for everything else, in one optimizer.

Muon ("MomentUm Orthogonalized by Newton-Schulz") keeps a momentum buffer of the gradient, like SGD,
but before applying it replaces the update matrix G = U S V^T by (approximately) U V^T: every singular
direction moves by the same amount, so the few directions that dominate a raw gradient no longer crowd
out the rest. That only makes sense for matrices that map one hidden space to another: the attention and
MLP weights of the blocks. The token embedding (tied to the output head), the position embedding, the
biases and the LayerNorm gains stay on AdamW, with weight decay on the 2-D tensors only, exactly as
GPT.configure_optimizer splits them.

The attention's c_attn weight stacks three maps, q, k and v (3C x C, model/gpt.py). They are three
matrices, so Newton-Schulz orthogonalizes each C x C block on its own, as implementations that keep q, k
and v apart do (modded-nanogpt): one orthogonalization of the stack shares one set of unit singular values
among the three, so a large q gradient would shrink the k and v updates.

One torch.optim.Optimizer holds both kinds of param group (a group's "muon" flag says which), so
state_dict()/load_state_dict(), GradScaler.unscale_/step and the checkpoint code treat it like AdamW.
The state is one momentum buffer per Muon matrix, whatever the blocks and ranks.

Under DDP the gradients are all-reduced before step(), so every rank holds the same gradient, momentum and
weights. Newton-Schulz is the expensive part (at GPT-2 1558M, 48 blocks of width 1600, ~5.9e13 FLOPs per
step, ~4% of each rank's share of the model's work on 8 GPUs), so the ranks split it: each
orthogonalizes 1/W of the matrices and all-gathers the results, and every rank then applies the same
update to its weights. Every matrix is computed by exactly the ops a single process runs, so the weights
are bit-identical to a one-rank step's (tests/test_muon_sharded.py). The price is one all-gather of the
results per step, in bf16 on GPUs: 2.9 GB at 1558M (0.17 GB at 124M), a quarter of the traffic of DDP's
fp32 gradient all-reduce, and it overlaps the next matrices' Newton-Schulz.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from model.config import TrainConfig

# Coefficients of the quintic x -> a x + b x^3 + c x^5, applied to singular values. They are chosen to push
# every singular value in (0, 1] towards ~1 fast (to roughly 0.7-1.2, which is good enough), rather than to
# converge exactly to 1: five iterations suffice. The same values as torch.optim.Muon's defaults.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7  # the smallest norm divided by: matters only for a (nearly) all-zero update

# all_gather_single is torch 2.13's name; older torch (a node image's own) has all_gather_into_tensor
_all_gather = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)


def ns_dtype(device: torch.device) -> torch.dtype:
    """Newton-Schulz's precision: bf16 on the GPU (the iteration tolerates it and tensor cores run it
    fast), fp32 on the CPU (most CPUs have no fast bf16 matmul)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def orthogonalize(G: torch.Tensor, steps: int = NS_STEPS, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximately U V^T for G = U S V^T (a 2-D tensor), by Newton-Schulz iteration, computed and
    returned in `dtype` (default ns_dtype(G.device)). In bf16 it is bit-identical to torch.optim.Muon's
    iteration (the same ops: tests/test_muon.py)."""
    a, b, c = NS_COEFFS
    X = G.to(dtype or ns_dtype(G.device))
    tall = X.size(0) > X.size(1)
    if tall:
        X = X.T  # iterate on the smaller Gram matrix X X^T
    X = X / X.norm().clamp(min=NS_EPS)  # Frobenius norm >= spectral norm: all singular values now <= 1
    for _ in range(steps):
        A = X @ X.T
        B = torch.addmm(A, A, A, beta=b, alpha=c)  # b A + c A A, one kernel
        X = torch.addmm(X, B, X, beta=a)  # a X + B X
    if tall:
        X = X.T
    return X


@dataclasses.dataclass(eq=False)
class Job:
    """One matrix for Newton-Schulz: a whole Muon parameter, or one row block of it (c_attn's q, k or v)."""

    p: torch.Tensor
    rows: slice
    group: dict

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows.stop - self.rows.start, self.p.size(1))


def assign(jobs: list[Job], world: int) -> list[list[tuple[int, Job]]]:
    """Rounds of at most `world` same-shaped jobs, each job with the rank that orthogonalizes it.

    Every rank builds the same list from the same parameters, so no rank needs to be told the plan. Within
    one shape the jobs go to the ranks in turn, so the counts differ by at most one; the next shape starts
    at the rank after the last one used, so those extra jobs go round too: every rank ends up with the same
    work, within one matrix. One round is one all-gather of same-sized results."""
    by_shape: dict[tuple[int, int], list[Job]] = {}
    for job in jobs:
        by_shape.setdefault(job.shape, []).append(job)
    rounds, first = [], 0
    for same in by_shape.values():
        for i in range(0, len(same), world):
            rounds.append([((first + i + j) % world, job) for j, job in enumerate(same[i:i + world])])
        first += len(same)
    return rounds


class MuonAdamW(torch.optim.Optimizer):
    """Muon for groups with muon=True, AdamW for the others. Each group carries its own lr and weight_decay.

    Muon group keys: lr, momentum, nesterov, weight_decay. AdamW group keys: lr, betas, eps, weight_decay.
    blocks: parameter -> the number of equal row blocks Newton-Schulz treats as separate matrices (c_attn:
    3). shard: split Newton-Schulz over the ranks of torch.distributed's default process group (every rank
    must then call step() together, as DDP training does). Neither is optimizer state: a checkpoint holds
    the same thing with or without them.
    """

    def __init__(self, param_groups, lr: float = 1e-3, momentum: float = 0.95, nesterov: bool = True,
                 betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0, blocks: dict | None = None,
                 shard: bool = False):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, betas=betas, eps=eps,
                        weight_decay=weight_decay, muon=False)
        super().__init__(param_groups, defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon groups hold 2-D matrices only")
        self.blocks = dict(blocks or {})
        for p, n in self.blocks.items():
            if p.size(0) % n:
                raise ValueError(f"a {tuple(p.shape)} matrix does not split into {n} equal row blocks")
        self.shard = shard

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        muon_groups = [g for g in self.param_groups if g["muon"]]
        if muon_groups:
            self._muon_step(muon_groups)
        for group in self.param_groups:
            if not group["muon"]:
                self._adamw_step(group)
        return loss

    def _muon_step(self, groups):
        """Momentum and weight decay on every rank; each job's Newton-Schulz on the rank assign() names, the
        results all-gathered a round at a time (the next round computes while one is in flight)."""
        rank, world = (dist.get_rank(), dist.get_world_size()) if self.shard else (0, 1)
        jobs = []
        for group in groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                state["momentum_buffer"].mul_(mu).add_(p.grad)
                if wd:
                    p.mul_(1.0 - lr * wd)  # decoupled, as in AdamW; the update below does not read p
                rows = p.size(0) // self.blocks.get(p, 1)
                jobs += [Job(p, slice(r, r + rows), group) for r in range(0, p.size(0), rows)]
        in_flight = None  # (round, gather's work handle, its output, its input: held until the gather is done)
        for round_ in assign(jobs, world):
            started = (round_, *self._orthogonalize_round(round_, rank, world))
            if in_flight is not None:
                self._apply_round(*in_flight[:3], world)
            in_flight = started
        if in_flight is not None:
            self._apply_round(*in_flight[:3], world)

    def _orthogonalize_round(self, round_, rank, world):
        """This rank's job of the round orthogonalized (zeros if it has none), and the all-gather of every
        rank's result started: (the work handle or None, the buffer the results land in, this rank's result,
        kept alive until the gather has read it)."""
        first = round_[0][1]
        dtype = ns_dtype(first.p.device)
        mine = next((orthogonalize(self._update(job), dtype=dtype) for owner, job in round_ if owner == rank), None)
        if mine is None:  # this rank sits the round out (the last round of a shape); its slot is never read
            mine = torch.zeros(first.shape, dtype=dtype, device=first.p.device)
        if world == 1:
            return None, mine, mine
        # in ns_dtype: exactly the values the owner computed (bf16 on a GPU: half the bytes of fp32)
        gathered = torch.empty((world * mine.size(0), mine.size(1)), dtype=mine.dtype, device=mine.device)
        return _all_gather(gathered, mine, async_op=True), gathered, mine

    def _update(self, job: Job) -> torch.Tensor:
        """The matrix Muon orthogonalizes: the momentum, or with Nesterov the gradient plus the momentum it
        is about to join."""
        g = job.p.grad[job.rows]
        buf = self.state[job.p]["momentum_buffer"][job.rows]
        return g.add(buf, alpha=job.group["momentum"]) if job.group["nesterov"] else buf

    @staticmethod
    def _apply_round(round_, work, gathered, world):
        if work is not None:
            work.wait()  # bounded by the process group's timeout
        results = gathered.view(world, *round_[0][1].shape)
        for owner, job in round_:
            rows, cols = job.shape
            # U V^T has unit singular values, so its RMS entry is 1/sqrt(max(rows, cols)); sqrt(max(1, rows/cols))
            # makes it 1/sqrt(cols) for every matrix, tall or wide (torch.optim.Muon's "original" rule). The rule
            # is the block's: a c_attn block is square (scale 1), so each of q, k, v gets the RMS step the
            # whole 3C x C stack got with its sqrt(3).
            scale = max(1.0, rows / cols) ** 0.5
            job.p[job.rows].add_(results[owner].to(job.p.dtype), alpha=-job.group["lr"] * scale)

    def _adamw_step(self, group):
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            if state["step"].device.type != "cpu":  # a checkpoint loaded with map_location=cuda
                state["step"] = state["step"].cpu()  # keep it on the host: reading it then costs no sync
            state["step"] += 1
            step = state["step"]  # a 0-d host tensor: the corrections below never read it back (.item()),
            m, v = state["exp_avg"], state["exp_avg_sq"]  # so benchmarks/bench_memory.py can trace this too
            m.lerp_(p.grad, 1.0 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
            if wd:
                p.mul_(1.0 - lr * wd)
            # bias-corrected m / (sqrt(v) + eps), folded into the step size and the denominator
            update = v.div(1.0 - beta2**step).sqrt_().add_(eps)  # one temporary, reused for the update
            update.reciprocal_().mul_(m).mul_(-lr / (1.0 - beta1**step))
            p.add_(update)


def muon_param_groups(raw_model, cfg: TrainConfig) -> list[dict]:
    """The 2-D weights inside the transformer blocks on Muon; the embeddings/head, biases and LayerNorm
    on AdamW (decay on 2-D tensors only). lr_ratio: each group's lr relative to the schedule's cfg.lr."""
    block_params = {id(p) for p in raw_model.transformer.h.parameters()}
    params = [p for p in raw_model.parameters() if p.requires_grad]  # the tied wte/lm_head appears once
    hidden = [p for p in params if p.dim() == 2 and id(p) in block_params]
    other_2d = [p for p in params if p.dim() >= 2 and id(p) not in block_params]
    other_1d = [p for p in params if p.dim() < 2]
    muon_ratio = cfg.muon_lr / cfg.lr
    return [
        dict(params=hidden, muon=True, lr=cfg.muon_lr, lr_ratio=muon_ratio, momentum=cfg.muon_momentum,
             weight_decay=cfg.muon_weight_decay),
        dict(params=other_2d, muon=False, lr=cfg.lr, lr_ratio=1.0, weight_decay=cfg.weight_decay),
        dict(params=other_1d, muon=False, lr=cfg.lr, lr_ratio=1.0, weight_decay=0.0),
    ]


def muon_optimizer(raw_model, cfg: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    """cfg.optimizer "muon" (model/optim.py's registry): MuonAdamW over muon_param_groups, c_attn's q, k and
    v orthogonalized as three matrices, Newton-Schulz split over the ranks when a process group is up (the
    trainer starts it before it builds the optimizer: model/startup.py)."""
    if not cfg.lr > 0:
        raise ValueError("the muon optimizer needs lr > 0 (its groups' lr is a ratio of it)")
    qkv = {block.attn.c_attn.weight: 3 for block in raw_model.transformer.h}
    shard = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return MuonAdamW(muon_param_groups(raw_model, cfg), lr=cfg.lr, momentum=cfg.muon_momentum,
                     betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, blocks=qkv, shard=shard)
