"""Keep a run's OUT directory in its bucket, on the node: `python -m model.sync push|pull|data`.

    python -m model.sync push OUT URL [--every 60] [--rank R] [--keep 3]   # loop; final push on exit/SIGTERM
    python -m model.sync pull URL OUT [--rank R]     # newest complete checkpoint (+ metrics) for --resume auto
    python -m model.sync data URL DIR                # the token shards, sha256-verified against their manifest

Bucket layout under URL (= <bucket>/<run id>):
    checkpoints/step_NNNNNN/...   each checkpoint directory, its manifest.json uploaded last
    metrics.jsonl                 the trainer's metrics (head node)
    logs/node-R.log               console output of node R

A checkpoint is complete once its manifest is there; a reader ignores a directory without one. The
newest complete local checkpoint is pushed as soon as the trainer finishes writing it (its manifest
exists), so a preempted or failed node loses at most the steps since its last checkpoint.

Imports only the standard library at the top; the storage layer (and boto3 for s3://) is imported
when used. Never imports typer, pydantic or skypilot.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step_(\d+)$")


def log(msg: str) -> None:
    print(f"gpt2cloud sync: {msg}", file=sys.stderr, flush=True)


def _store(url: str):
    from gpt2cloud.storage import open_store

    return open_store(url)


# ---- what is where ----

def local_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete local checkpoints (manifest present), oldest first."""
    d = Path(out) / CHECKPOINTS
    found = []
    if d.is_dir():
        for p in d.iterdir():
            m = STEP_DIR.match(p.name)
            if m and (p / MANIFEST).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def remote_checkpoints(store) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(complete, incomplete) remote checkpoint directory names, oldest first."""
    dirs: dict[str, bool] = {}
    for obj in store.list(f"{CHECKPOINTS}/"):
        parts = obj.key.split("/")
        if len(parts) >= 3 and parts[0] == CHECKPOINTS and STEP_DIR.match(parts[1]):
            dirs[parts[1]] = dirs.get(parts[1], False) or (len(parts) == 3 and parts[2] == MANIFEST)
    complete = sorted((int(STEP_DIR.match(n).group(1)), n) for n, ok in dirs.items() if ok)
    incomplete = sorted((int(STEP_DIR.match(n).group(1)), n) for n, ok in dirs.items() if not ok)
    return complete, incomplete


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
        self.store = _store(url)
        self.pushed_checkpoints: set[str] = set()
        self.file_state: dict[str, tuple[int, int]] = {}
        if rank == 0:
            complete, _ = remote_checkpoints(self.store)
            self.pushed_checkpoints = {name for _, name in complete}

    def _push_file(self, path: Path, key: str) -> None:
        if not path.is_file():
            return
        st = path.stat()
        sig = (st.st_size, st.st_mtime_ns)
        if self.file_state.get(key) == sig:
            return
        self.store.put_file(path, key)
        self.file_state[key] = sig

    def push_checkpoint(self) -> None:
        from gpt2cloud.transfer import upload_dir

        ckpts = local_checkpoints(self.out)
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
            self.push_checkpoint()
            self._push_file(self.out / METRICS, METRICS)
        self._push_file(self.out / "logs" / f"node-{self.rank}.log", f"logs/node-{self.rank}.log")


def push_loop(out: str, url: str, every: float, rank: int, keep: int, once: bool = False) -> int:
    from gpt2cloud.storage import StorageError

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    parent = os.getppid()
    try:
        pusher = Pusher(out, url, rank=rank, keep=keep)
    except StorageError as e:
        log(f"cannot reach the bucket: {e}")
        return 4
    failures = 0
    while True:
        final = once or stop.is_set() or os.getppid() != parent
        try:
            pusher.push_once()
            failures = 0
        except (StorageError, OSError) as e:
            failures += 1
            log(f"push failed ({failures}x): {e}")
            if final:
                if failures < 3:
                    time.sleep(2)
                    continue
                log("final push failed; the bucket keeps what the earlier pushes put there")
                return 4
        if final:
            log("final push done")
            return 0
        stop.wait(every)


# ---- pull ----

def pull(url: str, out: str | Path, rank: int = 0) -> int:
    """Fetch the newest complete, verified checkpoint (and metrics, and this node's log) into OUT."""
    from gpt2cloud.storage import StorageError
    from gpt2cloud.transfer import download_dir

    out = Path(out)
    try:
        store = _store(url)
        complete, _ = remote_checkpoints(store)
    except StorageError as e:
        log(f"cannot reach the bucket {url}: {e}")
        return 4
    (out / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    got = None
    for step, name in reversed(complete):
        try:
            download_dir(store, f"{CHECKPOINTS}/{name}", out / CHECKPOINTS / name, progress=False)
            got = step
            break
        except StorageError as e:  # a damaged or half-deleted set: fall back to the one before
            log(f"checkpoint {name} unusable ({e}); trying an older one")
    for key, dest in ((METRICS, out / METRICS), (f"logs/node-{rank}.log", out / "logs" / f"node-{rank}.log")):
        if (key == METRICS and rank != 0) or dest.exists():
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
    from gpt2cloud.storage import StorageError
    from gpt2cloud.transfer import download_dir

    t0 = time.monotonic()
    try:
        result = download_dir(_store(url), "", dest, progress=False)
    except StorageError as e:
        log(f"cannot fetch the data: {e}")
        return 3
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
    pl = sub.add_parser("pull", help="download the newest complete checkpoint from URL into OUT")
    pl.add_argument("url")
    pl.add_argument("out")
    pl.add_argument("--rank", type=int, default=0)
    pd = sub.add_parser("data", help="download the token shards at URL into DIR (manifest-verified)")
    pd.add_argument("url")
    pd.add_argument("dir")
    a = p.parse_args(argv)
    if a.cmd == "push":
        return push_loop(a.out, a.url, a.every, a.rank, a.keep, once=a.once)
    if a.cmd == "pull":
        return pull(a.url, a.out, rank=a.rank)
    return data(a.url, a.dir)


if __name__ == "__main__":
    sys.exit(main())
