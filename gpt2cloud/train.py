"""Training on this machine (`gpt2cloud train`): check the inputs, write OUT/config.json, run the trainer
under torchrun, stream its output, and summarise what it wrote.

torchrun starts each worker in a session of its own, so killing torchrun's process group leaves the
workers running (and writing checkpoints). On Ctrl-C or SIGTERM we collect the whole process tree
by PID first and then end every process in it; see gpt2cloud/processes.py.
"""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
from pathlib import Path
from typing import TextIO

from gpt2cloud.cost.recipes import load_recipe
from gpt2cloud.errors import MAX_STEPS, UserError, positive
from gpt2cloud.processes import kill_process_tree
from gpt2cloud.store.layout import CONFIG, METRICS
from model.config import BatchError
from model.metrics import RunMetrics


def check_inputs(cfg, data: Path, out: Path, nproc: int, resume: str) -> None:
    """Everything we can check before paying for torchrun's start; UserError with the fix."""
    from model.checkpoint import latest_checkpoint
    from model.data import TokenLoader, find_shards
    from model.shards import ShardError

    positive("--steps", cfg.steps, "100", upper=MAX_STEPS)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; give a directory (new, or a run's to resume it)")
    if not data.is_dir():
        raise UserError(f"--data {data}: " + ("is a file" if data.exists() else "does not exist")
                        + "; give the directory of .bin shards that `gpt2cloud data prepare` wrote")
    if resume not in ("auto", "never"):
        raise UserError(f"--resume {resume}: expected auto or never")
    if cfg.max_cost_usd > 0 and cfg.price_per_gpu_hour <= 0:
        raise UserError(f"--max-cost {cfg.max_cost_usd:g} needs --price USD_PER_GPU_HOUR (the cap counts GPU-hours x price)")
    try:
        accum = cfg.grad_accum(nproc)
    except BatchError as e:
        raise UserError(f"{e}; pick another --nproc") from None
    try:
        train, _ = find_shards(data)
        # the trainer's own loader: it refuses data without a shard that holds one step of tokens
        TokenLoader(train, cfg.micro_batch, cfg.model.block_size, 0, nproc, accum, log=lambda *a: None)
    except (FileNotFoundError, ShardError) as e:
        raise UserError(str(e)) from None
    latest = latest_checkpoint(out)
    if latest is not None and resume == "never":
        raise UserError(f"{out} already holds checkpoints (newest {latest.name}); use --resume auto to continue "
                        "that run, or a new --out to start another")


def fit_to_ranks(cfg, nproc: int, stream: TextIO):
    """The recipe's micro-batch, or the largest smaller one that divides tokens per step over the ranks."""
    try:
        cfg.grad_accum(nproc)
        return cfg
    except BatchError:
        pass
    for m in range(cfg.micro_batch - 1, 0, -1):
        if cfg.tokens_per_step % (m * cfg.model.block_size * nproc) == 0:
            stream.write(f"note: micro-batch {m} instead of the recipe's {cfg.micro_batch}: the largest that divides "
                         f"{cfg.tokens_per_step:,} tokens per step over {nproc} ranks\n")
            return dataclasses.replace(cfg, micro_batch=m)
    return cfg  # none divides: check_inputs says so


def torchrun_command(config: Path, data: Path, out: Path, nproc: int, resume: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "model.train", "--config", str(config), "--data", str(data), "--out", str(out),
            "--resume", resume]


def _die_with_parent():
    """In the child: get SIGTERM if the CLI dies (even by SIGKILL); torchrun then ends its workers."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: Ctrl-C and SIGTERM are still handled by stream_process


def stream_process(cmd: list[str], stream: TextIO) -> tuple[int, str | None]:
    """Run cmd, copying its output line by line to `stream`; kill its whole tree on Ctrl-C/SIGTERM.

    Returns (exit code, the last `error: ...` line the trainer printed, if any).
    """
    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True, preexec_fn=preexec)
    error = None
    try:
        for line in proc.stdout:
            stream.write(line)
            stream.flush()
            if line.startswith("error: "):
                error = line[len("error: "):].strip()
        return proc.wait(), error
    except BaseException:
        kill_process_tree(proc.pid, graceful_seconds=5.0)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        proc.stdout.close()


def summarize(out: Path) -> dict:
    """What the run left in OUT: steps done, final loss, last val loss, last complete checkpoint."""
    from model.checkpoint import latest_checkpoint

    m = RunMetrics.read(out / METRICS)
    latest = latest_checkpoint(out)
    return {
        "steps": m.last_step,
        "final_loss": m.last_loss,
        "val_loss": m.last_val_loss,
        "checkpoint": str(latest) if latest else None,
        "out": str(out),
        "metrics": str(out / METRICS),
        "tokens_seen": m.tokens_seen,
        "elapsed_seconds": m.elapsed_seconds,
        "tokens_per_second": m.tokens_per_second(),
        "cost_usd": m.train[-1].get("cost_usd") if m.train else None,
        "budget_stop": m.budget_stopped,
    }


def train(recipe: str, data: str | Path, out: str | Path, nproc: int = 1, steps: int | None = None,
          resume: str = "auto", compile: bool | None = None, price: float | None = None,
          max_cost: float | None = None, stream: TextIO | None = None, schedule_steps: int | None = None) -> dict:
    """Train a recipe on local data with `nproc` processes; return summarize(out)."""
    data, out = Path(data), Path(out)
    positive("--price", price, "2.99")
    positive("--max-cost", max_cost, "5")
    positive("--nproc", nproc, "2", upper=1024)
    positive("--schedule-steps", schedule_steps, "19073", upper=MAX_STEPS)
    cfg = load_recipe(recipe).to_train_config(steps=steps, schedule_steps=schedule_steps, compile=compile,
                                               price_per_gpu_hour=price,
                                               max_cost_usd=max_cost)
    cfg = fit_to_ranks(cfg, nproc, stream or sys.stdout)
    check_inputs(cfg, data, out, nproc, resume)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / CONFIG
    config_path.write_text(cfg.to_json() + "\n")
    code, error = stream_process(torchrun_command(config_path, data, out, nproc, resume), stream or sys.stdout)
    if code != 0:
        latest = summarize(out)["checkpoint"]
        again = f"; rerun the same command to resume from {latest}" if latest else ""
        raise UserError(f"training failed (exit code {code}): {error or 'see the output above'}{again}")
    return summarize(out)
