"""A data directory that a download is still filling: what the downloader (model/streamdata.py) and
the token loader (model/data.py) agree on.

- DIR/manifest.json is written FIRST (the set's manifest as stored): every shard of the set, with its
  size and sha256. A shard appears under its final name only once its sha256 checked out.
- Only the files the run will read come (files_to_read): every file but the training shards, and the
  training shards its steps reach; the rest are "left_out". The manifest stays the whole set's, so the
  data's identity (what a checkpoint records) does not depend on the run's steps.
- DIR/download.json, the download's status, rewritten atomically as it goes:
  {"state": "running" | "complete" | "partial" | "failed", "error", "exit_code", "pid", "start", "time",
   "files", "ready", "arrived": {name: time, in the order they arrived}, "bytes": bytes moved so far,
   "total_bytes", "left_out": [names]}. "files" and "total_bytes" count what will come; "partial" is
  complete but for the files left out; "exit_code" (when failed) is the job's (a full disk: EXIT_DISK_FULL).
  "ready" lists the files training needs before its first step; ready_now() says whether they are in.
- Which shards are validation: names containing "val"; if no name does, the first shard (llm.c's
  shard 0). The rest, in name order, are training shards. The download goes in the order the trainer
  reads: validation shards, then any other (small) file, then training shards in name order.

Imports only the standard library (the node's sync runs without numpy or torch).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from gpt2cloud.store import atomic_write
from gpt2cloud.store.layout import DATA_STATUS as STATUS  # download.json: which shards arrived, and how it ended
from gpt2cloud.store.layout import MANIFEST
from gpt2cloud.store.sets import SHARD_HEADER_BYTES

SHARD_SUFFIX = ".bin"
RUNNING, COMPLETE, PARTIAL, FAILED = "running", "complete", "partial", "failed"


def split_names(names: list[str]) -> tuple[list[str], list[str]]:
    """(training, validation) shard names, each sorted; `names` are the .bin files of one directory."""
    shards = sorted(names)
    val = [n for n in shards if "val" in n]
    if not val and len(shards) > 1:
        val = shards[:1]  # llm.c convention: shard 0 is validation
    return [n for n in shards if n not in val], val


def is_shard(name: str) -> bool:
    """A token shard of the directory itself (the loader reads no subdirectories)."""
    return name.endswith(SHARD_SUFFIX) and "/" not in name


def download_order(files: list[dict]) -> tuple[list[dict], list[dict]]:
    """(the files training needs first, the rest), each in download order: validation shards and any
    other small file (e.g. HellaSwag) with the first training shard; then the training shards by name."""
    by_name = {f["name"]: f for f in files}
    train, val = split_names([n for n in by_name if is_shard(n)])
    others = sorted(n for n in by_name if not is_shard(n))
    first = val + others + train[:1]
    return [by_name[n] for n in first], [by_name[n] for n in train[1:]]


def shard_steps(size: int, tokens_per_step: int) -> int:
    """The steps the trainer takes from one training shard of `size` bytes (model/data.py TokenLoader):
    a step never straddles two shards and needs one token past its own (the shifted targets), so
    (tokens - 1) // tokens_per_step; a shard shorter than one step gives none (the loader skips it)."""
    tokens = max(0, (size - SHARD_HEADER_BYTES) // 2)
    return max(0, (tokens - 1) // tokens_per_step)


def files_to_read(files: list[dict], steps: int, tokens_per_step: int) -> list[dict]:
    """The files of a set that a run of `steps` steps of `tokens_per_step` tokens reads, in the set's
    order: every file but the training shards (validation shards, HellaSwag), and the training shards in
    name order until they hold `steps` steps. All of them when they hold fewer (the loader wraps around
    to the first), or when the steps are not known (0). A resume reads no further: the data position is
    where the steps before it left off."""
    if steps <= 0 or tokens_per_step <= 0:
        return list(files)
    sizes = {f["name"]: f["size"] for f in files}
    train, _ = split_names([n for n in sizes if is_shard(n)])
    needed, keep = steps, set()
    for name in train:
        if needed <= 0:
            break
        keep.add(name)
        needed -= shard_steps(sizes[name], tokens_per_step)
    left_out = set(train) - keep
    return [f for f in files if f["name"] not in left_out]


def manifest_files(data_dir) -> list[dict] | None:
    """The `files` of DIR/manifest.json, or None when there is none (a plain directory of shards)."""
    path = Path(data_dir) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a valid manifest ({e}); re-download the data") from None


def read_status(data_dir) -> dict | None:
    """DIR/download.json, or None when no download ever wrote one (or it cannot be read)."""
    try:
        return json.loads((Path(data_dir) / STATUS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_status(data_dir, status: dict) -> None:
    # no fsync: it is rewritten often, and a crash of the node loses the download anyway
    atomic_write(Path(data_dir) / STATUS, json.dumps(status) + "\n", fsync=False)


def ready_now(status: dict | None) -> bool:
    if not status:
        return False
    ready = status.get("ready")  # None until the manifest is read
    return status.get("state") in (COMPLETE, PARTIAL) or (
        ready is not None and set(ready) <= set(status.get("arrived") or {}))


def process_alive(pid) -> bool:
    """Whether the downloader process still runs (a zombie, killed but not yet reaped, does not)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # no /proc (macOS): ask the kernel
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True


def failure(status: dict | None) -> str | None:
    """Why the download will deliver nothing more, or None while it still may (or has finished)."""
    if status is None:
        return "no download is filling the directory"
    if status.get("state") == FAILED:
        return f"the data download failed: {status.get('error') or 'unknown error'}"
    if status.get("state") == RUNNING and not process_alive(status.get("pid")):
        return f"the data download (pid {status.get('pid')}) ended before it finished"
    return None
