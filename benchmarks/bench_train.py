"""Time the trainer's real training step (model/train.py: train_step) for a recipe and micro-batch.

    python benchmarks/bench_train.py --recipe gpt2-124m --micro-batch 16 --steps 20 --compile --device cuda
    python benchmarks/bench_train.py --recipe gpt2-tiny --micro-batch 8 --steps 10 --device cpu
    python benchmarks/bench_train.py --recipe gpt2-124m --nproc 8 --compile   # DDP over 8 GPUs (torchrun)

One process per GPU (--nproc N re-runs itself under torchrun: DDP as the trainer wraps it), the
recipe's gradient accumulation for that many ranks unless --accum is given, random tokens (the data loader is not what is measured), warm-up steps excluded
(torch.compile compiles during them). Prints tokens/s, step time, MFU, peak memory, and a point in
the form of gpt2cloud/cost/tables/calibration.yaml. MFU = tokens/s x (6N + 12*L*d*T) / peak dense BF16
FLOPS, N at vocabulary 50257; the peak comes from gpt2cloud/cost/tables/gpus.yaml (--gpu, or guessed from
the CUDA device name), so it is empty on a CPU unless --peak-tflops is given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from gpt2cloud.cost.hardware import gpu_from_device_name, gpu_spec  # noqa: E402
from gpt2cloud.cost.recipes import load_recipe  # noqa: E402
from model.train import setup_training, train_step  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402


class RandomBatches:
    """Stands in for TokenLoader: (x, y) of random real-vocabulary tokens, made once."""

    def __init__(self, B, T, vocab_size, n=4):
        g = torch.Generator().manual_seed(0)
        self.batches = [torch.randint(0, vocab_size, (B, T + 1), generator=g) for _ in range(n)]
        self.i = 0

    def next_batch(self):
        buf = self.batches[self.i % len(self.batches)]
        self.i += 1
        return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()


def guess_gpu(device: str) -> str | None:
    """Our table's name for the CUDA device (e.g. 'NVIDIA H100 80GB HBM3' -> H100), or None."""
    if not device.startswith("cuda"):
        return None
    return gpu_from_device_name(torch.cuda.get_device_name(device),
                                torch.cuda.get_device_properties(device).total_memory / 2**30)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="gpt2-tiny")
    p.add_argument("--micro-batch", type=int, default=None, help="default: the recipe's")
    p.add_argument("--accum", type=int, default=None,
                   help="micro-steps per step (default: the recipe's tokens per step over micro-batch x T x nproc)")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) under torchrun, DDP-wrapped as the trainer")
    p.add_argument("--memory-cap-gb", type=float, default=None,
                   help="CUDA: cap this process at this many GB (torch.cuda.set_per_process_memory_fraction)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--gpu", default=None, help="GPU name in gpus.yaml for the peak FLOPS (default: guessed)")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the peak (e.g. for a CPU)")
    a = p.parse_args(argv)

    if a.nproc > 1 and "RANK" not in os.environ:  # re-run under torchrun, one process per GPU
        args = list(argv if argv is not None else sys.argv[1:])
        for i, arg in enumerate(args):  # torchrun would take --nproc for its own --nproc-per-node
            if arg == "--nproc":
                del args[i: i + 2]
                break
            if arg.startswith("--nproc="):
                del args[i]
                break
        sys.exit(subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  f"--nproc_per_node={a.nproc}", __file__, *args]))
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    ddp = world > 1
    cfg = load_recipe(a.recipe).to_train_config(micro_batch=a.micro_batch, compile=a.compile, dtype=a.dtype)
    a.accum = a.accum or cfg.grad_accum(world)
    B, T = cfg.micro_batch, cfg.model.block_size
    device, device_type = a.device, "cuda" if a.device.startswith("cuda") else "cpu"
    if device_type == "cuda" and ddp:
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    if device_type == "cuda" and a.memory_cap_gb:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.memory_cap_gb * 1e9 / total), device)
    s = setup_training(cfg, device)  # exactly what the trainer builds
    raw_model, dtype = s.raw_model, s.dtype
    model = s.model
    if ddp:  # as the trainer wraps it
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None, gradient_as_bucket_view=True)
    data = RandomBatches(B, T, cfg.model.vocab_size)

    def step():
        t0 = time.perf_counter()
        loss, _ = train_step(model, s.optimizer, s.scaler, data, a.accum, s.amp, cfg.grad_clip, cfg.lr, ddp, device)
        loss.item()  # waits for the device
        return time.perf_counter() - t0

    t_warm = time.perf_counter()
    for _ in range(a.warmup):
        step()
    warmup_s = time.perf_counter() - t_warm
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = [step() for _ in range(a.steps)]

    tokens = B * T * a.accum * world
    dt = statistics.median(times)
    tok_s = tokens / dt
    n_params = raw_model.num_params()
    fpt = cfg.model.flops_per_token()
    gpu = a.gpu or guess_gpu(device)
    peak = a.peak_tflops * 1e12 if a.peak_tflops else (gpu_spec(gpu).peak_bf16_tflops * 1e12 if gpu else None)
    mfu = tok_s * fpt / (peak * world) if peak else None
    if ddp:
        dist.destroy_process_group()
    if rank != 0:
        return
    if a.json:
        print(json.dumps({"recipe": a.recipe, "tokens_per_second": tok_s, "step_seconds": dt, "mfu": mfu,
                          "micro_batch": B, "accum": a.accum, "nproc": world, "compile": a.compile,
                          "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30
                          if device_type == "cuda" else None}))
        return
    if device_type == "cuda":
        mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (CUDA max allocated)"
        where = torch.cuda.get_device_name(device)
    else:
        mem = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process peak RSS)"
        where = f"CPU, {torch.get_num_threads()} threads"
    precision = str(dtype).removeprefix("torch.")
    rows = [
        ("recipe", f"{a.recipe}: {n_params:,} parameters, {cfg.model.n_layer} layers x {cfg.model.n_embd}, T={T}"),
        ("device", where),
        ("step", f"micro-batch {B} x {T} x {a.accum} micro-steps x {world} ranks = {tokens:,} tokens, {precision}, "
                 f"compile {'on' if a.compile else 'off'}"),
        ("tokens/s", f"{tok_s:,.0f}"),
        ("step time", f"{dt * 1000:.1f} ms median of {a.steps} (min {min(times) * 1000:.1f}, "
                      f"max {max(times) * 1000:.1f}); warm-up {warmup_s:.1f} s"),
        ("MFU", f"{mfu:.1%} of {peak / 1e12:g} TFLOPS ({gpu or 'given'})" if mfu is not None
                else "n/a (no peak FLOPS for this device; give --gpu or --peak-tflops)"),
        ("FLOPs/token", f"{fpt:.3e} (6N + 12*L*d*T)"),
        ("peak memory", mem),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print("\n# calibration point (gpt2cloud/cost/tables/calibration.yaml)")
    print(f"  - gpu: {gpu or ('cpu' if device_type == 'cpu' else 'unknown')}")
    print(f"    params: {n_params}")
    print(f"    mfu: {round(mfu, 3) if mfu is not None else 'null'}")
    print("    kind: measured")
    print(f'    source: "benchmarks/bench_train.py: gpt2cloud trainer, {a.recipe}, micro-batch {B} x {T}, '
          f'{precision}, compile {"on" if a.compile else "off"}, 1 {"GPU" if device_type == "cuda" else "CPU"} '
          f'({where}), {tok_s:,.0f} tokens/s"')
    print(f'    date: "{datetime.date.today():%Y-%m}"')


if __name__ == "__main__":
    main()
