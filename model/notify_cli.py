"""How a job ended, told once to --notify's URLs (model/notify.py sends it):

    python -m model.notify_cli EVENT [--text WHY] [--code N] [--out OUT] [--in-bucket yes|no|unknown] \
        [--node "R of N"] [--wait SECONDS]

The node's scripts run it from their EXIT trap (gpt2cloud/launch/scripts.py notify_end, bounded by
`timeout`), and `gpt2cloud train` calls tell_end() for a failed trainer: why it ended (the script's
words, else what its exit code means: REASONS), what was saved (the newest checkpoint in OUT, whether
it reached the bucket), the last step's figures, and what happens next (next_step: whether SkyPilot
relaunches a managed job after this end). It never fails (exit 0) and waits at most --wait seconds.

Imports only the standard library, model/ modules that do too, and the store's layout: a node's setup
runs it straight from the build's wheel before anything is installed.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Optional

from gpt2cloud.store.layout import METRICS, local_checkpoints
from model import deadman
from model.config import EXIT_DIVERGED, EXIT_NO_GPU, EXIT_REFUSED
from model.metrics import parse_metrics
from model.notify import EVENTS, NOTIFY_ENV, RETRY_DELAY_S, TIMEOUT_S, Notifier, log, run_name, urls_from_env
from model.sync import EXIT_BUCKET, EXIT_DATA, EXIT_FINAL_PUSH
from model.watchdog import EXIT_STALLED

MANAGED_JOB_ENV = "GPT2CLOUD_MANAGED_JOB"  # "1" on a managed (spot) job's node: SkyPilot relaunches some exits
CLI_WAIT_S = 2 * TIMEOUT_S + RETRY_DELAY_S + 1.0  # one event, its POST and its retry at the worst
EXIT_FAILED = 1  # Python's exit code for an uncaught exception (torchrun's for a failed child)
EXIT_TIMEOUT = 124  # coreutils `timeout`'s: the --max-hours hard limit
SIGNAL_CODES = {128 + signal.SIGHUP: "SIGHUP", 128 + signal.SIGINT: "SIGINT", 128 + signal.SIGTERM: "SIGTERM"}
PREEMPTED = 128 + signal.SIGTERM  # what a preemption's shutdown ends a job with

# what an exit code of the node means, when the script did not say more (docs/cloud.md, `status`)
REASONS = {
    EXIT_FAILED: "the trainer failed (its error is in the job's log)",
    EXIT_REFUSED: "the trainer refused to start (its one error line is in the job's log)",
    EXIT_DATA: "the data download or its sha256 check failed",
    EXIT_BUCKET: "the bucket could not be reached",
    EXIT_FINAL_PUSH: "the final push failed",
    EXIT_NO_GPU: "torch saw no GPU (setup)",
    deadman.EXIT_DISK_FULL: "the node's disk filled up",
    EXIT_DIVERGED: "the run diverged",
    EXIT_STALLED: "the trainer stalled (the watchdog ended it)",
    deadman.EXIT_SETUP_HUNG: "setup hung (deadman)",
    deadman.EXIT_PULL_HUNG: "the checkpoint pull hung (deadman)",
    deadman.EXIT_DATA_HUNG: "the first shards never arrived (deadman)",
    deadman.EXIT_STARTUP_HUNG: "the trainer's start-up hung (deadman)",
    deadman.EXIT_RENDEZVOUS_HUNG: "a node never joined the rendezvous (deadman)",
    EXIT_TIMEOUT: "the --max-hours hard limit killed the trainer",
    **{code: f"the job got {name}" for code, name in SIGNAL_CODES.items()},
}


def recovered_codes() -> tuple:
    """The exit codes a managed job relaunches on a fresh node (gpt2cloud/launch/task.py JOB_RECOVERY)."""
    return (EXIT_STALLED, *deadman.RECOVERABLE)


def next_step(code: Optional[int], env: Optional[dict] = None, event: Optional[str] = None) -> str:
    """What happens after this exit: a managed job relaunches some codes; otherwise autostop removes the node.
    A `preemption` event is a signal's end whatever code the trainer left (the scripts' trap may see 0)."""
    env = os.environ if env is None else env
    if event == "preemption":
        code = PREEMPTED
    if code is None:
        return ""
    if env.get(MANAGED_JOB_ENV) == "1":
        if code in recovered_codes():
            return " SkyPilot relaunches the managed job on a fresh node, which resumes from the bucket."
        if code in SIGNAL_CODES:
            return " A preempted managed job is relaunched by SkyPilot; a cancelled one is not."
        return " A managed job is not relaunched after this exit code."
    return ""


# ---- what the node holds: the newest checkpoint, the last step's figures ----


def last_figures(out: Path, tail_bytes: int = 256 * 1024) -> dict:
    """{"step", "loss", "cost_usd"} of OUT/metrics.jsonl's last step (from its end: it may be long)."""
    try:
        with open(out / METRICS, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - tail_bytes))
            rows = parse_metrics(f.read().decode("utf-8", "replace"))
    except OSError:
        return {}
    steps = [r for r in rows if "loss" in r and isinstance(r.get("step"), int)]
    if not steps:
        return {}
    return {"step": steps[-1]["step"], "loss": steps[-1]["loss"], "cost_usd": steps[-1].get("cost_usd")}


def newest_checkpoint(out: Path) -> Optional[int]:
    try:
        found = local_checkpoints(out)
    except OSError:
        return None
    return found[-1][0] if found else None


BUCKET_STATES = ("yes", "no", "unknown")  # whether the node's newest checkpoint reached the bucket (--in-bucket)


def what_was_saved(out: Optional[Path], in_bucket: Optional[str]) -> tuple[str, dict]:
    """(a sentence, fields): the newest complete checkpoint in OUT and whether it reached the bucket: one of
    BUCKET_STATES on a node, None without a bucket (`gpt2cloud train`)."""
    step = newest_checkpoint(out) if out is not None else None
    fields = {"checkpoint_step": step, "in_bucket": {"yes": True, "no": False}.get(in_bucket)}
    if step is None:
        where = "nothing to resume" if in_bucket is None else "the bucket keeps what earlier attempts pushed"
        return f"No checkpoint here ({where}).", fields
    if in_bucket is None:
        return f"The newest checkpoint is step {step}, in {out}.", fields
    if in_bucket == "yes":
        return f"The newest checkpoint, step {step}, is in the bucket: relaunch the same --name to resume.", fields
    if in_bucket == "no":
        return (f"The newest checkpoint, step {step}, is ONLY on the node ({out}): copy it before autostop removes "
                "the node (see the job's log).", fields)
    return (f"The node's newest checkpoint is step {step}; whether its last push reached the bucket is not known "
            "(`gpt2cloud status` says what the bucket holds).", fields)


# ---- telling it ----


def tell_end(urls: list[str], event: str, text: str = "", *, out: Optional[Path] = None,
             in_bucket: Optional[str] = None, code: Optional[int] = None, node: Optional[str] = None,
             wait: float = CLI_WAIT_S) -> None:
    """How a job ended, told once (the node's scripts, a failed `gpt2cloud train`): why, what was saved, the
    last step's figures and what happens next. Waits at most `wait` seconds; never raises for a URL."""
    if not urls:
        return
    saved, fields = what_was_saved(out, in_bucket)
    why = (text or REASONS.get(code, f"exit code {code}" if code is not None else event)).rstrip(". ")
    if event == "preemption":
        why += " (a preemption's shutdown, `gpt2cloud down`, or a cancel)"
    where = f" on node {node}" if node else ""
    notifier = Notifier(urls, run_name(out))
    notifier.send(event, f"{event}{where}: {why}. {saved}{next_step(code, event=event)}", code=code, node=node,
                  **fields, **(last_figures(out) if out else {}))
    notifier.close(max(0.0, wait))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m model.notify_cli",
                                description=f"Tell the URLs in ${NOTIFY_ENV} (one a line) that EVENT happened; "
                                            "never fails (exit 0), waits at most --wait seconds.")
    p.add_argument("event", choices=EVENTS)
    p.add_argument("--text", default="", help="what happened (default: what --code means)")
    p.add_argument("--code", type=int, default=None, help="the job's exit code")
    p.add_argument("--out", default=None, help="the run's OUT: its newest checkpoint and last step are told")
    p.add_argument("--in-bucket", choices=BUCKET_STATES, default=None,
                   help="whether OUT's newest checkpoint reached the bucket (the final push worked)")
    p.add_argument("--node", default=None, help="this node, as 'R of N' (several nodes)")
    p.add_argument("--wait", type=float, default=CLI_WAIT_S, help="the most seconds to wait for the sends")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    tell_end(urls_from_env(), args.event, args.text, out=Path(args.out) if args.out else None,
             in_bucket=args.in_bucket, code=args.code, node=args.node, wait=args.wait)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # noqa: BLE001 - a notification never fails the script that asked for it
        log(f"not sent ({type(e).__name__}: {e})")
        sys.exit(0)
