"""Training on this machine (`gpt2cloud train`): check the inputs, write OUT/config.json, run the trainer
under torchrun, stream its output, and summarise what it wrote.

torchrun starts each worker in a session of its own, so killing torchrun's process group leaves the
workers running (and writing checkpoints). On Ctrl-C or SIGTERM we collect the whole process tree
by PID first and then end every process in it; see gpt2cloud/processes.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TextIO

from gpt2cloud.cost.recipes import MAX_CHECKPOINT_MINUTES, load_recipe
from gpt2cloud.errors import MAX_STEPS, UserError, positive
from gpt2cloud.processes import kill_process_tree
from gpt2cloud.store.layout import CHECKPOINTS, CONFIG, METRICS
from model.config import DIVERGED_MARKER, ERROR_FILE_ENV, EXIT_DIVERGED, BatchError, TrainConfig
from model.metrics import RunMetrics
from model.watchdog import STALLED


class TrainingDiverged(UserError):
    """The trainer stopped a diverged run (its one line); `gpt2cloud train` exits with `code`."""

    code = EXIT_DIVERGED


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
        train, _ = find_shards(data, cfg.model.vocab_size)
        # the trainer's own loader: it refuses data without a shard that holds one step of tokens
        TokenLoader(train, cfg.micro_batch, cfg.model.block_size, 0, nproc, accum, log=lambda *a: None)
    except (FileNotFoundError, ShardError) as e:
        raise UserError(str(e)) from None
    latest = latest_checkpoint(out)
    if latest is not None and resume == "never":
        raise UserError(f"{out} already holds checkpoints (newest {latest.name}); use --resume auto to continue "
                        "that run, or a new --out to start another")
    check_same_run(cfg, data, out, latest)


RUN_FILES = (CONFIG, METRICS, CHECKPOINTS)  # what makes a directory a run's OUT (train or fetch wrote it)


def _saved_run(out: Path, latest) -> tuple[Path, dict, dict | None]:
    """(what it came from, the run's config, its data identity) of an OUT that holds a run: the newest
    checkpoint's manifest and trainer state, else the config.json an earlier `train` wrote."""
    from model.checkpoint import CheckpointError, damaged_refusal, read_manifest

    if latest is not None:
        try:
            saved = read_manifest(latest)
            state = json.loads((latest / "trainer_state.json").read_text())
        except (CheckpointError, OSError, ValueError) as e:
            raise UserError(damaged_refusal(latest, str(e))) from None
        return latest, saved["config"], state.get("data_identity") if isinstance(state, dict) else None
    try:
        config = json.loads((out / CONFIG).read_text())
        TrainConfig.from_dict(config)
    except FileNotFoundError:
        raise UserError(f"--out {out}: holds a run's files but no {CONFIG} and no complete checkpoint (a "
                        "fetched run's metrics?); train into a new --out, or fetch a checkpoint of that run "
                        "to resume it") from None
    except (OSError, ValueError, TypeError, AttributeError):  # an export's, or another tool's
        raise UserError(f"--out {out}: its {CONFIG} is not a gpt2cloud training config (an export's, or "
                        "another tool's); give a new or empty directory, or a run's OUT to resume it") from None
    return out / CONFIG, config, None


def check_same_run(cfg, data: Path, out: Path, latest) -> None:
    """--out is new, empty, or this same run's OUT (a resume may change only docs/training.md#resume's
    fields); anything else is refused before anything is written there."""
    from model.checkpoint import data_identity, resume_refusal

    if not out.is_dir() or not any(out.iterdir()):
        return
    if not any((out / name).exists() for name in RUN_FILES):
        there = ", ".join(sorted(p.name for p in out.iterdir())[:3])
        raise UserError(f"--out {out}: holds files `gpt2cloud train` did not write ({there}); give a new or "
                        "empty directory, or a run's OUT to resume it")
    source, saved, saved_data = _saved_run(out, latest)
    try:
        refusal = resume_refusal(source, saved, cfg, saved_data, data_identity(data) if saved_data else None)
    except (KeyError, TypeError, ValueError) as e:  # a config.json or manifest of some other shape
        raise UserError(f"{source}: not a gpt2cloud run's config ({e}); use a new --out") from None
    if refusal:
        raise UserError(refusal)


def fit_to_ranks(cfg, nproc: int, stream: TextIO):
    """The recipe's micro-batch, or the largest smaller one that divides tokens per step over the ranks and
    fits in this machine's GPU memory: the estimate's and the launch's one rule (cost/estimate.py)."""
    from gpt2cloud.cost.estimate import choose_micro_batch

    fitted, note = choose_micro_batch(cfg, nproc, *_device_memory())
    if note:
        stream.write(f"note: {note}\n")
    return fitted


def _device_memory() -> tuple:
    """(GiB per rank, the device's name, what a rank is called) for the micro-batch rule: this machine's GPU,
    or (None, ...) on CPU, whose memory is not a limit the rule knows (a CPU run of a big recipe is slow
    long before it runs out)."""
    import torch

    if not torch.cuda.is_available():
        return None, "CPU", "ranks"
    from gpt2cloud.cost.hardware import gpu_from_device_name, gpu_spec

    # the GPU table's memory when the GPU is in it: the figure `estimate` and `launch` decide with
    name, total = torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory / 2**30
    known = gpu_from_device_name(name, total)
    return (gpu_spec(known).memory_gib, known, "ranks") if known else (total, name, "ranks")


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


def stream_process(cmd: list[str], stream: TextIO, env: dict | None = None) -> tuple[int, list[str]]:
    """Run cmd, copying its output line by line to `stream`; kill its whole tree on Ctrl-C/SIGTERM.

    Returns (exit code, the lines held back): from the trainer's first `error: ` line on, nothing is
    copied, since what follows a refusal is torchrun's traceback of its child's exit; the caller
    shows them only if the run failed some other way.
    """
    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True, preexec_fn=preexec, env=env)
    held: list[str] = []
    try:
        for line in proc.stdout:
            if held or line.startswith("error: "):
                held.append(line)
                continue
            stream.write(line)
            stream.flush()
        return proc.wait(), held
    except BaseException:
        kill_process_tree(proc.pid, graceful_seconds=5.0)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        proc.stdout.close()


def run_trainer(cmd: list[str], out: Path, stream: TextIO, urls: tuple | list = ()) -> None:
    """torchrun with the trainer; its refusal (the one line it leaves in the error file) becomes ours,
    without torchrun's traceback; any other failure shows everything and says how to resume. --notify's
    URLs reach the trainer only through its environment (never its command line), and hear of a failure."""
    from model.notify import NOTIFY_ENV

    with tempfile.TemporaryDirectory(prefix="gpt2cloud-train-") as tmp:
        error_file = Path(tmp) / "error"
        env = {k: v for k, v in os.environ.items() if k != NOTIFY_ENV}  # --notify is the only way in
        env.update({ERROR_FILE_ENV: str(error_file), **({NOTIFY_ENV: "\n".join(urls)} if urls else {})})
        code, held = stream_process(cmd, stream, env=env)
        refusal = error_file.read_text(encoding="utf-8").strip() if error_file.is_file() else ""
    if code == 0:
        stream.writelines(held)
        return
    if refusal and (out / DIVERGED_MARKER).is_file():  # the trainer's verdict (train() removed any older one)
        raise TrainingDiverged(refusal)
    if refusal:
        tell_failure(urls, out, refusal, code)
        raise UserError(refusal)
    stream.writelines(held)
    stream.flush()
    error = held[0][len("error: "):].strip() if held else "see the output above"
    latest = summarize(out)["checkpoint"] if (out / METRICS).is_file() else None
    again = f"; rerun the same command to resume from {latest}" if latest else ""
    message = f"training failed (exit code {code}): {error}{again}"
    tell_failure(urls, out, message, code)
    raise UserError(message)


def tell_failure(urls, out: Path, message: str, code: int) -> None:
    """A failed trainer told to --notify's URLs (the trainer tells its own ends: finish, stops, divergence);
    a stall by the watchdog's marker. Waits at most model/notify_cli.py CLI_WAIT_S, never raises for a URL."""
    from model import notify_cli

    notify_cli.tell_end(list(urls), "stall" if (out / STALLED).is_file() else "failed", message, out=out,
                        code=code)


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
          max_cost: float | None = None, stream: TextIO | None = None, schedule_steps: int | None = None,
          checkpoint_minutes: float | None = None, trackers: list[str] | None = None,
          notify: list[str] | None = None) -> dict:
    """Train a recipe on local data with `nproc` processes; return summarize(out). `trackers` (--tracker)
    replaces the recipe's eval.trackers; each must be importable here, where the trainer runs. `notify`
    (--notify): webhook URLs told of the first step, the end and a failure (model/notify.py)."""
    from gpt2cloud.launch.plan import check_notify  # launch's own check of --notify
    from model.trackers import refusal

    data, out = Path(data), Path(out)
    positive("--price", price, "2.99")
    positive("--max-cost", max_cost, "5")
    if checkpoint_minutes != 0:  # 0 turns the timer off, as in a recipe
        positive("--checkpoint-minutes", checkpoint_minutes, "10", upper=MAX_CHECKPOINT_MINUTES)
    positive("--nproc", nproc, "2", upper=1024)
    positive("--schedule-steps", schedule_steps, "19073", upper=MAX_STEPS)
    urls = check_notify(notify)
    r = load_recipe(recipe)
    names, where = r.trackers_for(trackers)
    problem = refusal(names, where, here=True)
    if problem:
        raise UserError(problem)
    cfg = r.to_train_config(steps=steps, schedule_steps=schedule_steps, compile=compile, price_per_gpu_hour=price,
                            max_cost_usd=max_cost, checkpoint_minutes=checkpoint_minutes, trackers=names)
    cfg = fit_to_ranks(cfg, nproc, stream or sys.stdout)
    check_inputs(cfg, data, out, nproc, resume)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / CONFIG
    config_path.write_text(cfg.to_json() + "\n")
    (out / DIVERGED_MARKER).unlink(missing_ok=True)  # an earlier run's verdict must not name this one's failure
    (out / STALLED).unlink(missing_ok=True)  # (nor an earlier stall's)
    run_trainer(torchrun_command(config_path, data, out, nproc, resume), out, stream or sys.stdout, urls)
    return summarize(out)
