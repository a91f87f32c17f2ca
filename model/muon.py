"""Muon for the transformer blocks' 2-D weights, AdamW for everything else, in one optimizer.

Muon ("MomentUm Orthogonalized by Newton-Schulz") keeps a momentum buffer of the gradient, like SGD,
but before applying it replaces the update matrix G = U S V^T by (approximately) U V^T: every singular
direction moves by the same amount, so the few directions that dominate a raw gradient no longer crowd
out the rest. That only makes sense for matrices that map one hidden space to another: the attention and
MLP weights of the blocks. The token embedding (tied to the output head), the position embedding, the
biases and the LayerNorm gains stay on AdamW, with weight decay on the 2-D tensors only, exactly as
GPT.configure_optimizer splits them.

One torch.optim.Optimizer holds both kinds of param group (a group's "muon" flag says which), so
state_dict()/load_state_dict(), GradScaler.unscale_/step and the checkpoint code treat it like AdamW.

Under DDP the gradients are all-reduced before step() (and gradient accumulation only sums into .grad
before it), so every rank holds the same gradient, momentum and weights and computes the same update:
correct, with no extra communication. The price is that every rank runs Newton-Schulz on every matrix.
At GPT-2 1558M (48 blocks, width 1600, 5 iterations) that is ~5.5e13 FLOPs per step per rank, against
6N x 1,048,576 tokens = ~9.8e15 FLOPs of model work per step: ~0.6% on one GPU, ~4.5% of each rank's
share on 8 GPUs (124M on 8 GPUs: ~3%). Splitting the matrices over the ranks would remove most of it.
"""

from __future__ import annotations

import torch

from model.config import TrainConfig

# Coefficients of the quintic x -> a x + b x^3 + c x^5, applied to singular values. They are chosen to push
# every singular value in (0, 1] towards ~1 fast (to roughly 0.7-1.2, which is good enough), rather than to
# converge exactly to 1: five iterations suffice.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def orthogonalize(G: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """Approximately U V^T for G = U S V^T (a 2-D tensor), by Newton-Schulz iteration."""
    a, b, c = NS_COEFFS
    # bf16 on the GPU (the iteration tolerates it and tensor cores run it fast); fp32 on the CPU
    X = G.bfloat16() if G.is_cuda else G.float()
    tall = X.size(0) > X.size(1)
    if tall:
        X = X.T  # iterate on the smaller Gram matrix X X^T
    X = X / (X.norm() + 1e-7)  # Frobenius norm >= spectral norm: all singular values now <= 1
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    if tall:
        X = X.T
    return X.to(G.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """Muon for groups with muon=True, AdamW for the others. Each group carries its own lr and weight_decay.

    Muon group keys: lr, momentum, nesterov, weight_decay. AdamW group keys: lr, betas, eps, weight_decay.
    """

    def __init__(self, param_groups, lr: float = 1e-3, momentum: float = 0.95, nesterov: bool = True,
                 betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, betas=betas, eps=eps,
                        weight_decay=weight_decay, muon=False)
        super().__init__(param_groups, defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon groups hold 2-D matrices only")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group):
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.mul_(mu).add_(p.grad)
            # Nesterov: step along the gradient plus the momentum it is about to join
            update = p.grad.add(buf, alpha=mu) if group["nesterov"] else buf
            update = orthogonalize(update)
            # U V^T has unit singular values, so its RMS entry is 1/sqrt(max dim); scaling by sqrt(rows/cols)
            # for tall matrices gives every matrix (including the 4x-wide MLP ones) a similar per-entry step.
            scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
            if wd:
                p.mul_(1.0 - lr * wd)  # decoupled, as in AdamW
            p.add_(update, alpha=-lr * scale)

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
    """cfg.optimizer "muon" (model/optim.py's registry): MuonAdamW over muon_param_groups."""
    if not cfg.lr > 0:
        raise ValueError("the muon optimizer needs lr > 0 (its groups' lr is a ratio of it)")
    return MuonAdamW(muon_param_groups(raw_model, cfg), lr=cfg.lr, momentum=cfg.muon_momentum,
                     betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
