"""Keep a run's OUT directory in its bucket, on the node: `python -m model.sync push|pull|data`.

    python -m model.sync push OUT URL [--every 60] [--rank R] [--keep 3]   # loop; final push on exit/SIGTERM
    python -m model.sync pull URL OUT [--rank R]     # newest complete checkpoint (+ metrics) for --resume auto
    python -m model.sync data URL DIR                # the token shards, sha256-verified against their manifest

Bucket layout under URL (= <bucket>/<run id>): the same tree as OUT (gpt2cloud/store/layout.py), each
checkpoint directory's manifest.json uploaded last, metrics.jsonl from the head node, logs/node-R.log
from node R.

A checkpoint is complete once its manifest is there; a reader ignores a directory without one. The
newest complete local checkpoint is pushed as soon as the trainer finishes writing it (its manifest
exists), so a preempted or failed node loses at most the steps since its last checkpoint.

Imports only the standard library and gpt2cloud's store package (boto3 is imported when an s3:// URL
is opened). Never imports typer, pydantic or skypilot.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

from gpt2cloud.store import StorageError, open_store
from gpt2cloud.store.layout import (CHECKPOINTS, LOGS, MANIFEST, METRICS, TIMELINE, local_checkpoints, node_log,
                                    remote_checkpoints)
from gpt2cloud.store.transfer import download_dir, upload_dir

# Exit codes: the node's run script passes them on (gpt2cloud/launch/task.py renders them into it).
EXIT_DATA = 3  # could not download the shards from --data
EXIT_BUCKET = 4  # could not reach the run's bucket
EXIT_FINAL_PUSH = 5  # the final push failed: the last checkpoint is only on the node
FINAL_TRIES = 5  # the final push's attempts, backing off 1x, 2x, 4x, 8x the retry delay


def log(msg: str) -> None:
    print(f"gpt2cloud sync: {msg}", file=sys.stderr, flush=True)


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
        self._push_file(self.out / node_log(self.rank), node_log(self.rank))


def push_loop(out: str, url: str, every: float, rank: int, keep: int, once: bool = False,
              retry_seconds: float = 5.0) -> int:
    """Push every `every` seconds until told to stop (SIGTERM) or orphaned, then push once more: that
    final push, retried with backoff, carries the trainer's last checkpoint. Its failure is the job's."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    parent = os.getppid()
    try:
        pusher = Pusher(out, url, rank=rank, keep=keep)
    except StorageError as e:
        log(f"cannot reach the bucket: {e}")
        return EXIT_BUCKET
    while not (once or stop.is_set() or os.getppid() != parent):
        try:
            pusher.push_once()
        except (StorageError, OSError) as e:
            log(f"push failed ({e}); next try in {every:g} s")
        stop.wait(every)
    for attempt in range(1, FINAL_TRIES + 1):
        try:
            pusher.push_once()
            log("final push done")
            return 0
        except (StorageError, OSError) as e:
            wait = retry_seconds * 2 ** (attempt - 1)
            log(f"final push failed ({attempt}/{FINAL_TRIES}): {e}" + (f"; again in {wait:g} s" if attempt < FINAL_TRIES else ""))
            if attempt < FINAL_TRIES:
                time.sleep(wait)
    log("FINAL PUSH FAILED: the newest checkpoint and metrics are only on this node")
    return EXIT_FINAL_PUSH


# ---- pull ----

def pull(url: str, out: str | Path, rank: int = 0) -> int:
    """Fetch the newest complete, verified checkpoint (and metrics, and this node's log) into OUT."""
    out = Path(out)
    try:
        store = open_store(url)
        complete, _ = remote_checkpoints(store)
    except StorageError as e:
        log(f"cannot reach the bucket {url}: {e}")
        return EXIT_BUCKET
    (out / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    (out / LOGS).mkdir(parents=True, exist_ok=True)
    got = None
    for step, name in reversed(complete):
        try:
            download_dir(store, f"{CHECKPOINTS}/{name}", out / CHECKPOINTS / name, progress=False)
            got = step
            break
        except StorageError as e:  # a damaged or half-deleted set: fall back to the one before
            log(f"checkpoint {name} unusable ({e}); trying an older one")
    for key, dest in ((METRICS, out / METRICS), (TIMELINE, out / TIMELINE), (node_log(rank), out / node_log(rank))):
        if (key in (METRICS, TIMELINE) and rank != 0) or dest.exists():
            continue
        try:
            if store.exists(key):
                store.get_file(key, dest)
        except StorageError as e:
            log(f"could not fetch {key}: {e}")
    if got is None:
        log(f"no complete checkpoint in {url}: starting from scratch")
    else:
        log(f"resuming from checkpoint step {got} of {url}")
    return 0


def data(url: str, dest: str | Path) -> int:
    t0 = time.monotonic()
    try:
        result = download_dir(open_store(url), "", dest, progress=False)
    except StorageError as e:
        log(f"cannot fetch the data: {e}")
        return EXIT_DATA
    log(f"data: {result['files']} files, {result['bytes'] / 1e6:.1f} MB downloaded "
        f"({result['skipped']} already there) in {time.monotonic() - t0:.1f} s, all sha256-verified")
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
    pl = sub.add_parser("pull", help="download the newest complete checkpoint from URL into OUT")
    pl.add_argument("url")
    pl.add_argument("out")
    pl.add_argument("--rank", type=int, default=0)
    pd = sub.add_parser("data", help="download the token shards at URL into DIR (manifest-verified)")
    pd.add_argument("url")
    pd.add_argument("dir")
    a = p.parse_args(argv)
    if a.cmd == "push":
        return push_loop(a.out, a.url, a.every, a.rank, a.keep, once=a.once, retry_seconds=a.retry_seconds)
    if a.cmd == "pull":
        return pull(a.url, a.out, rank=a.rank)
    return data(a.url, a.dir)


if __name__ == "__main__":
    sys.exit(main())
