"""What each optimizer costs beside the model: its state in memory and the FLOPs of its step.

One entry per optimizer the trainer knows (model/optim.py OPTIMIZERS builds them on the node; cost/ may
not import torch). The recipe schema accepts exactly these names (cost/recipes.py), and the estimate
reads an optimizer's memory and extra FLOPs here. A new optimizer is one line in OPTIMIZERS below.
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


def newton_schulz_flops(m: GPTConfig) -> int:
    """FLOPs of one Muon step's orthogonalizations, which every rank does in full (model/muon.py): per
    iteration on an a x b matrix (a <= b, the smaller Gram matrix) X X^T 2a^2b, A A 2a^3, (..) X 2a^2b.
    The model FLOPs (6N + 12LdT) do not count them: at 1558M it is ~5.5e13 per step per rank, ~0.5% of
    a 1,048,576-token step's FLOPs on one GPU but ~4% of each rank's share on 8, so the estimate adds it
    to the step time (at the same MFU: large bf16 matmuls, as efficient as the model's)."""
    d = m.n_embd
    per_layer = 0
    for rows, cols in ((3 * d, d), (d, d), (4 * d, d), (d, 4 * d)):  # qkv, attention out, MLP up, MLP down
        a, b = sorted((rows, cols))
        per_layer += NEWTON_SCHULZ_STEPS * (4 * a * a * b + 2 * a**3)
    return m.n_layer * per_layer


# fp32 master weights (model/step.py trains under autocast): what a checkpoint stores besides the state
CHECKPOINT_WEIGHT_BYTES_PER_PARAM = 4


def checkpoint_bytes(m: GPTConfig, optimizer: str = "adamw") -> int:
    """One checkpoint (model/checkpoint.py): the fp32 weights (the padded embedding, stored once) and the
    optimizer's state; the RNG and trainer state are kilobytes. 1558M with AdamW: 12 x 1.56e9 = 18.7 GB."""
    return CHECKPOINT_WEIGHT_BYTES_PER_PARAM * m.param_count(padded=True) + OPTIMIZERS[optimizer].state_bytes(m)


@dataclass(frozen=True)
class OptimizerCost:
    state_bytes: Callable[[GPTConfig], int]  # its state, per GPU (every rank holds all of it)
    step_flops: Callable[[GPTConfig], int] = lambda m: 0  # per step per rank, beyond the model's 6N + 12LdT


OPTIMIZERS = {
    "adamw": OptimizerCost(adamw_bytes),
    "muon": OptimizerCost(muon_bytes, newton_schulz_flops),
}
