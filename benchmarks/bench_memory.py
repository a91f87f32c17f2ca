"""Trace the peak memory of the trainer's real training step, without the memory (or a GPU).

    python benchmarks/bench_memory.py --recipe gpt2-1558m --micro-batch 16
    python benchmarks/bench_memory.py --recipe gpt2-124m --micro-batch 64 --json

The model is model.gpt.GPT as setup_training builds it (minus the compile), the step is model/train.py's train_step (bf16
autocast forward, backward, clip, fused AdamW step), run on fake tensors
(torch._subclasses.fake_tensor.FakeTensorMode): shapes and dtypes are computed, nothing is allocated,
so GPT-2 1558M traces in seconds on a laptop. A dispatch mode watches every tensor storage the step
creates and frees and reports the peak of the live bytes, split by kind (weights, bf16_weights,
gradients, optimizer, activations, logits, temporaries, other).

How the GPU step is emulated on this CPU:
- CUDA tensors cannot be faked with a CPU-only torch (autograd asks the CUDA device guard), so the
  fake tensors are CPU tensors, under CPU bf16 autocast. For the ops this model uses the CPU and CUDA
  autocast lists agree: linear/matmul and scaled_dot_product_attention run in bf16; layer_norm, GELU
  and the residual adds see the fp32 residual stream or the bf16 matmul outputs alike; the loss is
  taken on an explicit .float() of the logits. Autocast caches the bf16 weight copies for the forward
  on both devices.
- scaled_dot_product_attention takes the flash path on both (no T x T matrix; q, k, v, out and a
  logsumexp are saved).
- AdamW is the fused one, as on CUDA (configure_optimizer(..., "cuda")): no foreach temporaries.
- Each storage is rounded up to 512 bytes, as the CUDA caching allocator does.
Not counted (the estimate's fixed overhead covers them): the CUDA context, cuBLAS workspaces, NCCL
buffers and the caching allocator's fragmentation. The model is traced eager (torch.compile fuses
some elementwise ops and usually needs a little less activation memory) and on one rank: with DDP's
gradient_as_bucket_view the gradient buckets are the .grad tensors, so DDP adds no copy.

By default the step accumulates over 2 micro-steps and 2 steps are traced: the peak is the steady
state, with the optimizer state and the gradients of the earlier micro-steps alive during a forward.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import weakref
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from gpt2cloud.cost.recipes import load_recipe
from model.config import TrainConfig
from model.gpt import GPT
from model.optim import build_optimizer
from model.train import train_step

GIB = 2**30
CUDA_BLOCK = 512  # the CUDA caching allocator rounds every allocation up to 512 bytes
KINDS = ("weights", "bf16_weights", "gradients", "optimizer", "activations", "logits", "temporaries", "other")


class StorageTracker(TorchDispatchMode):
    """Live bytes of every tensor storage created under it (plus the ones registered), by kind; the peak."""

    def __init__(self, vocab: int, param_shapes: set, round_to: int = CUDA_BLOCK):
        super().__init__()
        self.vocab, self.param_shapes, self.round_to = vocab, param_shapes, round_to
        self.live: dict[int, list] = {}  # id(storage) -> [bytes, kind, weakref]
        self.totals = dict.fromkeys(KINDS, 0)
        self.current = self.peak = 0
        self.peak_by_kind = dict(self.totals)
        self.phase = "other"  # forward | optimizer | other (backward is asked of autograd)

    def _bytes(self, st) -> int:
        n = st.nbytes()
        return -(-n // self.round_to) * self.round_to if self.round_to > 1 else n

    def add(self, t: torch.Tensor, kind: str) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self.live:
            return
        n = self._bytes(st)
        self.live[key] = [n, kind, weakref.ref(st, lambda _r, k=key: self._free(k))]
        self.totals[kind] += n
        self.current += n
        if self.current > self.peak:
            self.peak, self.peak_by_kind = self.current, dict(self.totals)

    def _free(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.totals[entry[1]] -= entry[0]
            self.current -= entry[0]

    def reclassify(self, t: torch.Tensor, kind: str) -> None:
        entry = self.live.get(id(t.untyped_storage()))
        if entry is None:
            self.add(t, kind)
        elif entry[1] != kind:
            self.totals[entry[1]] -= entry[0]
            self.totals[kind] += entry[0]
            entry[1] = kind

    def kind_of(self, t: torch.Tensor) -> str:
        backward = torch._C._current_graph_task_id() != -1
        if self.phase == "optimizer":
            return "optimizer"
        shape = tuple(t.shape)
        if t.dtype == torch.bfloat16 and shape in self.param_shapes and not backward:
            return "bf16_weights"  # autocast's cached bf16 copy of a weight
        if t.dim() >= 2 and shape[-1] == self.vocab and shape not in self.param_shapes:
            return "logits"  # bf16 logits, their fp32 copy, log-softmax, and their gradients
        if backward:
            return "temporaries"  # gradients of activations (parameter gradients are moved to "gradients")
        return "activations" if self.phase == "forward" else "other"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.add(t, self.kind_of(t))
        return out


class RandomBatches:
    """Stands in for TokenLoader: (x, y) token ids, made on each call (as the loader's copy would be)."""

    def __init__(self, B: int, T: int):
        self.B, self.T = B, T

    def next_batch(self):
        return (torch.zeros((self.B, self.T), dtype=torch.long), torch.zeros((self.B, self.T), dtype=torch.long))


def trace_step(cfg: TrainConfig, accum: int = 2, steps: int = 2, fake: bool = True) -> dict:
    """Peak bytes (and bytes by kind at the peak) of `steps` train_steps of `accum` micro-steps each.

    fake=False runs the same on real CPU tensors (for a tiny model: to check the fake run against)."""
    cfg = dataclasses.replace(cfg, compile=False, dtype="fp32")  # eager; autocast is set below
    with ExitStack() as stack:
        if fake:
            stack.enter_context(FakeTensorMode())
        # setup_training's model, without its .to(device) (which fake tensors cannot swap in place)
        torch.manual_seed(cfg.seed)
        model = GPT(cfg.model)
        # the optimizer the trainer builds on CUDA: fused AdamW (it also runs on CPU tensors), or Muon + AdamW
        optimizer = build_optimizer(model, cfg, "cuda")
        amp = lambda: torch.autocast(device_type="cpu", dtype=torch.bfloat16)
        scaler = torch.amp.GradScaler("cpu", enabled=False)  # bf16: no loss scaling
        params = list(model.parameters())
        tracker = StorageTracker(cfg.model.padded_vocab_size, {tuple(p.shape) for p in params if p.dim() >= 2})
        for p in params:
            tracker.add(p, "weights")
            p.register_post_accumulate_grad_hook(lambda p: tracker.reclassify(p.grad, "gradients"))

        def set_phase(name):
            def hook(*_a, **_k):
                tracker.phase = name
            return hook

        model.register_forward_pre_hook(set_phase("forward"))
        model.register_forward_hook(set_phase("other"))
        optimizer.register_step_pre_hook(set_phase("optimizer"))
        optimizer.register_step_post_hook(set_phase("other"))
        loader = RandomBatches(cfg.micro_batch, cfg.model.block_size)
        with tracker:
            for _ in range(steps):
                train_step(model, optimizer, scaler, loader, accum, amp, cfg.grad_clip, cfg.lr, False, "cpu")
        result = {
            "peak_bytes": tracker.peak,
            "peak_gib": tracker.peak / GIB,
            "by_kind": {k: v / GIB for k, v in tracker.peak_by_kind.items() if v},
            "params": sum(p.numel() for p in params),
        }
    return result


def trace_recipe(recipe: str, micro_batch: int | None = None, accum: int = 2, steps: int = 2) -> dict:
    cfg = load_recipe(recipe).to_train_config(micro_batch=micro_batch)
    return {"recipe": recipe, "micro_batch": cfg.micro_batch, **trace_step(cfg, accum=accum, steps=steps)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="gpt2-124m")
    p.add_argument("--micro-batch", type=int, default=None, help="default: the recipe's")
    p.add_argument("--accum", type=int, default=2, help="micro-steps per step (2: gradients live in a forward)")
    p.add_argument("--steps", type=int, default=2, help="steps traced (2: the optimizer state exists)")
    p.add_argument("--json", action="store_true", help='print {"peak_gib": ..., "by_kind": {...}}')
    p.add_argument("--estimate", action="store_true", help="also show gpt2cloud's estimate (memory_per_gpu)")
    a = p.parse_args(argv)

    r = trace_recipe(a.recipe, a.micro_batch, a.accum, a.steps)
    est = None
    if a.estimate or not a.json:
        from gpt2cloud.cost.estimate import memory_per_gpu
        cfg = load_recipe(a.recipe).to_train_config(micro_batch=r["micro_batch"])
        est = memory_per_gpu(cfg.model, r["micro_batch"], cfg.optimizer)
    if a.json:
        out = {"recipe": r["recipe"], "micro_batch": r["micro_batch"], "peak_gib": round(r["peak_gib"], 3),
               "by_kind": {k: round(v, 3) for k, v in r["by_kind"].items()}}
        if est is not None:
            out["estimate_gib"] = round(est.total_gib, 3)
        print(json.dumps(out))
        return
    print(f"{a.recipe}, micro-batch {r['micro_batch']} x {a.accum} micro-steps, {r['params']:,} parameters "
          f"(fake tensors, bf16 autocast, fused AdamW, eager)")
    for k, v in sorted(r["by_kind"].items(), key=lambda kv: -kv[1]):
        print(f"  {k:<14} {v:8.2f} GiB")
    print(f"  {'peak (traced)':<14} {r['peak_gib']:8.2f} GiB")
    print(f"  {'estimate':<14} {est.total_gib:8.2f} GiB (memory_per_gpu, incl. {est.overhead_gib:g} GiB fixed overhead)")


if __name__ == "__main__":
    main()
