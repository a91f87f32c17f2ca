"""The trainer, one loop read top to bottom (after build-nanogpt):

    torchrun --standalone --nproc_per_node N -m model.train --config CONFIG.json --data DIR --out OUT \
        [--resume auto|never] [--steps N]

Set up DDP, data, model and optimizer; resume from the newest complete checkpoint in OUT; then each
step: check the budget, forward/backward over the micro-steps, clip, step, log; now and then
validate, score HellaSwag, sample and checkpoint. A plain `python -m model.train ...` runs as a single rank.

run() is that sequence of named steps; each is a function below, in the order it runs, but for the
start-up (model/startup.py), the resume (model/resume.py) and the run's clock (model/clock.py). What
they share is one explicit Trainer (processes, data, model, clock, progress). When to stop early (cost cap, time
cap, pushes failing on a node), when to checkpoint between checkpoint_every steps (checkpoint_minutes),
and when the run diverged is model/stop.py's StopPolicy: plain numbers, tested without training. A
diverged run stops without a checkpoint of its bad weights, leaves OUT/diverged and exits EXIT_DIVERGED.
However a run ends, its trackers and notifications get a bounded close (close_down), and a tracker still
closing after it never holds the process's exit (model/ending.py): the node would bill on.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt2cloud.store.layout import METRICS
from model import checkpoint as ckpt
from model import pushstate, stoprequest
from model.clock import Clock
from model.config import DIVERGED_MARKER, EXIT_DIVERGED, BatchError, TrainConfig
from model.ending import Ending, end_now, exit_code, refuse
from model.eval import evaluate, hellaswag_eval
from model.metrics import console_line, mfu, truncate_after
from model.notify import RunNotices
from model.resume import resume
from model.sample import generate_text
from model.startup import Data, Procs, TrainError, load_config, load_data, start_processes
from model.shards import ShardError
from model.step import Setup, get_lr, pick_dtype, schedule_length, setup_training, train_step  # noqa: F401 (re-exported)
from model.stop import (CHECK_SECONDS, DECISION_SIZE, Decision, Diverged, StopPolicy,  # noqa: F401
                        steps_that_fit)  # CHECK_SECONDS and steps_that_fit: re-exported
from model.tokenizer import VOCAB_SIZE
from model.trackers import RUN_ID_KEY, Metrics, TrackerRun
from model.watchdog import Watchdog


def run(args, t_start: float) -> None:
    cfg = load_config(args)
    procs = start_processes(cfg)
    t = set_up(cfg, args, procs, t_start)  # batch, data, HellaSwag, model and optimizer, OUT, clock, watchdog
    diverged = None
    try:
        resume(t, args.resume)  # weights, optimizer, schedule position, data position, RNG
        t.model = wrap(t)
        start_metrics(t)
        try:
            train_loop(t)
        except Diverged as e:  # every rank, at the same step (model/stop.py): no checkpoint of what it broke
            diverged = end_diverged(t, e)
        else:
            report_checkpoints(t, wait=True)
    finally:  # however the run ends: the trackers' last uploads and the notifications, each bounded
        close_down(t)
    if procs.ddp:
        dist.destroy_process_group()
    if diverged is not None:
        raise RunDiverged(diverged)


# ---- the end: bounded closes (an exit nothing can hold: model/ending.py) ----


def close_down(t: Trainer) -> None:
    """Stop the watchdog, close metrics.jsonl and the trackers (at most trackers.CLOSE_SECONDS) and the
    notifications (at most notify.CLOSE_WAIT_S). A tracker whose close did not return may hold the process's
    exit too (wandb's atexit hook joins its service process without a timeout, Trackio's finish may hang),
    and a node bills until the process is gone: rank 0 then notes it, and main() ends with os._exit."""
    t.watchdog.stop()
    closed = False  # (unless the close says it finished: an exception in it counts as a hang)
    try:
        closed = t.metrics.close() if t.metrics is not None else True
    finally:
        t.notices.close()
        if t.p.master and not closed:
            Ending.hung = True


# ---- set up: the model and optimizer (model/step.py), OUT, the clock (model/clock.py), the watchdog ----
# (config, processes and data: model/startup.py)


@dataclasses.dataclass
class Pending:
    """A step queued on the device and not read yet: its loss and norm are still device tensors."""

    step: int
    loss: torch.Tensor
    norm: torch.Tensor
    lr: float
    timer: Callable[[], float]  # -> the step's seconds (waits for its end)
    tokens_seen: int


@dataclasses.dataclass
class Trainer:
    """What the loop's pieces share: set up once, then the run's progress."""

    cfg: TrainConfig
    p: Procs
    grad_accum: int
    data: Data
    s: Setup  # raw_model (saved, sampled from), model (compiled when cfg.compile), dtype, amp, scaler, optimizer
    out: Path
    clock: Clock
    watchdog: Watchdog
    policy: StopPolicy
    defer: bool  # read a step's numbers one step late (see finish_pending)
    model: torch.nn.Module | None = None  # what trains: s.model, DDP-wrapped over several ranks
    metrics: Metrics | None = None
    latest: Path | None = None  # the checkpoint this run resumed from
    step: int = 0  # optimizer steps done, over all restarts
    tokens_seen: int = 0
    loss: float | None = None  # the newest step read back
    saved_step: int | None = None  # the newest checkpoint's step (this run's or the resumed one)
    checkpoint_at: float = 0.0  # when this run last checkpointed (time.time()), or started: checkpoint_minutes
    pending: Pending | None = None
    writer: ckpt.BackgroundWriter = dataclasses.field(default_factory=ckpt.BackgroundWriter)
    copy_seconds: dict = dataclasses.field(default_factory=dict)  # step -> the blocking part of its checkpoint
    tracker_run_id: str | None = None  # the trackers' run (model/trackers.py): checkpointed, so a resume goes on in it
    notices: RunNotices = dataclasses.field(default_factory=RunNotices)  # --notify (rank 0; model/notify.py)


def set_up(cfg: TrainConfig, args, p: Procs, t_start: float) -> Trainer:
    try:
        grad_accum = cfg.grad_accum(p.world)
    except BatchError as e:
        raise TrainError(f"{e}; choose another number of processes or micro-batch") from None
    data = load_data(cfg, args, p, grad_accum)
    s = setup_training(cfg, p.device)  # model, precision, optimizer
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock.start(out, t_start, p.world)
    watchdog = Watchdog(cfg.stall_minutes * 60, out, functools.partial(print, f"rank {p.rank}:", flush=True),
                        mark_started=clock.node_up is not None).start()
    data.train.set_heartbeat(watchdog.beat)  # waiting for a shard that is still downloading is not a stall
    # On CPU the ops are synchronous anyway: read at once (GPT2CLOUD_DEFER_READS=1 defers there too)
    defer = p.device_type == "cuda" or os.environ.get("GPT2CLOUD_DEFER_READS") == "1"
    if p.master:
        (out / DIVERGED_MARKER).unlink(missing_ok=True)  # an earlier attempt's verdict is not this run's
    # a node (GPT2CLOUD_NODE_UP) runs a pusher beside the trainer: its failures are a stop rule there
    policy = StopPolicy.from_config(cfg, p.world, pushed=clock.node_up is not None)
    return Trainer(cfg, p, grad_accum, data, s, out, clock, watchdog, policy, defer, checkpoint_at=time.time())


def wrap(t: Trainer) -> torch.nn.Module:
    """DDP over several ranks (gradients live in its buckets: no second copy of them); the raw module is
    what we save and sample from."""
    if not t.p.ddp:
        return t.s.model
    return DDP(t.s.model, device_ids=[t.p.local_rank] if t.p.device_type == "cuda" else None,
               gradient_as_bucket_view=True)


def start_metrics(t: Trainer) -> None:
    metrics_path = t.out / METRICS
    if t.p.master:
        if t.latest is not None:
            truncate_after(metrics_path, t.step)  # steps the killed run logged after its checkpoint
        elif metrics_path.exists():
            metrics_path.unlink()  # no checkpoint: a new run, whatever an earlier attempt logged
    run = TrackerRun.of(t.out, t.tracker_run_id, t.step if t.latest is not None else None)
    t.tracker_run_id = run.id
    t.metrics = Metrics(metrics_path, t.p.master, t.cfg, t.out, run)  # metrics.jsonl and cfg.trackers
    t.metrics.write({"event": "start", "world_size": t.p.world, "config": dataclasses.asdict(t.cfg),
                     "resumed_from": t.step if t.latest is not None else None, "device": t.p.device_type,
                     "dtype": str(t.s.dtype).removeprefix("torch."), "grad_accum": t.grad_accum, "ddp": t.p.ddp,
                     "params": t.s.raw_model.num_params()})
    t.notices = RunNotices.start(t.out, t.p.master, t.cfg.steps, t.clock.node_up,
                                 t.step if t.latest is not None else None)  # a node that took over: a recovery


# ---- the loop ----


def train_loop(t: Trainer) -> None:
    """Steps until cfg.steps, or until the stop policy says the next one would pass a cap."""
    cfg = t.cfg
    if t.step >= cfg.steps:
        t.p.log(f"nothing to do: {t.latest.name} is at step {t.step} of {cfg.steps}")
    while t.step < cfg.steps:
        t.policy.lap(time.time())  # wall time of loop iterations (step + evals + checkpoint): the check's estimate
        if t.policy.due(t.step) and check_stop(t):
            return
        take_step(t)
        after_step(t)
    finish_pending(t)
    report_checkpoints(t, wait=True)  # the last checkpoint is on disk before the run says it ended
    t.metrics.write({"event": "end", "step": t.step, "final_loss": t.loss})
    t.notices.finished(t.step, t.loss, spent(t), t.saved_step)
    t.p.log(f"done: step {t.step}, final loss {t.loss if t.loss is None else round(t.loss, 4)}")


def take_step(t: Trainer) -> None:
    """Forward/backward over the micro-steps, clip, step; its numbers are read now or one step late."""
    cfg, p, s = t.cfg, t.p, t.s
    lr = get_lr(t.step, cfg)
    stop_timer = start_timer(p.device_type)
    loss_t, norm = train_step(t.model, s.optimizer, s.scaler, t.data.train, t.grad_accum, s.amp, cfg.grad_clip, lr,
                              p.ddp, p.device)
    if p.ddp:
        dist.all_reduce(loss_t)  # the logged loss: mean over ranks and micro-steps
        loss_t /= p.world
    timer = stop_timer()
    t.step += 1
    t.tokens_seen += cfg.tokens_per_step
    queued = Pending(t.step, loss_t, norm, lr, timer, t.tokens_seen)
    if t.defer:
        finish_pending(t)  # the step before this one: done, or nearly, while this one runs
        t.pending = queued
    else:
        t.pending = queued
        finish_pending(t)


def start_timer(device_type: str):
    """Returns stop(); stop()() -> the step's seconds (CUDA events: no sync until it is read)."""
    if device_type == "cuda":
        begin = torch.cuda.Event(enable_timing=True)
        begin.record()

        def stop():
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            return lambda: (end.synchronize(), begin.elapsed_time(end) / 1000)[1]
        return stop
    t0 = time.perf_counter()

    def stop_cpu():
        dt = time.perf_counter() - t0
        return lambda: dt
    return stop_cpu


# ---- a step's numbers, read from the device one step late ----
# On CUDA, reading a step's loss right after queueing it would stall the host until the GPU is done
# and leave the GPU idle while the next step is queued. So step k's loss and norm are read after step
# k+1 is queued (the GPU is still busy), and before anything that needs them (val, checkpoint, the
# budget check, the end). Each record still holds its own step's loss, norm and (CUDA events) time.


def finish_pending(t: Trainer) -> None:
    if t.pending is None:
        return
    done, t.pending = t.pending, None
    cfg = t.cfg
    t.loss = done.loss.item()  # waits for that step on the device
    dt = done.timer()
    tok_s = cfg.tokens_per_step / dt
    record = {"step": done.step, "loss": t.loss, "lr": done.lr, "grad_norm": done.norm.item(), "step_seconds": dt,
              "tokens_per_second": tok_s,
              "mfu": mfu(tok_s, cfg.model.flops_per_token(), cfg.peak_flops_per_gpu, t.p.world),
              "tokens_seen": done.tokens_seen, "elapsed_seconds": t.clock.elapsed()}
    if cfg.price_per_gpu_hour > 0:
        record["cost_usd"] = t.clock.cost(cfg.price_per_gpu_hour)
    t.metrics.write(record)
    t.p.log(console_line(done.step, cfg.steps, t.loss, done.lr, record["grad_norm"], tok_s, dt))
    t.notices.step(done.step, t.loss, record.get("cost_usd"))  # the first of this attempt is told
    t.watchdog.beat(f"step {done.step}")
    # every rank reads every step here, at the same points of the loop: the guard decides alike everywhere.
    # fp16's GradScaler skips steps whose gradients overflowed: a non-finite norm is expected there
    t.policy.observe(done.step, t.loss, None if t.s.scaler.is_enabled() else record["grad_norm"])


# ---- stopping early: rank 0 asks the stop policy, every rank follows ----


def check_stop(t: Trainer) -> bool:
    """Stop before a step that would take the cost or the wall time past its cap, or train on while pushes
    fail (True: stopped); or checkpoint now, checkpoint_minutes after the last one. Each check waits for the
    device (the time is only known then), so the policy also says how many steps surely fit before the next
    one. Rank 0 decides; its decision is the check's one broadcast."""
    finish_pending(t)
    decided = [0] * DECISION_SIZE
    if t.p.master:
        usage = t.clock.usage(since_checkpoint=time.time() - t.checkpoint_at, push_failing=push_failing(t),
                              stop_requested=t.clock.node_up is not None and stoprequest.requested(t.out) is not None)
        decided = t.policy.decide(usage).encode()
    code = torch.tensor(decided, dtype=torch.long, device=t.p.device)
    if t.p.ddp:
        dist.broadcast(code, 0)
    decision = Decision.decode(code.tolist())
    t.policy.checked(t.step, decision)
    if decision.stop is not None:
        stop_here(t, decision.stop)
        return True
    if decision.checkpoint and t.saved_step != t.step:
        save_checkpoint(t)
    return False


def push_failing(t: Trainer) -> float:
    """How long this node's work has not been reaching the bucket (0: not a node; model/pushstate.py)."""
    if t.clock.node_up is None:
        return 0.0
    return pushstate.unsaved_seconds(t.out, t.clock.t_start, time.time())


def stop_here(t: Trainer, reason: str) -> None:
    """A checkpoint of this step (unless it has one), then the stop's metrics line and log: how to go on."""
    if t.saved_step != t.step:
        save_checkpoint(t)
    report_checkpoints(t, wait=True)
    record, line = stop_line(t, reason)
    t.metrics.write({"step": t.step, **record})
    t.p.log(line)
    t.notices.stopped(reason, line, t.step, t.loss, spent(t))


def spent(t: Trainer) -> float | None:
    """The dollars so far, for a notification (None: no price, as in a local `train` without --price)."""
    return t.clock.cost(t.cfg.price_per_gpu_hour) if t.cfg.price_per_gpu_hour > 0 else None


def stop_line(t: Trainer, reason: str) -> tuple[dict, str]:
    """The stop's metrics record and its log line: why, and how to go on."""
    cfg, step = t.cfg, t.step
    if reason == "budget":
        spent = t.clock.cost(cfg.price_per_gpu_hour)
        return ({"event": "budget_stop", "cost_usd": spent},
                f"budget: stopping at step {step}, ${spent:.2f} spent of ${cfg.max_cost_usd:.2f}; "
                "raise max_cost_usd and resume to continue")
    if reason == "push":
        failing, status = push_failing(t), pushstate.read(t.out) or {}
        return ({"event": "push_stop", "push_failing_seconds": failing, "last_error": status.get("last_error")},
                f"push: stopping at step {step} with a checkpoint: pushes to the bucket have failed for "
                f"{failing / 60:.1f} min (last error: {status.get('last_error') or 'unknown'}), longer than the "
                "checkpoint interval, and a preemption would lose everything since; the node's final push "
                "retries it. Relaunch the run (same --name) once the bucket is reachable to continue")
    if reason == "requested":
        why = stoprequest.requested(t.out) or "stop requested"
        return ({"event": "requested_stop", "reason": why},
                f"stop: stopping at step {step} with a checkpoint, as asked ({why}); the final push saves it. "
                "Relaunch the run (same --name) to continue from it")
    elapsed = t.clock.elapsed()
    return ({"event": "time_stop", "elapsed_seconds": elapsed},
            f"time: stopping at step {step} after {elapsed / 3600:.2f} h of the {cfg.max_hours:g} h limit; "
            "raise max_hours and resume to continue")


# ---- after a step: evaluation (val loss, a sample, HellaSwag) and checkpoints ----


def after_step(t: Trainer) -> None:
    cfg, step = t.cfg, t.step
    val_due = t.data.val is not None and (step % cfg.val_every == 0 or step == cfg.steps)
    # sampling needs the GPT-2 vocabulary (tests use tiny ones); the raw module also works when compiled
    sample_step = cfg.sample_every > 0 and step % cfg.sample_every == 0 and cfg.model.vocab_size >= VOCAB_SIZE
    hellaswag_due = bool(t.data.hellaswag) and (step % cfg.hellaswag_every == 0 or step == cfg.steps)
    checkpoint_due = step % cfg.checkpoint_every == 0 or step == cfg.steps
    # every rank reads the step here, not only the one that samples: the divergence guard must see each
    # step at the same point of the loop on every rank (model/stop.py)
    if val_due or sample_step or hellaswag_due or checkpoint_due:
        finish_pending(t)  # this step's line first, and the loss a checkpoint stores
    if val_due:
        validate(t)
    if sample_step and t.p.master:
        write_sample(t)
    if hellaswag_due:
        score_hellaswag(t)
    if checkpoint_due:
        save_checkpoint(t)
    report_checkpoints(t)


def validate(t: Trainer) -> None:
    p, step = t.p, t.step
    t0 = time.perf_counter()
    val_loss = evaluate(t.s.model, t.data.val, p.world, t.s.amp, p.device, p.ddp, t.cfg.val_steps)
    t.metrics.write({"step": step, "val_loss": val_loss, "seconds": time.perf_counter() - t0})
    p.log(f"step {step}/{t.cfg.steps} | val loss {val_loss:.4f}")
    t.watchdog.beat(f"val loss at step {step}")


def write_sample(t: Trainer) -> None:
    cfg, step, dtype = t.cfg, t.step, t.s.dtype
    text = generate_text(t.s.raw_model, cfg.sample_prompt, cfg.sample_tokens, top_k=50, seed=cfg.seed + step,
                         autocast_dtype=dtype if dtype != torch.float32 else None)[0]
    t.metrics.write({"step": step, "sample": text})
    t.p.log(f"step {step}/{cfg.steps} | sample: {text!r}")
    t.watchdog.beat(f"sample at step {step}")


def score_hellaswag(t: Trainer) -> None:
    p, step = t.p, t.step
    t0 = time.perf_counter()
    hs = hellaswag_eval(t.s.raw_model, t.data.hellaswag, p.device, p.rank, p.world, p.ddp)
    t.metrics.write({"step": step, **hs, "seconds": time.perf_counter() - t0})
    p.log(f"step {step}/{t.cfg.steps} | hellaswag acc_norm {hs['hellaswag_acc_norm']:.4f} ({hs['hellaswag_n']})")
    t.watchdog.beat(f"HellaSwag at step {step}")


def save_checkpoint(t: Trainer) -> None:
    """A checkpoint of step t.step: every rank's RNG, gathered to rank 0 (no shared filesystem needed); rank 0
    checks the weights are finite, takes a host copy (all the training waits for) and the disk write goes on
    in the background. Non-finite weights are not written: every rank learns it from rank 0 and the run
    stops as diverged (raises Diverged)."""
    p, step = t.p, t.step
    rngs = [ckpt.rng_state()]
    if p.ddp:
        gathered = [None] * p.world if p.master else None
        dist.gather_object(rngs[0], gathered, dst=0)
        rngs = gathered
    finite = ckpt.weights_finite(t.s.raw_model) if p.master else True
    if p.master and finite:
        submit_checkpoint(t, rngs)
    if p.ddp:  # rank 0's verdict; it also keeps the ranks together as the barrier here used to
        verdict = torch.tensor([int(finite)], dtype=torch.long, device=p.device)
        dist.broadcast(verdict, 0)
        finite = bool(verdict.item())
    if not finite:
        raise Diverged(f"weights not finite at step {step} (its loss {t.loss})", step)
    t.saved_step, t.checkpoint_at = step, time.time()
    t.watchdog.beat(f"checkpoint at step {step}")


def submit_checkpoint(t: Trainer, rngs: list) -> None:
    """Rank 0: the host copy of step t.step's state, handed to the background writer."""
    cfg, step = t.cfg, t.step
    state = {"step": step, "tokens_seen": t.tokens_seen, "elapsed_seconds": t.clock.elapsed(), "loss": t.loss,
             "gpu_seconds": t.clock.gpu_seconds(), "data_identity": t.data.identity,
             "data": t.data.train.state(), "world_size": t.p.world, "grad_accum": t.grad_accum,
             "slowest_iteration_seconds": t.policy.slowest(), RUN_ID_KEY: t.tracker_run_id}
    t0 = time.perf_counter()
    weights = ckpt.to_host(ckpt.weights_state_dict(t.s.raw_model))
    opt_state = ckpt.to_host({"optimizer": t.s.optimizer.state_dict(),
                              "scaler": t.s.scaler.state_dict() if t.s.scaler.is_enabled() else None})
    config, out = dataclasses.asdict(cfg), t.out
    t.writer.submit(step, lambda: ckpt.write_checkpoint(out, step, weights, opt_state, state, rngs, config,
                                                        cfg.keep_checkpoints))
    t.copy_seconds[step] = time.perf_counter() - t0


def report_checkpoints(t: Trainer, wait: bool = False) -> None:
    """The metrics line and log of every checkpoint whose background write has finished."""
    if wait:
        t.writer.wait()
    for done in t.writer.pop_done():
        t.metrics.write({"event": "checkpoint", "step": done["step"], "path": done["path"],
                         "seconds": t.copy_seconds.pop(done["step"], 0.0), "write_seconds": done["write_seconds"]})
        t.p.log(f"checkpoint {done['path']}")


# ---- a diverged run: no checkpoint of it, one line, EXIT_DIVERGED ----


class RunDiverged(Exception):
    """The run diverged: its one line (main exits with EXIT_DIVERGED)."""


def end_diverged(t: Trainer, e: Diverged) -> str:
    """Every rank: finish the good checkpoint still being written, note the verdict (metrics line, OUT's
    marker, --notify), and return the one line that says what happened and what to do."""
    report_checkpoints(t, wait=True)
    kept = ckpt.latest_checkpoint(t.out)
    line = (f"diverged: {e.why}; stopped without checkpointing it ("
            + (f"the newest good checkpoint, {kept}, is kept" if kept else "no checkpoint of this run was written")
            + "). "
            + ("If it is a spike that passes, resume with a higher loss_spike_factor or loss_spike_steps; else "
               if e.spike else "The same settings diverge again: ")
            + "lower the lr (or raise warmup_steps) and train into a new --out")
    t.metrics.write({"event": "diverged", "step": e.step, "why": e.why,
                     "checkpoint": str(kept) if kept else None})
    if t.p.master:  # the node's run script and `gpt2cloud train` turn it into EXIT_DIVERGED
        (t.out / DIVERGED_MARKER).write_text(line + "\n", encoding="utf-8")
    t.notices.diverged(line, e.step, str(kept) if kept else None)
    return line  # run() closes down, then raises RunDiverged with it


# ---- the command line ----


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m model.train", description="Train GPT-2 (run under torchrun for DDP).")
    p.add_argument("--config", required=True, help="TrainConfig JSON (gpt2cloud train writes OUT/config.json)")
    p.add_argument("--data", required=True, help="directory of llm.c .bin token shards")
    p.add_argument("--out", required=True, help="run directory: metrics.jsonl and checkpoints/")
    p.add_argument("--resume", choices=["auto", "never"], default="auto",
                   help="auto: continue from the newest complete checkpoint in --out (default)")
    p.add_argument("--steps", type=int, default=None,
                   help="stop after this step (default: the config's steps); the schedule keeps its length")
    p.add_argument("--schedule-steps", type=int, default=None,
                   help="the cosine schedule's length (default: the config's schedule_steps, else its steps)")
    p.add_argument("--hellaswag", default=None,
                   help="HellaSwag JSONL for hellaswag_every (default: DATA/hellaswag_val.jsonl if present)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    t_start = time.time()
    args = parse_args(argv)
    Ending.hung = False
    try:
        try:
            run(args, t_start)
        except (TrainError, ShardError, ckpt.CheckpointError, FileNotFoundError) as e:
            refuse(str(e))
        except RunDiverged as e:
            refuse(str(e), EXIT_DIVERGED)
    except SystemExit as e:
        if Ending.hung:
            end_now(exit_code(e.code))
        raise
    except BaseException:
        if Ending.hung:
            traceback.print_exc()
            end_now(1)
        raise
    if Ending.hung:
        end_now(0)


if __name__ == "__main__":
    main()
