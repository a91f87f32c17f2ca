"""One part of benchmarks/gpu_check.sh: measures, appends one JSON row to the results file, prints it.

    python benchmarks/gpu_check.py PART [PART...] --results FILE [--dry]
    python benchmarks/gpu_check.py table FILE           # the rows of a results file, two lines each

PART is one of PARTS below. Every row holds what was measured and, beside it, the estimate's figure for
exactly that step (gpt2cloud/cost/estimate.py estimate_config: the same recipe, micro-batch, accumulation
and one GPU of the type found). --dry runs the same code on the CPU with each recipe cut to a tiny model
(2 layers, width 64, context 64, a 512-token vocabulary), no compile: it checks the plumbing, not the GPU.

Step rows time the trainer's own step (model/step.py setup_training + train_step, bf16 autocast, compiled
as the recipes train): warm-up steps first (compilation happens there), then the median of the timed
steps. The optimizer's share is timed around optimizer.step() with the device synchronized on both sides.

Memory, compared like with like:
- peak_allocated_gib: torch.cuda.max_memory_allocated, tensors only (what the caching allocator handed
  out), of the compiled step; beside it estimate_tensors_gib, the estimate's total less its fixed
  overhead (weights, bf16 copies, gradients, optimizer state, activations, logits), which models the
  eager step (bench_memory.py's trace): compiled steps usually keep a little less.
- device_used_gib: everything this process holds on the GPU (total - free from cudaMemGetInfo after the
  steps: the CUDA context, cuBLAS workspaces and the allocator's reserved pool, fragmentation included);
  beside it estimate_gib, the estimate's total, which adds a fixed 3 GiB for exactly those.
- peak_reserved_gib (the allocator's pool at its largest) is shown for the fragmentation it implies.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 2**30
# part -> (recipe, micro-batch: None = the recipe's, micro-steps per step, timed steps, warm-up steps)
PARTS = {
    "124m-adamw": ("gpt2-124m", None, 1, 10, 3),
    "124m-muon": ("gpt2-124m-fast", None, 1, 10, 3),
    "1558m": ("gpt2-1558m", None, 1, 3, 2),
    "1558m-fast": ("gpt2-1558m-fast", None, 1, 3, 2),
}
TITLES = {"info": "device", "124m-adamw": "124M AdamW", "124m-muon": "124M Muon", "1558m": "1558M AdamW",
          "1558m-fast": "1558M Muon", "small": "HellaSwag / checkpoint"}


def tiny(cfg):
    """The recipe's config cut to a CPU-sized model (the same optimizer and schedule)."""
    model = dataclasses.replace(cfg.model, n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=512,
                                padded_vocab_size=512)
    return dataclasses.replace(cfg, model=model, micro_batch=2, tokens_per_step=2 * 64, compile=False)


def device_info(dry: bool) -> tuple[str, str | None, str]:
    """(torch device, our GPU table's name or None, the device's own name)."""
    import torch

    from gpt2cloud.cost.hardware import gpu_from_device_name

    if dry or not torch.cuda.is_available():
        if not dry:
            raise SystemExit("error: no CUDA device (use --dry to check the plumbing on a CPU)")
        return "cpu", "CPU", "CPU (dry run)"
    name = torch.cuda.get_device_name(0)
    return "cuda", gpu_from_device_name(name, torch.cuda.get_device_properties(0).total_memory / GIB), name


def estimate_for(name: str, cfg, gpu: str | None) -> dict:
    """The estimate's figures for exactly this step on one GPU of this type (H100's when the type is unknown)."""
    from gpt2cloud.cost.estimate import estimate_config, memory_per_gpu

    e = estimate_config(name, cfg, gpu or "H100", 1, price=1.0, check_batch=False)
    mem = memory_per_gpu(cfg.model, cfg.micro_batch, cfg.optimizer)
    return {"gpu": e.gpu_type, "step_ms": e.step_seconds * 1e3, "tokens_per_second": e.tokens_per_second,
            "mfu": e.mfu, "mfu_source": e.mfu_source, "optimizer_ms": e.optimizer_seconds_per_step * 1e3,
            "optimizer_matrices": e.optimizer_matrices_per_gpu, "memory_gib": mem.total_gib,
            "memory_tensors_gib": mem.traced_gib, "memory_overhead_gib": mem.overhead_gib}


def step_part(part: str, dry: bool) -> dict:
    import torch

    from gpt2cloud.cost.hardware import gpu_spec
    from benchmarks.bench_train import RandomBatches
    from gpt2cloud.cost.recipes import load_recipe
    from model.metrics import mfu
    from model.step import setup_training, train_step

    recipe, micro_batch, accum, steps, warmup = PARTS[part]
    device, gpu, device_name = device_info(dry)
    cfg = load_recipe(recipe).to_train_config(micro_batch=micro_batch, compile=not dry, dtype="auto")
    if dry:
        cfg, steps, warmup = tiny(cfg), 3, 1
    cfg = dataclasses.replace(cfg, tokens_per_step=cfg.micro_batch * cfg.model.block_size * accum)
    s = setup_training(cfg, device)
    B, T = cfg.micro_batch, cfg.model.block_size
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    opt_times, mark = [], {}

    def before(*_a, **_k):
        sync()
        mark["t"] = time.perf_counter()

    def after(*_a, **_k):
        sync()
        opt_times.append(time.perf_counter() - mark["t"])

    s.optimizer.register_step_pre_hook(before)
    s.optimizer.register_step_post_hook(after)
    data = RandomBatches(B, T, cfg.model.vocab_size, n=2)

    def step() -> float:
        t0 = time.perf_counter()
        loss, _ = train_step(s.model, s.optimizer, s.scaler, data, accum, s.amp, cfg.grad_clip, cfg.lr, False, device)
        loss.item()  # waits for the device
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    warmup_s = time.perf_counter() - t0
    opt_times.clear()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [step() for _ in range(steps)]
    dt = statistics.median(times)
    tokens = cfg.tokens_per_step
    fpt = cfg.model.flops_per_token()
    peak = gpu_spec(gpu).peak_bf16_tflops * 1e12 if gpu else None
    row = {"part": part, "title": TITLES[part], "recipe": recipe, "optimizer": cfg.optimizer, "dry": dry,
           "device": device_name, "gpu": gpu, "compile": cfg.compile, "micro_batch": B, "accum": accum,
           "tokens_per_step": tokens, "params": cfg.model.param_count(), "steps_timed": steps,
           "warmup_seconds": round(warmup_s, 2), "step_ms": dt * 1e3, "tokens_per_second": tokens / dt,
           "mfu": mfu(tokens / dt, fpt, peak or 0, 1),
           "optimizer_ms": statistics.median(opt_times) * 1e3 if opt_times else None,
           "estimate": estimate_for(recipe, cfg, gpu)}
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        row.update(peak_allocated_gib=torch.cuda.max_memory_allocated() / GIB,
                   peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB, device_used_gib=(total - free) / GIB)
    else:
        row.update(peak_allocated_gib=None, peak_reserved_gib=None, device_used_gib=None)
    return row


def small_part(dry: bool) -> dict:
    """HellaSwag ms per example (batched) and one checkpoint's write time, with gpt2-124m (tiny when dry)."""
    import tempfile

    import torch

    from gpt2cloud.cost.recipes import load_recipe
    from model import checkpoint as ckpt
    from model.eval import hellaswag_scores
    from model.gpt import GPT

    device, gpu, device_name = device_info(dry)
    cfg = load_recipe("gpt2-124m").to_train_config()
    if dry:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(tiny(cfg).model, vocab_size=50257,
                                                                 padded_vocab_size=50304))
    model = GPT(cfg.model).to(device).eval()
    n = 32 if dry else 512
    ex = [{"ctx": "A man is sitting on a roof. He" * (1 + i % 3), "label": i % 4,
           "endings": [f"is using wrap to wrap a pair of skis {i}.", "is ripping level tiles off.",
                       "is holding a rubik's cube.", "starts pulling up roofing on a roof."]} for i in range(n)]
    hellaswag_scores(model, ex[:8], device)  # warm-up; tokenizes those once
    t0 = time.perf_counter()
    hellaswag_scores(model, ex, device)
    if device == "cuda":
        torch.cuda.synchronize()
    hs_ms = (time.perf_counter() - t0) / n * 1e3
    opt = model.configure_optimizer(cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps, device)
    model.train()
    x = torch.randint(0, 50257, (1, 64), device=device)
    model(x, x)[1].backward()
    opt.step()  # the optimizer state exists, as in a real checkpoint
    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        path = ckpt.write_checkpoint(work, 1, model, {"optimizer": opt.state_dict(), "scaler": None}, {"step": 1},
                                     [ckpt.rng_state()], {"model": {}, "recipe_name": "gpt2-124m"}, 1)
        seconds = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in path.iterdir()) / GIB
    return {"part": "small", "title": "HellaSwag / checkpoint", "dry": dry, "device": device_name, "gpu": gpu,
            "hellaswag_ms_per_example": hs_ms, "hellaswag_examples": n, "checkpoint_seconds": seconds,
            "checkpoint_gib": size}


def info_part(dry: bool) -> dict:
    import torch

    device, gpu, device_name = device_info(dry)
    row = {"part": "info", "title": "device", "dry": dry, "device": device_name, "gpu": gpu,
           "torch": torch.__version__, "cuda": torch.version.cuda, "date": datetime.date.today().isoformat()}
    if device == "cuda":
        row["memory_gib"] = torch.cuda.get_device_properties(0).total_memory / GIB
    return row


def fmt(row: dict) -> tuple[str, str]:
    """(label, one line): what was measured, the estimate's figure beside it."""
    if "failed" in row:
        return row.get("title", row["part"]), f"FAILED ({row['failed']})"
    if row["part"] == "info":
        mem = f", {row['memory_gib']:.0f} GiB" if row.get("memory_gib") else ""
        return "device", (f"{row['device']} ({row['gpu'] or 'not in gpus.yaml'}{mem}), torch {row['torch']}, "
                          f"CUDA {row['cuda']}")
    if row["part"] == "small":
        return row["title"], (f"HellaSwag {row['hellaswag_ms_per_example']:.2f} ms/example ({row['hellaswag_examples']} "
                              f"examples, batched); checkpoint (weights + AdamW) {row['checkpoint_seconds']:.2f} s for "
                              f"{row['checkpoint_gib']:.2f} GiB")
    e = row["estimate"]
    label = (f"{row['title']} ({row['recipe']}, mb {row['micro_batch']} x {row['accum']}, "
             f"{'compiled' if row['compile'] else 'eager'}, 1 {'GPU' if row['gpu'] != 'CPU' else 'CPU'})")
    parts = [f"{row['step_ms']:,.1f} ms/step (est {e['step_ms']:,.1f})",
             f"{row['tokens_per_second']:,.0f} tok/s (est {e['tokens_per_second']:,.0f})"]
    if row["mfu"] is not None:
        parts.append(f"MFU {row['mfu']:.1%} (est {e['mfu']:.1%})")
    if row["optimizer_ms"] is not None:
        what = "Muon" if row["optimizer"] == "muon" else "AdamW"
        est = f" (est {e['optimizer_ms']:.1f}: {e['optimizer_matrices']} matrices)" if row["optimizer"] == "muon" else ""
        parts.append(f"{what} step {row['optimizer_ms']:.1f} ms{est}")
    if row.get("peak_allocated_gib") is not None:
        parts.append(f"tensors peak {row['peak_allocated_gib']:.2f} GiB allocated (est {e['memory_tensors_gib']:.2f}, "
                     f"eager); process on the GPU {row['device_used_gib']:.2f} GiB (est {e['memory_gib']:.2f} incl. "
                     f"{e['memory_overhead_gib']:g} GiB overhead); reserved peak {row['peak_reserved_gib']:.2f} GiB")
    else:
        parts.append(f"memory n/a on CPU (est {e['memory_gib']:.2f} GiB)")
    return label, "; ".join(parts)


def append(results: Path, row: dict) -> None:
    results.parent.mkdir(parents=True, exist_ok=True)
    with open(results, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def read_rows(results: Path) -> list[dict]:
    rows = []
    for line in results.read_text(encoding="utf-8").splitlines() if results.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def run_part(part: str, dry: bool) -> dict:
    if part == "info":
        return info_part(dry)
    if part == "small":
        return small_part(dry)
    return step_part(part, dry)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("parts", nargs="+", metavar="PART",
                   help=f"one or more of: info, {', '.join(PARTS)}, small (each in turn, one row each); or "
                        "`table FILE`; or `failed PART...` (the shell's record of parts that ran out of time)")
    p.add_argument("--results", type=Path, default=None, help="the JSON lines file to append to")
    p.add_argument("--dry", action="store_true", help="on the CPU with tiny models (the plumbing, not the GPU)")
    p.add_argument("--why", default="", help="with failed: one line on why")
    p.add_argument("--since", type=int, default=0,
                   help="with failed: only parts with no row after this many lines of the results file")
    a = p.parse_args(argv)
    first, rest = a.parts[0], a.parts[1:]
    known = {"info", "small", *PARTS}
    if first == "table":
        for row in read_rows(Path(rest[0]) if rest else a.results):
            label, line = fmt(row)
            print(f"{label}\n    {line}")
        return
    if a.results is None:
        p.error("--results FILE is needed")
    if first == "failed":  # parts that timed out or crashed before writing their row
        have = {r.get("part") for r in read_rows(a.results)[a.since:]}
        for part in rest:
            if part not in have:
                row = {"part": part, "title": TITLES.get(part, part), "failed": a.why, "dry": a.dry,
                       "time": datetime.datetime.now().isoformat(timespec="seconds")}
                append(a.results, row)
                label, line = fmt(row)
                print(f"{label}\n    {line}", flush=True)
        return
    unknown = [x for x in a.parts if x not in known]
    if unknown:
        p.error(f"unknown part(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    failures = 0
    for part in a.parts:
        try:
            row = run_part(part, a.dry)
        except Exception as e:  # noqa: BLE001 - one part's failure is that part's row; the next part runs
            failures += 1
            row = {"part": part, "title": TITLES.get(part, part), "failed": f"{type(e).__name__}: {e}"[:200],
                   "dry": a.dry}
        row["time"] = datetime.datetime.now().isoformat(timespec="seconds")
        append(a.results, row)
        label, line = fmt(row)
        print(f"{label}\n    {line}", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
