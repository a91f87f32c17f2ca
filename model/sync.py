"""Keep a run's OUT directory in its bucket, on the node: `python -m model.sync push|pull|data`.

    python -m model.sync push OUT URL [--every 60] [--rank R] [--keep 3]   # loop; final push on exit/SIGTERM
    python -m model.sync pull URL OUT [--rank R]     # newest complete checkpoint (+ metrics) for --resume auto
    python -m model.sync data URL DIR [--max-mb-per-s X] [--timeline FILE] [--config CONFIG]   # model/streamdata.py
    python -m model.sync wait DIR [--pid PID] [--timeout S]   # until DIR holds what training needs first

Bucket layout under URL (= <bucket>/<run id>): the same tree as OUT (gpt2cloud/store/layout.py), each
checkpoint directory's manifest.json uploaded last, metrics.jsonl from the head node, logs/node-R.log
from node R.

A checkpoint is complete once its manifest is there; a reader ignores a directory without one. The
newest complete local checkpoint is pushed as soon as the trainer finishes writing it (its manifest
exists), so a preempted or failed node loses at most the steps since its last checkpoint.

`data` and `wait` (the shards streamed into DIR while training starts) are model/streamdata.py's.

Imports only the standard library and gpt2cloud's store package (boto3 is imported when an s3:// URL
is opened). Never imports typer, pydantic or skypilot.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path

from gpt2cloud.store import StorageError, open_store
from gpt2cloud.store.layout import (CHECKPOINTS, LOGS, MANIFEST, METRICS, PUSH_STATUS, TENSORBOARD, TIMELINE,
                                    UNSEEN_ATTEMPTS, local_checkpoints, node_log, remote_checkpoints)
from gpt2cloud.store.transfer import download_dir, upload_dir
from model import deadman, pushstate, stoprequest
from model.streamdata import EXIT_DATA, data, failure_code, log, run_length, wait_ready

# EXIT_DATA, failure_code, data and wait_ready live in model/streamdata.py and stay reachable as model.sync's
__all__ = ["EXIT_BUCKET", "EXIT_DATA", "EXIT_FINAL_PUSH", "FINAL_MAX_DELAY_S", "FINAL_TRIES", "Pusher", "data",
           "failure_code", "log", "main", "pull", "push_loop", "stop_on_signals", "wait_ready"]

# Exit codes: the node's run script passes them on (gpt2cloud/launch/task.py renders them into it).
EXIT_BUCKET = 4  # could not reach the run's bucket
EXIT_FINAL_PUSH = 5  # the final push failed: the last checkpoint is only on the node
FINAL_TRIES = 5  # the final push's attempts, backing off 1x, 2x, 4x, 8x the retry delay
FINAL_MAX_DELAY_S = 60.0  # between final-push attempts once they go on for --final-minutes


def delete_remote_dir(store, name: str) -> None:
    prefix = f"{CHECKPOINTS}/{name}/"
    keys = [o.key for o in store.list(prefix)]
    manifest = prefix + MANIFEST
    for key in sorted(keys, key=lambda k: k != manifest):  # unpublish first: the manifest goes first
        store.delete(key)


# ---- push ----

class Pusher:
    """Pushes what is new in OUT: the newest complete checkpoint, metrics.jsonl, this node's log."""

    def __init__(self, out: str | Path, url: str, rank: int = 0, keep: int = 0):
        self.out, self.url, self.rank, self.keep = Path(out), url, rank, keep
        self.store = open_store(url)
        self.pushed_checkpoints: set[str] = set()
        self.file_state: dict[str, tuple[int, int]] = {}
        if rank == 0:
            complete, _ = remote_checkpoints(self.store)
            self.pushed_checkpoints = {name for _, name in complete}

    def _push_file(self, path: Path, key: str) -> None:
        """Push a file the trainer keeps appending to (metrics, log) as a snapshot of its bytes: an
        upload streamed from the growing file would send more bytes than its Content-Length."""
        if not path.is_file():
            return
        st = path.stat()
        sig = (st.st_size, st.st_mtime_ns)
        if self.file_state.get(key) == sig:
            return
        self.store.put_bytes(key, path.read_bytes())
        self.file_state[key] = sig

    def push_checkpoint(self, ckpts: list[tuple[int, Path]] | None = None) -> None:
        """Upload the newest of `ckpts` (default: of the complete local checkpoints) unless pushed already."""
        ckpts = local_checkpoints(self.out) if ckpts is None else ckpts
        if not ckpts:
            return
        step, path = ckpts[-1]
        if path.name in self.pushed_checkpoints:
            return
        t0 = time.monotonic()
        try:
            result = upload_dir(path, self.store, prefix=f"{CHECKPOINTS}/{path.name}", progress=False)
        except FileNotFoundError:
            return  # the trainer pruned it meanwhile; a newer one is there to push next time
        self.pushed_checkpoints.add(path.name)
        log(f"pushed checkpoint step {step} ({result['bytes'] / 1e6:.1f} MB in {time.monotonic() - t0:.1f} s) "
            f"to {self.store.url_for(CHECKPOINTS + '/' + path.name)}")
        self.prune()

    def prune(self) -> None:
        """Keep the newest `keep` complete remote checkpoints; drop older and abandoned partial ones."""
        if self.keep <= 0:
            return
        complete, incomplete = remote_checkpoints(self.store)
        if not complete:
            return
        newest = complete[-1][0]
        old = complete[:-self.keep] + [c for c in incomplete if c[0] < newest]
        for _, name in old:
            delete_remote_dir(self.store, name)
            self.pushed_checkpoints.discard(name)

    def push_once(self) -> None:
        if self.rank == 0:
            # The metrics go up before the checkpoint, in a snapshot taken after the checkpoint was chosen
            # (the trainer logs a step before it checkpoints it). Wherever a kill cuts this short, the
            # bucket's metrics then hold every step up to its newest checkpoint: a run resumed from it
            # drops the steps after it and redoes them, and its metrics have no gap.
            ckpts = local_checkpoints(self.out)
            self._push_file(self.out / METRICS, METRICS)
            self._push_file(self.out / TIMELINE, TIMELINE)
            self.push_checkpoint(ckpts)
            # --tracker tensorboard: its event files (a resumed run writes a new one beside the old)
            for events in sorted((self.out / TENSORBOARD).glob("events.*")):
                self._push_file(events, f"{TENSORBOARD}/{events.name}")
        self._push_file(self.out / node_log(self.rank), node_log(self.rank))

    def attempt(self, every: float) -> str:
        """One push; "" when it worked, else what failed. Rank 0 records how it went (model/pushstate.py)
        and pushes that record last, so the bucket says when the node last saved its work."""
        try:
            self.push_once()
            if self.rank == 0:
                pushstate.record(self.out, True, every)
                self._push_file(self.out / PUSH_STATUS, PUSH_STATUS)
            return ""
        except (StorageError, OSError) as e:
            if self.rank == 0:
                with contextlib.suppress(OSError):  # a full disk: the push's own failure is what to report
                    pushstate.record(self.out, False, every, str(e))
            return str(e) or type(e).__name__


def push_loop(out: str, url: str, every: float, rank: int, keep: int, once: bool = False,
              retry_seconds: float = 5.0, final_minutes: float = 0.0) -> int:
    """Push every `every` seconds until told to stop (SIGTERM) or orphaned, then push once more: that
    final push, retried with backoff (FINAL_TRIES times, and for at least final_minutes), carries the
    trainer's last checkpoint. Its failure is the job's."""
    stop = threading.Event()
    with stop_on_signals(stop):
        return _push_until_stopped(out, url, every, rank, keep, once, retry_seconds, stop, final_minutes)


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event):
    """SIGTERM, SIGINT and SIGHUP set `stop` inside the block; the caller's handlers come back after it
    (push_loop is a library function too: a test or a caller must not inherit our handlers). Outside
    the main thread Python cannot install handlers: then only `stop` and orphaning end the loop."""
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _push_until_stopped(out: str, url: str, every: float, rank: int, keep: int, once: bool,
                        retry_seconds: float, stop: threading.Event, final_minutes: float = 0.0) -> int:
    parent = os.getppid()
    # before the trainer starts (the run script starts it after this): an earlier job's marker on a node
    # used again (a relaunch onto a live cluster) is not a stop this job was asked for
    stoprequest.clear_marker(out)
    pusher = None  # opened again every interval until the bucket answers: a hiccup must not end all pushes
    while not (once or stop.is_set() or os.getppid() != parent):
        pusher = pusher or _open_pusher(out, url, rank, keep, every)
        error = pusher.attempt(every) if pusher else "cannot reach the bucket"
        if error:
            log(f"push failed ({error}); next try in {every:g} s")
        if pusher:
            stoprequest.relay(pusher.store, out, log)  # `gpt2cloud down --graceful`: tell the trainer
        stop.wait(every)
    pusher = pusher or _open_pusher(out, url, rank, keep, every)
    if pusher is None:
        return EXIT_BUCKET
    return _final_push(pusher, every, retry_seconds, final_minutes)


def _open_pusher(out: str, url: str, rank: int, keep: int, every: float) -> "Pusher | None":
    """The pusher, or None (recorded as a failed push: the trainer and `status` see it) when the bucket
    cannot be reached now."""
    try:
        return Pusher(out, url, rank=rank, keep=keep)
    except StorageError as e:
        log(f"cannot reach the bucket: {e}")
        if rank == 0:
            with contextlib.suppress(OSError):
                pushstate.record(out, False, every, f"cannot reach the bucket: {e}")
        return None


def _final_push(pusher: "Pusher", every: float, retry_seconds: float, final_minutes: float) -> int:
    """The last push: FINAL_TRIES attempts backing off, and more (the delay capped at FINAL_MAX_DELAY_S)
    until final_minutes have passed: a bounded wait either way."""
    deadline = time.monotonic() + final_minutes * 60
    attempt = 0
    while True:
        attempt += 1
        e = pusher.attempt(every)
        if not e:
            log("final push done")
            return 0
        wait = min(FINAL_MAX_DELAY_S, retry_seconds * 2 ** (attempt - 1))
        more = attempt < FINAL_TRIES or time.monotonic() + wait < deadline
        log(f"final push failed (try {attempt}): {e}" + (f"; again in {wait:g} s" if more else ""))
        if not more:
            break
        time.sleep(wait)
    log("FINAL PUSH FAILED: the newest checkpoint and metrics are only on this node")
    return EXIT_FINAL_PUSH


# ---- pull ----

def _pull_into(store, complete: list, out: Path, rank: int) -> int | None:
    """The newest complete checkpoint that downloads and verifies (its step, or None), then the metrics,
    timeline and this node's log; a full disk is raised, never taken for a damaged checkpoint."""
    (out / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    (out / LOGS).mkdir(parents=True, exist_ok=True)
    got = None
    for step, name in reversed(complete):
        try:
            download_dir(store, f"{CHECKPOINTS}/{name}", out / CHECKPOINTS / name, progress=False)
            got = step
            break
        except StorageError as e:  # a damaged or half-deleted set: fall back to the one before
            if deadman.is_disk_full(e):
                raise
            log(f"checkpoint {name} unusable ({e}); trying an older one")
    for key, dest in ((METRICS, out / METRICS), (TIMELINE, out / TIMELINE), (node_log(rank), out / node_log(rank))):
        if (key in (METRICS, TIMELINE) and rank != 0) or dest.exists():
            continue
        try:
            if store.exists(key):
                store.get_file(key, dest)
        except StorageError as e:
            if deadman.is_disk_full(e):
                raise
            log(f"could not fetch {key}: {e}")
    if rank == 0:
        _pull_unseen_attempts(store, out)
    return got


def _pull_unseen_attempts(store, out: Path) -> None:
    """The bucket's count of attempts that never pushed (written by `gpt2cloud status`), for the trainer's
    cost clock: always the bucket's copy, the newest count; none there, none here (a copy an earlier job
    left on a reused node is not this run's word)."""
    dest = out / UNSEEN_ATTEMPTS
    try:
        if store.exists(UNSEEN_ATTEMPTS):
            store.get_file(UNSEEN_ATTEMPTS, dest)
        else:
            dest.unlink(missing_ok=True)
    except StorageError as e:
        if deadman.is_disk_full(e):
            raise
        log(f"could not fetch {UNSEEN_ATTEMPTS}: {e}")


def pull(url: str, out: str | Path, rank: int = 0) -> int:
    """Fetch the newest complete, verified checkpoint (and metrics, and this node's log) into OUT.
    A full disk ends it with EXIT_DISK_FULL: an older checkpoint would not fit either, and starting
    from scratch instead would throw the run's progress away."""
    out = Path(out)
    try:
        store = open_store(url)
        complete, _ = remote_checkpoints(store)
    except StorageError as e:
        log(f"cannot reach the bucket {url}: {e}")
        return EXIT_BUCKET
    try:
        got = _pull_into(store, complete, out, rank)
    except (StorageError, OSError) as e:
        if not deadman.is_disk_full(e):
            raise
        log(f"the node's disk is full: {e}; the checkpoint does not fit (the task's disk_size is too small)")
        deadman.note_disk_full(out, "pull")
        return deadman.EXIT_DISK_FULL
    if got is None:
        log(f"no complete checkpoint in {url}: starting from scratch")
    else:
        log(f"resuming from checkpoint step {got} of {url}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.sync", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    ps = sub.add_parser("push", help="upload OUT to URL every --every seconds; final push on exit/SIGTERM")
    ps.add_argument("out")
    ps.add_argument("url")
    ps.add_argument("--every", type=float, default=60.0)
    ps.add_argument("--rank", type=int, default=0, help="node rank: only node 0 pushes checkpoints and metrics")
    ps.add_argument("--keep", type=int, default=0, help="complete checkpoints to keep in the bucket (0: all)")
    ps.add_argument("--once", action="store_true", help="push once and exit")
    ps.add_argument("--retry-seconds", type=float, default=5.0, help="first delay between final-push attempts")
    ps.add_argument("--final-minutes", type=float, default=0.0,
                    help="keep retrying the final push this long (a managed job: its node goes when the job ends)")
    pl = sub.add_parser("pull", help="download the newest complete checkpoint from URL into OUT")
    pl.add_argument("url")
    pl.add_argument("out")
    pl.add_argument("--rank", type=int, default=0)
    pd = sub.add_parser("data", help="download the token shards at URL into DIR (manifest-verified), in order")
    pd.add_argument("url")
    pd.add_argument("dir")
    pd.add_argument("--max-mb-per-s", type=float, default=None, help="cap the download rate (tests, shared links)")
    pd.add_argument("--timeline", default=None, help="append a data_complete event to this file at the end")
    pd.add_argument("--config", default=None,
                    help="the trainer's config.json: only the training shards its steps read are downloaded")
    pw = sub.add_parser("wait", help="wait until DIR holds the validation and first training shards")
    pw.add_argument("dir")
    pw.add_argument("--pid", type=int, default=None, help="the process id of `data` running in the background")
    pw.add_argument("--timeout", type=float, default=deadman.DATA_BOUND,
                    help="give up after this many seconds (0: never)")
    a = p.parse_args(argv)
    if a.cmd == "push":
        return push_loop(a.out, a.url, a.every, a.rank, a.keep, once=a.once, retry_seconds=a.retry_seconds,
                         final_minutes=a.final_minutes)
    if a.cmd == "pull":
        return pull(a.url, a.out, rank=a.rank)
    if a.cmd == "wait":
        return wait_ready(a.dir, pid=a.pid, timeout=a.timeout)
    steps, tokens_per_step = run_length(a.config)
    return data(a.url, a.dir, max_mb_per_s=a.max_mb_per_s, timeline=a.timeline, steps=steps,
                tokens_per_step=tokens_per_step)


if __name__ == "__main__":
    sys.exit(main())
