"""What each optimizer costs beside the model: its state in memory and the time of its step.

One entry per optimizer the trainer knows (model/optim.py OPTIMIZERS builds them on the node; cost/ may
not import torch). The recipe schema accepts exactly these names (cost/recipes.py), and the estimate
reads an optimizer's memory and extra step time (FLOPs and a time per matrix) here. A new optimizer is one
line in OPTIMIZERS below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from model.config import GPTConfig

# AdamW: two fp32 moments per parameter.
ADAMW_BYTES_PER_PARAM = 8
# Muon (model/muon.py) keeps one fp32 momentum buffer for the blocks' 2-D matrices and AdamW's two
# moments for the rest (embeddings, biases, LayerNorms).
MUON_BYTES_PER_PARAM = 4
# Newton-Schulz iterations per Muon step (model/muon.py NS_STEPS; cost/ may not import torch to read it)
NEWTON_SCHULZ_STEPS = 5


def hidden_matrix_params(m: GPTConfig) -> int:
    """The blocks' 2-D weights, Muon's share under optimizer muon: attention qkv (3d x d) and output (d x d),
    MLP up (4d x d) and down (d x 4d) = 12 d^2 per layer."""
    return m.n_layer * 12 * m.n_embd * m.n_embd


def adamw_bytes(m: GPTConfig) -> int:
    return ADAMW_BYTES_PER_PARAM * m.param_count(padded=True)


def muon_bytes(m: GPTConfig) -> int:
    hidden = hidden_matrix_params(m)
    return MUON_BYTES_PER_PARAM * hidden + ADAMW_BYTES_PER_PARAM * (m.param_count(padded=True) - hidden)


def newton_schulz_flops(m: GPTConfig, ranks: int = 1) -> int:
    """FLOPs of one Muon step's orthogonalizations on the busiest of `ranks` DDP ranks: model/muon.py splits
    the matrices over the ranks (assign(): each shape dealt out in turn, the next shape starting where the
    last ended), so each rank does ~1/ranks of them. Per iteration on an a x b matrix (a <= b, the smaller
    Gram matrix) X X^T 2a^2b, A A 2a^3, (..) X 2a^2b. The model FLOPs (6N + 12LdT) do not count them: at
    1558M it is ~5.9e13 per step on one rank, ~0.5% of a 1,048,576-token step's FLOPs (~4% of each of 8
    ranks' share if every rank did all of it), so the estimate adds it to the step time (at the same MFU:
    large bf16 matmuls, as efficient as the model's)."""
    d = m.n_embd
    # per layer: c_attn's q, k, v (orthogonalized as three d x d matrices) and attention out; MLP up; MLP down
    per_layer = {(d, d): 4, (4 * d, d): 1, (d, 4 * d): 1}
    load, first = [0] * ranks, 0
    for shape, count in per_layer.items():
        a, b = sorted(shape)
        for j in range(count * m.n_layer):
            load[(first + j) % ranks] += NEWTON_SCHULZ_STEPS * (4 * a * a * b + 2 * a**3)
        first += count * m.n_layer
    return max(load)


# fp32 master weights (model/step.py trains under autocast): what a checkpoint stores besides the state
CHECKPOINT_WEIGHT_BYTES_PER_PARAM = 4


def checkpoint_bytes(m: GPTConfig, optimizer: str = "adamw") -> int:
    """One checkpoint (model/checkpoint.py): the fp32 weights (the padded embedding, stored once) and the
    optimizer's state; the RNG and trainer state are kilobytes. 1558M with AdamW: 12 x 1.56e9 = 18.7 GB."""
    return CHECKPOINT_WEIGHT_BYTES_PER_PARAM * m.param_count(padded=True) + OPTIMIZERS[optimizer].state_bytes(m)


# ---- Muon's step time: its FLOPs, and a fixed time per matrix ----
# The FLOPs alone undercount Muon's step. modded-nanogpt measured what its Muon costs on 8xH100 at 124M: its
# record of 2024-10-14 (records/track_1_short/2024-10-14_ModernArch: 178.9 ms/step) and that of 2024-10-17
# (2024-10-17_DistributedMuon: 153.8 ms/step) differ only in that each rank orthogonalizes 1/8 of the
# matrices and the updates are all-reduced; held fixed: the model (12 layers, width 768, q, k, v, o and the
# MLP's two: 6 matrices a layer, 72), the 524,288-token batch, 5,100 steps, PyTorch 2.4.1, 5 compiled bf16
# Newton-Schulz iterations. So one rank's whole Muon step took (178.9 - 153.8) x 8/7 = 28.7 ms (a lower
# bound: the all-reduce the sharded record added is taken as free). Its FLOPs (1.63e12) at the calibrated
# 124M MFU on an H100 (40.7% of 989 TFLOPS) take 4.1 ms; the other 24.6 ms over 72 matrices is the time per
# matrix below: kernel launches, small matmuls far below the MFU, the momentum and update of each matrix.
# It is an H100 figure applied to every GPU, and a width-768 one applied to every width (wider matrices run
# their matmuls nearer the MFU, so at 1558M it likely overcounts: on the safe side for a bill).
MUON_ANCHOR = {"unsharded_ms": 178.9, "sharded_ms": 153.8, "ranks": 8, "n_layer": 12, "n_embd": 768,
               "matrices_per_layer": 6, "mfu": 0.407, "peak_tflops": 989.0}


def _seconds_per_matrix(a: dict = MUON_ANCHOR) -> float:
    whole = (a["unsharded_ms"] - a["sharded_ms"]) / 1e3 * a["ranks"] / (a["ranks"] - 1)
    m = GPTConfig(n_layer=a["n_layer"], n_head=12, n_embd=a["n_embd"])
    flops_seconds = newton_schulz_flops(m) / (a["mfu"] * a["peak_tflops"] * 1e12)
    return (whole - flops_seconds) / (a["n_layer"] * a["matrices_per_layer"])


MUON_SECONDS_PER_MATRIX = _seconds_per_matrix()  # ~0.34 ms


def newton_schulz_matrices(m: GPTConfig, ranks: int = 1) -> int:
    """Matrices the busiest of `ranks` orthogonalizes per step: c_attn's q, k, v, attention out, MLP up and down
    (6 a layer), dealt out in turn over the ranks (model/muon.py assign(): each shape continues where the last
    ended, so the counts differ by at most one)."""
    return -(-6 * m.n_layer // max(1, ranks))


@dataclass(frozen=True)
class OptimizerCost:
    state_bytes: Callable[[GPTConfig], int]  # its state, per GPU (every rank holds all of it)
    # (model, ranks) -> per step on the busiest rank, beyond the model's 6N + 12LdT
    step_flops: Callable[[GPTConfig, int], int] = lambda m, ranks=1: 0
    # (model, ranks) -> matrices the busiest rank handles one at a time per step, each seconds_per_matrix
    step_matrices: Callable[[GPTConfig, int], int] = lambda m, ranks=1: 0
    seconds_per_matrix: float = 0.0

    def step_seconds(self, m: GPTConfig, ranks: int, flops_per_second: float) -> float:
        """What the optimizer adds to each step, on the busiest rank (the others wait for it): its FLOPs at the
        model's achieved rate, plus its fixed time per matrix."""
        return self.step_flops(m, ranks) / flops_per_second + self.step_matrices(m, ranks) * self.seconds_per_matrix


OPTIMIZERS = {
    "adamw": OptimizerCost(adamw_bytes),
    "muon": OptimizerCost(muon_bytes, newton_schulz_flops, newton_schulz_matrices, MUON_SECONDS_PER_MATRIX),
}
