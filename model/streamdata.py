"""The token shards into a node's data directory while training starts: `python -m model.sync data|wait`.

`data` streams: it writes the set's manifest into DIR first, then downloads the validation shards and
the first training shard (what the first step and the first val loss need), then the other training
shards in name order, 4 at a time, each sha256-verified before it gets its final name; with `--config`
only the training shards the run's steps read (model/datadir.py files_to_read). DIR/download.json says
how far it got and ends "complete", "partial" (the shards left out) or "failed" (model/datadir.py).
The node's run script starts it in the background, waits (`wait --pid`) until it is ready and starts
the trainer, whose loader waits for any shard still on its way (model/data.py). `--timeline` appends
a data_complete event when all is in. Exit code EXIT_DATA when the download fails, EXIT_DISK_FULL
(model/deadman.py) when the node's disk is full; `wait` gives up after --timeout (EXIT_DATA_HUNG).
Every node of a multi-node run streams its own copy: behind training it costs bandwidth, not time
(docs/cloud.md, "The data streams in", has the measured rates and the reasons).

The command line is model/sync.py's (its `data` and `wait` call data and wait_ready here). Imports only
the standard library, gpt2cloud's store package and model's own modules; never model.sync.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

from gpt2cloud.store import NoSuchObject, StorageError, atomic_write, open_store, sha256_file
from gpt2cloud.store.base import remove_stale_tmp
from gpt2cloud.store.layout import MANIFEST
from gpt2cloud.store.sets import GPT2_VOCAB_SIZE, fetch_checked
from gpt2cloud.store.transfer import FILE_WORKERS, parse_manifest
from model import datadir, deadman
from model.config import TrainConfig

EXIT_DATA = 3  # could not download the shards from --data (the node's run script passes it on)


def log(msg: str) -> None:
    print(f"gpt2cloud sync: {msg}", file=sys.stderr, flush=True)


class RateLimit:
    """Paces the bytes moved to at most `mb_per_s`, all threads together (None or 0: no limit): the
    progress callback sleeps. In slices, so a large file does not hold back the small ones beside it.
    For tests (a shard that lands late, on purpose) and for links shared with other work."""

    SLICE = 16 * 1024

    def __init__(self, mb_per_s: float | None):
        self.bytes_per_s = (mb_per_s or 0) * 1e6
        self.lock = threading.Lock()
        self.free_at = time.monotonic()

    def take(self, n: int) -> None:
        while self.bytes_per_s > 0 and n > 0:
            piece = min(n, self.SLICE)
            with self.lock:
                self.free_at = max(self.free_at, time.monotonic()) + piece / self.bytes_per_s
                until = self.free_at
            time.sleep(max(0.0, until - time.monotonic()))
            n -= piece


class Download:
    """The shards at URL into DIR in the order the trainer reads them, with DIR/download.json saying
    how far it got (model/datadir.py): the files training needs first, then the rest, `workers` at a
    time. A file already in DIR is kept if its sha256 checks out (a rerun resumes)."""

    def __init__(self, url: str, dest: str | Path, max_mb_per_s: float | None = None, workers: int = FILE_WORKERS,
                 steps: int = 0, tokens_per_step: int = 0):
        self.url, self.dest, self.workers = url, Path(dest), workers
        self.steps, self.tokens_per_step = steps, tokens_per_step  # what the run reads (0: everything)
        self.limit = RateLimit(max_mb_per_s)
        self.lock = threading.Lock()
        self.status = {"state": datadir.RUNNING, "error": None, "pid": os.getpid(), "start": time.time(),
                       "time": time.time(), "files": None, "ready": None, "arrived": {}, "bytes": 0,
                       "total_bytes": None, "left_out": []}
        self.fetched = 0  # bytes of the files actually downloaded (not already there)

    def save(self, **changes) -> None:
        with self.lock:
            self.status.update(changes, time=time.time())
            datadir.write_status(self.dest, self.status)

    def moved(self, n: int) -> None:
        self.limit.take(n)
        with self.lock:
            self.status["bytes"] += n

    def fetch(self, store, f: dict) -> None:
        path = self.dest / f["name"]
        kept = path.is_file() and path.stat().st_size == f["size"] and sha256_file(path) == f["sha256"]
        if not kept:  # (an earlier download's file that checks out is kept)
            remove_stale_tmp(path)
            # the sha256 and a shard's token ids are checked before the file gets its final name: arrival
            # means verified (a shard from the Hub, or anyone's, may hold ids the model has no row for)
            fetch_checked(store, f["name"], path, f["sha256"], progress=self.moved, vocab_size=GPT2_VOCAB_SIZE)
            with self.lock:
                self.fetched += f["size"]
        with self.lock:
            self.status["arrived"][f["name"]] = time.time()
        self.save()

    def fetch_in_order(self, store, files: list[dict]) -> None:
        """`workers` files at a time, started in list order; the first error stops the rest."""
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            futures = [pool.submit(self.fetch, store, f) for f in files]
            parent = os.getppid()
            while True:
                done, pending = wait(futures, timeout=2.0, return_when=FIRST_EXCEPTION)
                failed = next((f for f in done if f.exception() is not None), None)
                if failed is not None:
                    # said at once (a waiting trainer stops waiting), then the transfers in flight are cut
                    self.save(state=datadir.FAILED, error=str(failed.exception()),
                              exit_code=failure_code(failed.exception()))
                    for f in pending:
                        f.cancel()
                    store.abort()
                    raise failed.exception()
                if not pending:
                    return
                if os.getppid() != parent:  # the run script is gone: nobody needs the rest
                    log("data: the run script ended; stopping the download")
                    os._exit(1)
                self.save()  # bytes so far: the trainer's wait sees the download progress

    def run(self) -> dict:
        self.dest.mkdir(parents=True, exist_ok=True)
        self.save()
        store = open_store(self.url)
        try:
            manifest_bytes = store.get_bytes(MANIFEST)
        except NoSuchObject:
            raise StorageError(f"{store.url_for(MANIFEST)}: no manifest there; the set was never uploaded or its "
                               "upload did not finish: run `gpt2cloud data upload` (again), or check the URL") from None
        files = parse_manifest(manifest_bytes, store.url_for(MANIFEST))["files"]
        # only what the run's steps read: the 1558M recipes' 100B-token set is ~200 GB, their run reads a third
        wanted = datadir.files_to_read(files, self.steps, self.tokens_per_step)
        left_out = [f["name"] for f in files if f not in wanted]
        first, rest = datadir.download_order(wanted)
        atomic_write(self.dest / MANIFEST, manifest_bytes)  # first: the trainer knows every shard of the set
        self.save(files=len(wanted), ready=[f["name"] for f in first], total_bytes=sum(f["size"] for f in wanted),
                  left_out=left_out)
        t0 = time.monotonic()
        self.fetch_in_order(store, first)
        log(f"data: ready: {len(first)} files ({sum(f['size'] for f in first) / 1e6:.1f} MB) in "
            f"{time.monotonic() - t0:.1f} s; {len(rest)} more on the way")
        self.fetch_in_order(store, rest)
        self.save(state=datadir.PARTIAL if left_out else datadir.COMPLETE)
        if left_out:
            log(f"data: {len(left_out)} training shards left out: this run's steps do not reach them")
        return {"files": len(wanted), "bytes": self.fetched, "seconds": time.monotonic() - t0,
                "left_out": len(left_out)}


def failure_code(e: BaseException) -> int:
    """The job's exit code for a failed download: a full disk is not the data's fault (EXIT_DISK_FULL)."""
    return deadman.EXIT_DISK_FULL if deadman.is_disk_full(e) else EXIT_DATA


def data(url: str, dest: str | Path, max_mb_per_s: float | None = None, timeline: str | None = None,
         workers: int = FILE_WORKERS, steps: int = 0, tokens_per_step: int = 0) -> int:
    """Download the shards at URL into DEST that a run of `steps` steps reads (see Download; 0: all);
    note `data_complete` in TIMELINE at the end."""
    download = Download(url, dest, max_mb_per_s, workers, steps, tokens_per_step)
    try:
        result = download.run()
    except (StorageError, OSError) as e:
        code = failure_code(e)
        log(f"the node's disk is full: {e} (the task's disk_size is too small)" if code == deadman.EXIT_DISK_FULL
            else f"cannot fetch the data: {e}")
        with contextlib.suppress(OSError):  # (DIR itself may be what fails)
            download.save(state=datadir.FAILED, error=str(e), exit_code=code)
        return code
    log(f"data: {result['files']} files, {result['bytes'] / 1e6:.1f} MB downloaded in {result['seconds']:.1f} s "
        f"({result['bytes'] / 1e6 / max(result['seconds'], 1e-9):.1f} MB/s), all sha256-verified")
    if timeline:
        event = {"event": "data_complete", "time": time.time(), "start": download.status["start"],
                 "bytes": result["bytes"], "files": result["files"], "left_out": result["left_out"]}
        with open(timeline, "a", encoding="utf-8") as f:  # one short append: whole, beside the script's own notes
            f.write(json.dumps(event) + "\n")
    return 0


def wait_ready(dest: str | Path, pid: int | None = None, timeout: float = deadman.DATA_BOUND, poll: float = 0.2) -> int:
    """Block until DEST holds what training needs first; print the bytes moved so far (for the timeline).
    EXIT_DATA once the download failed or its process (`pid`, else the status file's) is gone (the
    status's own exit code when it has one: a full disk); EXIT_DATA_HUNG after `timeout` seconds (0:
    never, for a caller that bounds the wait itself)."""
    deadline = time.monotonic() + timeout if timeout > 0 else None
    while True:
        status = datadir.read_status(dest)
        if status is not None and pid is not None and status.get("pid") != pid:
            status = None  # an earlier download's file: not this one's yet
        why = datadir.failure(status) if status is not None else (
            None if pid is None or datadir.process_alive(pid) else f"the data download (pid {pid}) ended at once")
        if why:  # even when what training needs first is in: the rest will not come
            log(f"data not ready: {why}")
            return (status or {}).get("exit_code") or EXIT_DATA
        if status is not None and datadir.ready_now(status):
            print(status.get("bytes", 0), flush=True)
            return 0
        if deadline is not None and time.monotonic() > deadline:
            log(f"data not ready after {timeout:g} s: the first shards did not arrive in time (the data source "
                "is stalled or far too slow); the job ends here rather than bill while it waits")
            return deadman.EXIT_DATA_HUNG
        time.sleep(poll)


def run_length(config: str | None) -> tuple[int, int]:
    """(steps, tokens per step) of the trainer's config, or (0, 0) (everything) without a readable one:
    the trainer then says what is wrong with it."""
    if not config:
        return 0, 0
    try:
        cfg = TrainConfig.load(config)
    except (OSError, ValueError, TypeError) as e:
        log(f"data: cannot read {config} ({e}); downloading every shard")
        return 0, 0
    return cfg.steps, cfg.tokens_per_step
