"""The trainer, one loop read top to bottom (after build-nanogpt):

    torchrun --standalone --nproc_per_node N -m model.train --config CONFIG.json --data DIR --out OUT \
        [--resume auto|never] [--steps N]

Set up DDP, data, model and optimizer; resume from the newest complete checkpoint in OUT; then each
step: check the budget, forward/backward over the micro-steps, clip, step, log; now and then
validate, score HellaSwag, sample and checkpoint. A plain `python -m model.train ...` runs as a single rank.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt2cloud.store.layout import CHECKPOINTS, METRICS, TIMELINE
from model import checkpoint as ckpt
from model.config import ERROR_FILE_ENV, BatchError, TrainConfig
from model.data import TokenLoader, find_shards
from model.eval import EvalDataError, evaluate, hellaswag_eval, load_hellaswag, val_loader_steps
from model.metrics import MetricsLog, console_line, cost_usd, mfu, node_seconds_before, parse_metrics, truncate_after
from model.sample import generate_text
from model.shards import ShardError
from model.step import get_lr, pick_dtype, schedule_length, setup_training, train_step  # noqa: F401 (re-exported)
from model.tokenizer import VOCAB_SIZE
from model.watchdog import Watchdog


class TrainError(RuntimeError):
    """A problem the user can fix (config, resume); printed as one line, exit code 2."""


CHECK_SECONDS = 2.0  # the budget/time check (a host-device sync) runs about this often, or every step if slower


def steps_that_fit(step_seconds: float, *seconds_left: float) -> int:
    """How many more steps of `step_seconds` (the slowest recent, with its margin) fit in every one of
    `seconds_left`, and no more than CHECK_SECONDS of them: the steps before the budget check must run
    again. 1 while no step time is known yet (check before every step until one is)."""
    if step_seconds <= 0:
        return 1
    fit = max(1, int(CHECK_SECONDS / step_seconds))
    for left in seconds_left:
        if left != math.inf:
            fit = min(fit, int(max(0.0, left) / step_seconds * (1 - 1e-9)))
    return max(0, fit)


def run(args, t_start: float) -> None:
    try:
        cfg = TrainConfig.load(args.config)
    except (OSError, ValueError, TypeError) as e:
        raise TrainError(f"config {args.config}: {e}") from None
    # The schedule's length is the config's (recipe's) steps unless schedule_steps says otherwise;
    # --steps only moves where this run stops, so 20 steps then 40 follow one schedule.
    if args.schedule_steps:
        cfg.schedule_steps = args.schedule_steps
    cfg.schedule_steps = schedule_length(cfg)
    if args.steps:
        cfg.steps = args.steps
    if os.environ.get("GPT2CLOUD_PRICE_PER_GPU_HOUR"):  # an any_of launch: the price of the cloud it landed on
        cfg.price_per_gpu_hour = float(os.environ["GPT2CLOUD_PRICE_PER_GPU_HOUR"])

    # ---- processes: torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; nccl on CUDA, gloo on CPU ----
    launched = "RANK" in os.environ  # under torchrun
    rank, local_rank, world = ((int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if launched
                               else (0, 0, 1))
    ddp = world > 1  # one process (torchrun or not) needs no process group, no DDP wrapper, no all-reduce
    if cfg.device == "cuda":  # rented GPUs: training on the node's CPU would bill for nothing
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if seen < local_world:
            raise TrainError(f"this node has {local_world} ranks to place on GPUs but torch {torch.__version__} (built for "
                             f"CUDA {torch.version.cuda}) sees {seen} CUDA devices: its build does not match the driver "
                             "(see `nvidia-smi`), or the GPUs are not visible")
    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if ddp:
        if device_type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    master = rank == 0
    log = functools.partial(print, flush=True) if master else (lambda *a, **k: None)

    # ---- batch: micro_batch x block_size tokens per rank per micro-step, accumulated to tokens_per_step ----
    B, T = cfg.micro_batch, cfg.model.block_size
    try:
        grad_accum = cfg.grad_accum(world)
    except BatchError as e:
        raise TrainError(f"{e}; choose another number of processes or micro-batch") from None

    # ---- data ----
    train_shards, val_shards = find_shards(args.data, cfg.model.vocab_size)
    data_id = ckpt.data_identity(args.data)  # checkpointed: a resume on other shards is another run
    train_loader = TokenLoader(train_shards, B, T, rank, world, grad_accum, log=log)
    val_loader = None
    if val_shards and cfg.val_every > 0:
        try:
            val_loader = TokenLoader(val_shards, B, T, rank, world, val_loader_steps(cfg.val_steps, world), log=log)
        except ShardError as e:
            log(f"note: no validation loss: {e}")

    # ---- HellaSwag every hellaswag_every steps: --hellaswag FILE, or DATA/hellaswag_val.jsonl if present ----
    hellaswag = None
    if cfg.hellaswag_every > 0:
        hs_path = Path(args.hellaswag) if args.hellaswag else Path(args.data) / "hellaswag_val.jsonl"
        if cfg.model.vocab_size < VOCAB_SIZE:
            log("note: no HellaSwag: the model's vocabulary is smaller than GPT-2's")
        elif not hs_path.is_file():
            log(f"note: no HellaSwag: {hs_path} does not exist (pass --hellaswag FILE)")
        else:
            try:
                hellaswag = load_hellaswag(hs_path)
            except EvalDataError as e:
                raise TrainError(str(e)) from None

    # ---- model, precision, optimizer ----
    s = setup_training(cfg, device)
    raw_model, dtype, amp, scaler, optimizer = s.raw_model, s.dtype, s.amp, s.scaler, s.optimizer

    # ---- resume: weights, optimizer, schedule position, data position, RNG ----
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # On a node, cost and time limits count node time since it came up (and earlier attempts'), not
    # only this loop: what the bucket's timeline and metrics say, read before anything truncates them.
    node_up = float(os.environ["GPT2CLOUD_NODE_UP"]) if os.environ.get("GPT2CLOUD_NODE_UP") else None
    node_before = 0.0
    if node_up is not None:
        pulled = [r for name in (TIMELINE, METRICS) if (out / name).is_file()
                  for r in parse_metrics((out / name).read_text(encoding="utf-8"))]
        node_before = node_seconds_before(pulled, node_up)
    watchdog = Watchdog(cfg.stall_minutes * 60, out, functools.partial(print, f"rank {rank}:", flush=True)).start()
    train_loader.set_heartbeat(watchdog.beat)  # waiting for a shard that is still downloading is not a stall
    latest = ckpt.latest_checkpoint(out)
    if ddp:  # rank 0 chooses; every rank must see that same checkpoint (shared or synced OUT on every node)
        chosen = [latest.name if latest is not None else None]
        dist.broadcast_object_list(chosen, src=0)
        latest = out / CHECKPOINTS / chosen[0] if chosen[0] else None
        if latest is not None and not (latest / ckpt.MANIFEST).exists():
            raise TrainError(f"rank {rank} cannot see {latest}: --out must be on a filesystem every node "
                             "shares, or be copied to every node before resuming")
    start_step, elapsed_before, tokens_seen, loss = 0, 0.0, 0, None
    gpu_seconds_before = 0.0  # GPU-seconds the runs this one resumes used, each at its own world size
    slowest_iter_before = 0.0  # the resumed run's slowest recent loop iteration (the budget check's estimate)
    if latest is not None and args.resume == "never":
        raise TrainError(f"{out} already holds checkpoints (newest {latest.name}); use --resume auto to "
                         "continue that run, or a new --out to start another")
    if latest is not None:
        # the sha256 of every file once per node (its LOCAL_RANK 0 reads them all); the other ranks
        # read the manifest only, and no rank goes on if the check failed anywhere
        error = None
        try:
            saved = ckpt.verify_checkpoint(latest) if local_rank == 0 else ckpt.read_manifest(latest)
        except ckpt.CheckpointError as e:
            error = str(e)
        if ddp:
            failed = torch.tensor(int(error is not None), device=device)
            dist.all_reduce(failed)
            if failed.item() and error is None:
                error = f"{latest}: a file failed its sha256 check on another node"
        if error is not None:
            raise TrainError(ckpt.damaged_refusal(latest, error))
        resumed_state = json.loads((latest / "trainer_state.json").read_text())
        refusal = ckpt.resume_refusal(latest, saved["config"], cfg, resumed_state.get("data_identity"), data_id)
        if refusal:  # another recipe, model or data: not this run's continuation
            raise TrainError(refusal)
        state = ckpt.load_training_state(latest, raw_model, optimizer, scaler, rank, device)
        train_loader.set_state(state["data"])
        start_step, elapsed_before = state["step"], state["elapsed_seconds"]
        gpu_seconds_before = state.get("gpu_seconds", elapsed_before * state["world_size"])
        tokens_seen, loss = state["tokens_seen"], state["loss"]
        slowest_iter_before = state.get("slowest_iteration_seconds", 0.0)
        if state["world_size"] != world:
            log(f"note: {latest.name} was written by {state['world_size']} ranks, this run has {world}: same data "
                f"position and tokens per step, gradient accumulation now {grad_accum}")
        if not state["rng_restored"]:  # a rank the checkpoint did not have: a fresh, distinct stream
            torch.manual_seed(cfg.seed + 1000 * rank + start_step)
        log(f"resuming from {latest} (step {start_step})")

    # ---- wrap; the raw module is what we save and sample from ----
    model = eval_model = s.model
    if ddp:  # gradients live in DDP's buckets: no second copy of them
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None, gradient_as_bucket_view=True)

    # ---- metrics ----
    metrics_path = out / METRICS
    if master:
        if latest is not None:
            truncate_after(metrics_path, start_step)  # steps the killed run logged after its checkpoint
        elif metrics_path.exists():
            metrics_path.unlink()  # no checkpoint: a new run, whatever an earlier attempt logged
    metrics = MetricsLog(metrics_path, enabled=master)
    metrics.write({"event": "start", "world_size": world, "config": dataclasses.asdict(cfg),
                   "resumed_from": start_step if latest is not None else None, "device": device_type,
                   "dtype": str(dtype).removeprefix("torch."), "grad_accum": grad_accum, "ddp": ddp,
                   "params": raw_model.num_params()})
    flops_tok = cfg.model.flops_per_token()
    budget = cfg.max_cost_usd > 0 and cfg.price_per_gpu_hour > 0

    def elapsed() -> float:  # seconds of this run so far, over all its restarts (node time on a node)
        if node_up is not None:
            return node_before + time.time() - node_up
        return elapsed_before + time.time() - t_start

    def gpu_seconds() -> float:
        """GPU-seconds so far: each earlier run's at its own world size (from the checkpoint), this one's at
        ours. On a node: its node time (all attempts) x the GPUs it has."""
        if node_up is not None:
            return elapsed() * world
        return gpu_seconds_before + (time.time() - t_start) * world

    def cost_so_far(extra_seconds: float = 0.0) -> float:
        return cost_usd(gpu_seconds() + extra_seconds * world, 1, cfg.price_per_gpu_hour)

    writer = ckpt.BackgroundWriter()
    copy_seconds: dict[int, float] = {}  # step -> the blocking part of its checkpoint

    def report_checkpoints(wait: bool = False) -> None:
        """The metrics line and log of every checkpoint whose background write has finished."""
        if wait:
            writer.wait()
        for done in writer.pop_done():
            metrics.write({"event": "checkpoint", "step": done["step"], "path": done["path"],
                           "seconds": copy_seconds.pop(done["step"], 0.0), "write_seconds": done["write_seconds"]})
            log(f"checkpoint {done['path']}")

    def save_checkpoint(step: int) -> None:
        rngs = [ckpt.rng_state()]
        if ddp:  # every rank's RNG, gathered to rank 0 (no shared filesystem needed)
            gathered = [None] * world if master else None
            dist.gather_object(rngs[0], gathered, dst=0)
            rngs = gathered
        if master:
            state = {"step": step, "tokens_seen": tokens_seen, "elapsed_seconds": elapsed(), "loss": loss,
                     "gpu_seconds": gpu_seconds(), "data_identity": data_id,
                     "data": train_loader.state(), "world_size": world, "grad_accum": grad_accum,
                     "slowest_iteration_seconds": max(recent_iters, default=0.0)}
            t0 = time.perf_counter()
            # the host copy is all the training waits for; the disk write goes on in the background
            weights = ckpt.to_host(ckpt.weights_state_dict(raw_model))
            opt_state = ckpt.to_host({"optimizer": optimizer.state_dict(),
                                      "scaler": scaler.state_dict() if scaler.is_enabled() else None})
            config = dataclasses.asdict(cfg)
            writer.submit(step, lambda: ckpt.write_checkpoint(out, step, weights, opt_state, state, rngs, config,
                                                              cfg.keep_checkpoints))
            copy_seconds[step] = time.perf_counter() - t0
        if ddp:
            dist.barrier()

    # ---- a step's numbers, read from the device one step late ----
    # On CUDA, reading a step's loss right after queueing it would stall the host until the GPU is done
    # and leave the GPU idle while the next step is queued. So step k's loss and norm are read after step
    # k+1 is queued (the GPU is still busy), and before anything that needs them (val, checkpoint, the
    # budget check, the end). Each record still holds its own step's loss, norm and (CUDA events) time.
    # On CPU the ops are synchronous anyway: read at once (GPT2CLOUD_DEFER_READS=1 defers there too).
    defer = device_type == "cuda" or os.environ.get("GPT2CLOUD_DEFER_READS") == "1"
    pending = None  # the step queued and not yet read: (step, loss tensor, norm tensor, lr, timer)

    def finish_pending() -> None:
        nonlocal pending, loss
        if pending is None:
            return
        (done, loss_t, norm_t, lr_done, timer, tokens_at), pending = pending, None
        loss = loss_t.item()  # waits for that step on the device
        dt = timer()
        tok_s = cfg.tokens_per_step / dt
        record = {"step": done, "loss": loss, "lr": lr_done, "grad_norm": norm_t.item(), "step_seconds": dt,
                  "tokens_per_second": tok_s, "mfu": mfu(tok_s, flops_tok, cfg.peak_flops_per_gpu, world),
                  "tokens_seen": tokens_at, "elapsed_seconds": elapsed()}
        if cfg.price_per_gpu_hour > 0:
            record["cost_usd"] = cost_so_far()
        metrics.write(record)
        log(console_line(done, cfg.steps, loss, lr_done, record["grad_norm"], tok_s, dt))
        watchdog.beat(f"step {done}")

    def start_timer():
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

    # ---- the loop ----
    if start_step >= cfg.steps:
        log(f"nothing to do: {latest.name} is at step {start_step} of {cfg.steps}")
    step, saved_step = start_step, (start_step if latest is not None else None)
    # wall time of recent loop iterations (step + val + sample + checkpoint): the budget check
    # predicts the next one from the slowest, with a 50% margin for a busier host. A resumed run starts
    # from the slowest its checkpoint saw: else one stopped at its cap would take a step past it.
    recent_iters = collections.deque([slowest_iter_before] if slowest_iter_before else [], maxlen=10)
    iter_start = None
    next_check = step  # the budget/time check runs before this step (then every few steps, see below)
    while step < cfg.steps:
        now = time.time()
        if iter_start is not None:
            recent_iters.append(now - iter_start)
        iter_start = now
        if (budget or cfg.max_hours > 0) and step >= next_check:
            # Stop before a step that would take the cost or the wall time past its cap; rank 0 decides
            # for all, and how many steps surely fit before the next check: each check waits for the
            # device (the time is only known then), so it runs about every CHECK_SECONDS, never less often
            # than the caps allow.
            finish_pending()
            decision = torch.zeros(2, dtype=torch.long, device=device)
            if master:
                margin = 1.5 * max(recent_iters, default=0.0)
                over_cost = budget and cost_so_far(margin) > cfg.max_cost_usd
                over_time = cfg.max_hours > 0 and elapsed() + margin > cfg.max_hours * 3600
                fit = steps_that_fit(margin, cfg.max_cost_usd / cfg.price_per_gpu_hour * 3600 / world
                                     - gpu_seconds() / world if budget else math.inf,
                                     cfg.max_hours * 3600 - elapsed() if cfg.max_hours > 0 else math.inf)
                decision[0] = int(over_cost) + 2 * int(over_time)
                decision[1] = fit
            if ddp:
                dist.broadcast(decision, 0)
            stop, fit = decision.tolist()
            next_check = step + max(1, fit)
            if stop:
                if saved_step != step:
                    save_checkpoint(step)
                report_checkpoints(wait=True)
                spent = cost_so_far()
                if stop & 1:
                    metrics.write({"event": "budget_stop", "step": step, "cost_usd": spent})
                    log(f"budget: stopping at step {step}, ${spent:.2f} spent of ${cfg.max_cost_usd:.2f}; "
                        "raise max_cost_usd and resume to continue")
                else:
                    metrics.write({"event": "time_stop", "step": step, "elapsed_seconds": elapsed()})
                    log(f"time: stopping at step {step} after {elapsed() / 3600:.2f} h of the {cfg.max_hours:g} h "
                        "limit; raise max_hours and resume to continue")
                break

        lr = get_lr(step, cfg)
        stop_timer = start_timer()
        loss_t, norm = train_step(model, optimizer, scaler, train_loader, grad_accum, amp, cfg.grad_clip, lr,
                                  ddp, device)
        if ddp:
            dist.all_reduce(loss_t)  # the logged loss: mean over ranks and micro-steps
            loss_t /= world
        timer = stop_timer()
        step += 1
        tokens_seen += cfg.tokens_per_step
        queued = (step, loss_t, norm, lr, timer, tokens_seen)
        if defer:
            finish_pending()  # the step before this one: done, or nearly, while this one runs
            pending = queued
        else:
            pending = queued
            finish_pending()

        val_due = val_loader is not None and (step % cfg.val_every == 0 or step == cfg.steps)
        # sampling needs the GPT-2 vocabulary (tests use tiny ones); the raw module also works when compiled
        sample_due = (master and cfg.sample_every > 0 and step % cfg.sample_every == 0
                      and cfg.model.vocab_size >= VOCAB_SIZE)
        hellaswag_due = bool(hellaswag) and (step % cfg.hellaswag_every == 0 or step == cfg.steps)
        checkpoint_due = step % cfg.checkpoint_every == 0 or step == cfg.steps
        if val_due or sample_due or hellaswag_due or checkpoint_due:
            finish_pending()  # this step's line first, and the loss a checkpoint stores
        if val_due:
            t0 = time.perf_counter()
            val_loss = evaluate(eval_model, val_loader, world, amp, device, ddp, cfg.val_steps)
            metrics.write({"step": step, "val_loss": val_loss, "seconds": time.perf_counter() - t0})
            log(f"step {step}/{cfg.steps} | val loss {val_loss:.4f}")
            watchdog.beat(f"val loss at step {step}")
        if sample_due:
            text = generate_text(raw_model, cfg.sample_prompt, cfg.sample_tokens, top_k=50, seed=cfg.seed + step,
                                 autocast_dtype=dtype if dtype != torch.float32 else None)[0]
            metrics.write({"step": step, "sample": text})
            log(f"step {step}/{cfg.steps} | sample: {text!r}")
            watchdog.beat(f"sample at step {step}")
        if hellaswag_due:
            t0 = time.perf_counter()
            hs = hellaswag_eval(raw_model, hellaswag, device, rank, world, ddp)
            metrics.write({"step": step, **hs, "seconds": time.perf_counter() - t0})
            log(f"step {step}/{cfg.steps} | hellaswag acc_norm {hs['hellaswag_acc_norm']:.4f} ({hs['hellaswag_n']})")
            watchdog.beat(f"HellaSwag at step {step}")
        if checkpoint_due:
            save_checkpoint(step)
            saved_step = step
            watchdog.beat(f"checkpoint at step {step}")
        report_checkpoints()
    else:
        finish_pending()
        report_checkpoints(wait=True)  # the last checkpoint is on disk before the run says it ended
        metrics.write({"event": "end", "step": step, "final_loss": loss})
        log(f"done: step {step}, final loss {loss if loss is None else round(loss, 4)}")
    report_checkpoints(wait=True)
    watchdog.stop()
    metrics.close()
    if ddp:
        dist.destroy_process_group()


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


REFUSED = 2  # the exit code of a refusal: one `error:` line, the user's to fix


def refuse(message: str) -> None:
    """Print the one line (rank 0: every rank hits the same problem), note it where the CLI looks, exit 2."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr, flush=True)
        if os.environ.get(ERROR_FILE_ENV):
            Path(os.environ[ERROR_FILE_ENV]).write_text(message + "\n", encoding="utf-8")
    sys.exit(REFUSED)


def main(argv=None) -> None:
    t_start = time.time()
    args = parse_args(argv)
    try:
        run(args, t_start)
    except (TrainError, ShardError, ckpt.CheckpointError, FileNotFoundError) as e:
        refuse(str(e))


if __name__ == "__main__":
    main()
