"""`gpt2cloud data prepare`: documents -> GPT-2 tokens -> llm.c `.bin` shards + manifest.json.

The stream: every document is prefixed with <|endoftext|> (50256) and the token stream is cut into
fixed-size shards: the first `val_tokens` tokens form `{name}_val_000000.bin`, then
`{name}_train_000001.bin`, ... of `shard_tokens` each (the last one shorter). Documents straddle
shard boundaries, as in llm.c's fineweb.py.

Speed: the parent only reads records; chunks of ~1 MB of them go to a multiprocessing Pool whose
workers parse them (JSON lines), run tiktoken's `encode_ordinary` and send back uint16 arrays. The
parent keeps only a few chunks in flight, so memory stays bounded by one shard buffer whatever the
input size.

Resume: the shards are a pure function of (source, name, shard_tokens, val_tokens, limit_tokens).
After each finished shard, `.prepare-state.json` records where the stream stands (document index,
token offset inside it). A rerun checks the finished shards' sha256, skips the documents before that
point without tokenizing them, and continues: the result is byte-identical to an uninterrupted run.
Shards are written atomically (model.shards.write_shard) and manifest.json, written last, marks the
directory complete.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt2cloud.data.shards import ShardWriter
from gpt2cloud.errors import UserError
from gpt2cloud.store import StorageError, atomic_write, sha256_file
from gpt2cloud.store.base import TMP_MARK
from gpt2cloud.store.sets import prepare_local_dir
from gpt2cloud.store.layout import MANIFEST, PREPARE_STATE

FORMAT = "gpt2cloud-shards"
VERSION = 1
STATE = PREPARE_STATE  # `data upload` refuses a directory that holds it: the set is not complete
CHUNK_BYTES = 1 << 20  # text per task sent to a worker: big enough to amortize IPC, small enough to stream
DEFAULT_SHARD_TOKENS = 100_000_000  # llm.c
DEFAULT_VAL_TOKENS = 10_000_000
RESULT_TIMEOUT = 600.0  # one ~1 MB chunk takes ~0.5 s; ten minutes means its worker is gone


# ---------------------------------------------------------------- tokenization (runs in the workers)


def _worker_init():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; no worker tracebacks
    # A forked worker inherits the parent's Python handlers. Pool.terminate() ends workers with SIGTERM:
    # a handler that only notes the signal (a caller's, a test's) would leave the worker blocked on the
    # task queue and terminate() joining it forever. The default action ends the worker.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        # After a kill -9 of the parent, die with it (PR_SET_PDEATHSIG) rather than linger and print
        # broken-pipe tracebacks.
        try:
            import ctypes

            ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))
        except (OSError, AttributeError):
            pass


def tokenize_chunk(docs: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, per-document token counts, per-document utf-8 bytes) for a list of documents
    (texts, or raw .jsonl lines: see sources.document_text).

    Each non-empty document becomes [EOT, *tokens]; an empty one contributes nothing.
    """
    from gpt2cloud.data.sources import BadDocument, document_text
    from model.tokenizer import EOT_TOKEN, get_encoding

    # A plain loop, not encode_ordinary_batch: the batch call hands every document to a thread pool,
    # which measured ~40% slower here even with num_threads=1; parallelism comes from the processes.
    # Each document's list of Python ints is packed into uint16 right away and dropped: holding a
    # chunk's lists alive made tokenizing itself ~25% slower (allocator and cache churn).
    encode = get_encoding().encode_ordinary
    parts = []
    lengths = np.zeros(len(docs), dtype=np.int64)
    nbytes = np.zeros(len(docs), dtype=np.int64)
    for i, doc in enumerate(docs):
        try:
            text = document_text(doc)
        except BadDocument as e:
            raise BadDocument(e.args[0], i) from None  # the parent knows which file and line that is
        toks = encode(text)
        if toks:
            packed = np.empty(len(toks) + 1, dtype=np.uint16)
            packed[0] = EOT_TOKEN
            packed[1:] = toks  # numpy converts the list faster than array.array.extend or np.fromiter
            parts.append(packed)
            lengths[i] = len(packed)
        nbytes[i] = len(text.encode("utf-8"))
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)
    return tokens, lengths, nbytes


@dataclass
class _Chunk:
    first: int  # index of its first document in the stream
    docs: list
    wheres: list  # (path, line) of each document, for error messages
    src_bytes: int = 0


def _chunks(documents, skip_docs: int, chunk_bytes: int, on_skip):
    """Group documents into chunks of about chunk_bytes.

    The first skip_docs documents (already in finished shards) are read but not tokenized.
    """
    chunk, size = _Chunk(skip_docs, [], []), 0
    for i, (doc, nbytes, where) in enumerate(documents):
        if i < skip_docs:
            on_skip(nbytes)
            continue
        chunk.docs.append(doc)
        chunk.wheres.append(where)
        chunk.src_bytes += nbytes
        size += len(doc)
        if size >= chunk_bytes:
            yield chunk
            chunk, size = _Chunk(i + 1, [], []), 0
    if chunk.docs:
        yield chunk


def _result(chunk: _Chunk, get):
    """get() the chunk's tokens; a bad record becomes a UserError naming its file and line."""
    from gpt2cloud.data.sources import BadDocument

    try:
        return get()
    except BadDocument as e:
        message, index = e.args
        path, line = chunk.wheres[index]
        raise UserError(f"{path}:{line}: {message}" if line is not None else f"{path}: {message}") from None


# ---------------------------------------------------------------- the command's logic


def default_name(spec: str) -> str:
    base = spec.rstrip("/").split(":")[0].split("/")[-1]
    base = re.sub(r"\.(jsonl|txt|parquet)$", "", base)
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", base).strip("-_").lower() or "data"
    # The trainer tells validation from training shards by "val"/"train" in the file name.
    return "data" if re.search("val|train", name) else name


def prepare(source: str, out_dir, *, name: str | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS,
            val_tokens: int = DEFAULT_VAL_TOKENS, workers: int | None = None, limit_tokens: int | None = None,
            progress: bool = True, chunk_bytes: int = CHUNK_BYTES, on_shard=None) -> dict:
    """Tokenize `source` into shards in out_dir; return a summary (see the module docstring)."""
    from gpt2cloud.data.sources import open_source
    from model.tokenizer import RANKS_SHA256, get_encoding

    t0 = time.monotonic()
    workers, name = _checked_options(source, name, shard_tokens, val_tokens, workers, limit_tokens)
    src = open_source(source)
    params = {"name": name, "shard_tokens": shard_tokens, "val_tokens": val_tokens, "limit_tokens": limit_tokens}
    fingerprint = {"source": src.fingerprint(), "parameters": params, "tokenizer_ranks_sha256": RANKS_SHA256}

    out = _out_dir(Path(out_dir))
    for stale in out.glob(f".*.bin{TMP_MARK}*"):
        stale.unlink()  # a shard whose write was interrupted: never under a final name, rewritten below
    complete = _already_complete(out, fingerprint, t0)
    if complete is not None:
        return complete
    done = _resumable_shards(out, fingerprint)

    get_encoding()  # build the tokenizer once, before forking, so every worker inherits it
    state_path = out / STATE

    def record(shards):
        _write_json(state_path, {"fingerprint": fingerprint, "shards": shards})
        if on_shard:
            on_shard(shards)

    writer = ShardWriter(out, name, val_tokens, shard_tokens, limit_tokens, done, record)
    text_bytes = _tokenize(src, writer, done, workers, progress, chunk_bytes, limit_tokens)
    _check_enough_tokens(source, writer.total, val_tokens)
    writer.finish()

    manifest = _manifest(source, src, params, fingerprint, workers, writer)
    _write_json(out / MANIFEST, manifest)  # last: the directory is complete from here on
    state_path.unlink(missing_ok=True)
    summary = _summary(manifest, out, t0, resumed=len(done))
    summary.update(text_mb_per_s=round(text_bytes / 1e6 / summary["seconds"], 2),
                   tokens_per_s=round((writer.total - sum(s["tokens"] for s in done)) / summary["seconds"]))
    return summary


def _checked_options(source: str, name: str | None, shard_tokens: int, val_tokens: int, workers: int | None,
                     limit_tokens: int | None) -> tuple[int, str]:
    """(workers, name), defaulted and checked, before anything is opened or written."""
    if shard_tokens < 1 or val_tokens < 0 or (limit_tokens is not None and limit_tokens < 1):
        raise UserError("--shard-tokens and --limit-tokens must be >= 1 and --val-tokens >= 0")
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if workers < 1:
        raise UserError("--workers must be >= 1")
    name = name or default_name(source)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or re.search("val|train", name):
        raise UserError(f"--name {name!r}: use letters, digits, '-', '_' and neither 'val' nor 'train' "
                        "(the trainer tells shards apart by those words)")
    return workers, name


def _already_complete(out: Path, fingerprint: dict, t0: float) -> dict | None:
    """The summary when out already holds this very set (a rerun does nothing); None when it holds no
    manifest; a UserError when its manifest is of other inputs (those shards are not ours to replace)."""
    manifest_path = out / MANIFEST
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError:
        manifest = {}
    if manifest.get("fingerprint") == fingerprint:
        (out / STATE).unlink(missing_ok=True)  # killed between the manifest and this: complete all the same
        return _summary(manifest, out, t0, resumed=len(manifest["shards"]), complete_before=True)
    raise UserError(f"{out} already holds shards prepared from another source or with other parameters; "
                    "choose another --out or delete that directory")


def _tokenize(src, writer: ShardWriter, done: list[dict], workers: int, progress: bool, chunk_bytes: int,
              limit_tokens: int | None) -> int:
    """Feed the source's documents after the finished shards to the writer, in order, until it is full or
    the source ends; return the utf-8 bytes of text tokenized in this run."""
    skip_docs, skip_tokens = done[-1]["end"] if done else (0, 0)
    # A dict, not plain locals: the callbacks below update it in place.
    stats = {"src_bytes": 0, "text_bytes": 0, "skip_tokens": skip_tokens}

    with _Progress(progress, src.total_bytes, limit_tokens) as bar:
        def on_skip(nbytes):
            stats["src_bytes"] += nbytes
        chunks = _chunks(src.documents(), skip_docs, chunk_bytes, on_skip)

        def consume(chunk: _Chunk, get):
            tokens, lengths, doc_bytes = _result(chunk, get)
            writer.add(chunk.first, tokens, lengths, doc_bytes, skip=stats["skip_tokens"])
            stats["skip_tokens"] = 0  # only the first chunk of a resumed run starts mid-document
            stats["src_bytes"] += chunk.src_bytes
            stats["text_bytes"] += int(doc_bytes.sum())
            bar.update(writer.docs, writer.total, stats["src_bytes"], stats["text_bytes"])

        if workers == 1:
            for chunk in chunks:
                consume(chunk, lambda: tokenize_chunk(chunk.docs))
                if writer.full:
                    break
        else:
            _run_pool(workers, chunks, consume, lambda: writer.full)
    return stats["text_bytes"]


def _check_enough_tokens(source: str, total: int, val_tokens: int) -> None:
    """Refuse, before any final shard or manifest is written, a source too small to train on."""
    if total == 0:
        raise UserError(f"{source}: no text to tokenize (empty source)")
    if val_tokens and total <= val_tokens:
        raise UserError(
            f"{source}: only {total:,} tokens, all of them taken by --val-tokens {val_tokens:,}: "
            f"nothing left to train on; rerun with a smaller --val-tokens (e.g. {max(total // 10, 1)})"
        )


def _manifest(source: str, src, params: dict, fingerprint: dict, workers: int, writer: ShardWriter) -> dict:
    """manifest.json's content for the finished writer's shards."""
    from model import shards as shard_format
    from model.tokenizer import EOT_TOKEN, RANKS_SHA256, VOCAB_SIZE

    keys = ("name", "split", "index", "tokens", "max_token", "size", "sha256")
    shards = [{k: s[k] for k in keys} for s in writer.shards]
    return {
        "format": FORMAT, "version": VERSION, "name": params["name"],
        "shard_format": {"magic": shard_format.MAGIC, "version": shard_format.VERSION,
                         "header_bytes": shard_format.HEADER_BYTES, "dtype": "uint16"},
        "tokenizer": {"name": "gpt2", "ranks_sha256": RANKS_SHA256, "vocab_size": VOCAB_SIZE,
                      "eot_token": EOT_TOKEN, "document_prefix": "<|endoftext|>"},
        "source": {"spec": source, "kind": src.kind, "files": len(src.files), "bytes": src.total_bytes},
        "parameters": {**params, "workers": workers},
        "fingerprint": fingerprint,
        "documents": writer.docs,
        "text_bytes": writer.text_bytes,
        "tokens": {"total": writer.total, "val": sum(s["tokens"] for s in shards if s["split"] == "val"),
                   "train": sum(s["tokens"] for s in shards if s["split"] == "train"),
                   "max_token": max(s["max_token"] for s in shards)},  # < tokenizer.vocab_size, checked
        "shards": shards,
        "files": [{"name": s["name"], "size": s["size"], "sha256": s["sha256"]} for s in shards],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _out_dir(out: Path) -> Path:
    """--out, created; refused when it is a file or holds files that no prepare wrote (docs/ownership.md)."""
    try:
        prepare_local_dir(out, "--out ", "choose a new or empty directory")
    except StorageError as e:
        raise UserError(str(e)) from None
    if not (out / MANIFEST).is_file() and not (out / STATE).is_file():
        foreign = sorted(p.name for p in out.iterdir() if TMP_MARK not in p.name)
        if foreign:
            raise UserError(f"--out {out} holds {len(foreign)} entries that `data prepare` did not write (e.g. "
                            f"{foreign[0]}); choose a new or empty directory")
    return out


def _run_pool(workers: int, chunks, consume, full) -> None:
    """Tokenize chunks on a process pool, consuming results in order with a few chunks in flight."""
    import multiprocessing as mp

    # fork: workers inherit the built tokenizer (no re-import, no re-parse). They touch no lock a parent
    # thread could hold at fork time (they print nothing; results go back over the pool's own pipes).
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    before = set(mp.active_children())
    pool = ctx.Pool(workers, initializer=_worker_init)
    procs = [p for p in mp.active_children() if p not in before]
    pending = deque()

    def drain(in_flight: int) -> bool:
        """Consume results, oldest first, until at most in_flight chunks are pending; True once full."""
        while len(pending) > in_flight:
            done, res = pending.popleft()
            consume(done, lambda: _get(res))
            if full():
                return True
        return False

    try:
        for chunk in chunks:
            pending.append((chunk, pool.apply_async(tokenize_chunk, (chunk.docs,))))
            # Pool.imap would read the whole source ahead of the workers: bound what is in flight.
            if drain(2 * workers):
                return
        drain(0)
    finally:
        close_pool(pool, procs)


def _get(res, timeout: float = RESULT_TIMEOUT):
    """A chunk's result; a worker that died (OOM-killed, say) would leave it pending for ever."""
    import multiprocessing as mp

    try:
        return res.get(timeout)
    except mp.TimeoutError:
        raise UserError(f"a tokenizer worker returned nothing in {timeout:g} s (killed, out of memory?); "
                        "rerun the same command to resume, with fewer --workers") from None


def close_pool(pool, procs, timeout: float = 10.0) -> None:
    """Pool.terminate(), bounded: it joins its workers without a time limit, so it runs on a helper
    thread; workers still alive after `timeout` seconds are killed (SIGKILL), which lets it return."""
    import threading

    stopper = threading.Thread(target=pool.terminate, name="gpt2cloud-pool-stop", daemon=True)
    stopper.start()
    stopper.join(timeout)
    if stopper.is_alive():
        for p in procs:
            if p.is_alive():
                p.kill()
        stopper.join(timeout)
    for p in procs:
        p.join(timeout)


def _resumable_shards(out: Path, fingerprint: dict) -> list[dict]:
    """Finished shards of an interrupted run with the same inputs, checked by sha256; [] to start over."""
    from model.shards import read_shard

    state_path = out / STATE
    if not state_path.is_file():
        return []
    try:
        state = json.loads(state_path.read_text())
    except ValueError:
        state = {}
    if state.get("fingerprint") != fingerprint:
        # An unfinished run of other inputs: its shards are ours to replace.
        for s in state.get("shards", []):
            (out / s["name"]).unlink(missing_ok=True)
        state_path.unlink()
        return []
    good = []
    for s in state["shards"]:
        p = out / s["name"]
        if not (p.is_file() and p.stat().st_size == s["size"] and sha256_file(p) == s["sha256"]):
            break  # this and later shards are rewritten
        if "max_token" not in s:  # a state file written before shards recorded it
            s["max_token"] = int(read_shard(p).max())
        good.append(s)
    return good


def _write_json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2) + "\n", fsync=False)


def _summary(manifest: dict, out: Path, t0: float, resumed: int, complete_before: bool = False) -> dict:
    seconds = max(time.monotonic() - t0, 1e-9)
    return {
        "out": str(out), "name": manifest["name"], "shards": len(manifest["shards"]),
        "resumed_shards": resumed, "already_complete": complete_before,
        "documents": manifest["documents"], "text_bytes": manifest["text_bytes"],
        "tokens": manifest["tokens"]["total"], "val_tokens": manifest["tokens"]["val"],
        "train_tokens": manifest["tokens"]["train"], "workers": manifest["parameters"]["workers"],
        "seconds": round(seconds, 3), "manifest": str(out / MANIFEST),
    }


class _Progress:
    """A rich bar on stderr (documents, tokens, MB/s, ETA), or nothing when off or not a terminal."""

    def __init__(self, enabled: bool, total_bytes: int, limit_tokens: int | None):
        self.enabled = enabled and sys.stderr.isatty()
        self.total_bytes, self.limit = total_bytes, limit_tokens
        self.t0 = time.monotonic()

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("tokenize"), BarColumn(), TaskProgressColumn(),
                TextColumn("{task.fields[docs]} docs  {task.fields[tokens]} tokens  {task.fields[speed]}"),
                TimeRemainingColumn(), console=Console(stderr=True),
            )
            self.bar.start()
            known = self.total_bytes or self.limit
            self.task = self.bar.add_task("tokenize", total=1000 if known else None,
                                          docs="0", tokens="0", speed="")
        return self

    def update(self, docs: int, tokens: int, src_bytes: int, text_bytes: int) -> None:
        if not self.enabled:
            return
        frac = 0.0
        if self.total_bytes:
            frac = src_bytes / self.total_bytes
        if self.limit:
            frac = max(frac, tokens / self.limit)
        mbs = text_bytes / 1e6 / max(time.monotonic() - self.t0, 1e-9)
        self.bar.update(self.task, completed=min(frac, 1.0) * 1000, docs=f"{docs:,}", tokens=f"{tokens:,}",
                        speed=f"{mbs:.1f} MB/s")

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.stop()
