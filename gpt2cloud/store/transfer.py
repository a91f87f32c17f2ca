"""Move a whole directory (token shards, a checkpoint) to and from a Store as one verified set.

A set is described by its manifest, JSON with a `files` list of {"name", "size", "sha256"} (names
relative to the directory, "/"-separated). `gpt2cloud data prepare` and the trainer's checkpoints
write such manifests; a directory without one gets one built on upload.

Publication is atomic for readers: the manifest is uploaded LAST, after every object it names, and
an outdated remote manifest is deleted before any of its objects is replaced. A reader that finds a
manifest therefore finds the whole set, and download_dir verifies every sha256 anyway. Both helpers
are idempotent: a rerun after a crash (even kill -9) skips what is already in place and verified,
and finishes the rest.

`data upload` and `data download` call them with guard=True: then a prefix or directory holding
another set, or files no manifest names, is refused before anything is written (store/sets.py,
docs/ownership.md), and downloaded shards have their token ids checked before they get their names.

Like the rest of the store package this module imports only the standard library at its top (rich is imported only to
draw a progress bar), so the GPU node can use it.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path

from gpt2cloud.store.base import (NoSuchObject, StorageError, Store, atomic_write, clean_key, join_key,
                                  remove_stale_tmp, sha256_file)
from gpt2cloud.store import sets
from gpt2cloud.store.layout import DOWNLOAD_MARK, MANIFEST, PREPARE_STATE, STATE_FILES, UPLOAD_MARK

FILE_WORKERS = 4  # files moved at once; each large file is also split into parallel parts on S3


# ---------------------------------------------------------------- manifests


def build_manifest(local_dir, manifest_name: str = MANIFEST) -> dict:
    """A manifest for every regular file under local_dir (except the manifest and temporary files)."""
    local_dir = Path(local_dir)
    names = _local_names(local_dir, manifest_name)
    return _files_manifest([file_entry(local_dir, n) for n in names])


def _files_manifest(files: list[dict]) -> dict:
    return {"format": "gpt2cloud-files", "version": 1, "files": files}


def file_entry(local_dir, name: str) -> dict:
    """The manifest entry {"name", "size", "sha256"} of local_dir/name."""
    path = Path(local_dir) / name
    return {"name": name, "size": path.stat().st_size, "sha256": sha256_file(path)}


def parse_manifest(data: bytes, where: str) -> dict:
    """Parse and check a manifest; its `files` entries must be safe relative names with size and sha256."""
    try:
        manifest = json.loads(data)
        files = manifest["files"]
        for f in files:
            clean_key(f["name"])
            if not isinstance(f["size"], int) or not isinstance(f["sha256"], str) or len(f["sha256"]) != 64:
                raise ValueError(f"bad entry {f}")
    except StorageError as e:
        raise StorageError(f"{where}: invalid manifest: {e}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise StorageError(
            f"{where}: not a valid manifest (JSON with a 'files' list of name/size/sha256): {e}"
        ) from None
    return manifest


# ---------------------------------------------------------------- progress


@contextmanager
def _bar(enabled: bool, total: int, description: str):
    """Yield advance(n_bytes): a rich bar with bytes, MB/s and ETA on stderr, or a no-op when off."""
    if not (enabled and sys.stderr.isatty()) or total <= 0:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    with Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), console=Console(stderr=True), transient=False,
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)  # Progress is thread-safe: parts report from many threads


def _run_all(store: Store, jobs, fn) -> list:
    """Run fn(job) for every job on FILE_WORKERS threads; return the results in order, or stop at the
    first error and re-raise it.

    Ctrl-C cancels the transfers in flight (store.abort), so no half object gets a final name.
    """
    with ThreadPoolExecutor(max_workers=FILE_WORKERS) as pool:
        futures = [pool.submit(fn, j) for j in jobs]
        try:
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        except BaseException:
            store.abort()
            for f in futures:
                f.cancel()
            raise
        for f in pending:
            f.cancel()
        for f in futures:
            if f.done() and not f.cancelled() and f.exception() is not None:
                raise f.exception()
        return [f.result() for f in futures]


# ---------------------------------------------------------------- upload


def upload_dir(local_dir, store: Store, prefix: str = "", manifest_name: str = MANIFEST,
               progress: bool = True, guard: bool = False, force: bool = False) -> dict:
    """Upload local_dir to store under prefix; return {"uploaded", "skipped", "bytes", ...}.

    Objects already stored with the same size and sha256 are skipped; the manifest goes last. Every
    file to send is checked against its manifest entry before the first byte is written.

    guard (`data upload`): the directory must be a complete set (no unfinished prepare), and the prefix
    may hold only this set, or, with force, another set gpt2cloud published there, whose files are
    deleted first so the two never mix (sets.py). Without guard (a checkpoint push) a prefix is ours.
    """
    t0 = time.monotonic()
    local_dir = Path(local_dir)
    manifest_bytes, files = _local_set(local_dir, manifest_name, guard)
    manifest_key = join_key(prefix, manifest_name)
    remote = {o.key: o.size for o in store.list(prefix.strip("/") + "/" if prefix.strip("/") else "")}
    remote_manifest = store.get_bytes(manifest_key) if manifest_key in remote else None
    published = _published(remote_manifest, manifest_key)
    in_place = {}
    for f in files:
        key = join_key(prefix, f["name"])
        if remote.get(key) == f["size"]:
            in_place[f["name"]] = store.sha256(key) or (published or {}).get(f["name"])
    # With a manifest, an object that already matches it needs no local work at all (fast reruns).
    todo = [f for f in files if not (f["sha256"] and in_place.get(f["name"]) == f["sha256"])]
    with _bar(progress, sum(f["size"] for f in todo), f"check {len(todo)} local files") as advance:
        _run_all(store, todo, lambda f: _hash_entry(local_dir, f, advance))  # before anything is written
    if manifest_bytes is None:
        manifest_bytes = (json.dumps(_files_manifest(files), indent=2) + "\n").encode()
    todo = [f for f in todo if in_place.get(f["name"]) != f["sha256"]]
    publish = remote_manifest != manifest_bytes
    marker_key = join_key(prefix, UPLOAD_MARK)
    if guard:
        stale, marker = sets.check_prefix(store, prefix, files, remote, published, manifest_name, force)
        if todo or stale or publish:  # said before the first write: a rerun knows these files are ours
            store.put_bytes(marker_key, sets.marker_bytes(files, stale, store.url_for(prefix)))
        if published is not None and published != sets.identity(files):
            store.delete(manifest_key)  # readers stop seeing the old set before any of it changes
            published = None
        for name in sorted(stale):
            store.delete(join_key(prefix, name))
    sent = _send(store, prefix, local_dir, todo, published or {}, manifest_key, progress)
    if publish:
        store.put_bytes(manifest_key, manifest_bytes)  # last: now the set is visible, and complete
    if guard and (marker_key in remote or todo or stale or publish):
        store.delete(marker_key)  # the set is published: nothing under way
    seconds = time.monotonic() - t0
    nbytes = sum(f["size"] for f in sent)
    return {
        "url": store.url_for(prefix), "files": len(files), "uploaded": len(sent),
        "skipped": len(files) - len(sent), "bytes": nbytes, "manifest_uploaded": publish,
        "seconds": round(seconds, 3), "mb_per_s": round(nbytes / 1e6 / seconds, 1) if seconds > 0 else None,
    }


def _local_set(local_dir: Path, manifest_name: str, guard: bool) -> tuple[bytes | None, list[dict]]:
    """(the directory's manifest bytes or None, its file entries: sha256 None where still to compute)."""
    if not local_dir.is_dir():
        raise StorageError(f"{local_dir}: no such directory")
    if guard and (local_dir / PREPARE_STATE).exists():
        raise StorageError(f"{local_dir}: its `data prepare` did not finish ({PREPARE_STATE} is there); finish "
                           "it first (rerun the same `gpt2cloud data prepare` command: it resumes), then upload")
    manifest_path = local_dir / manifest_name
    if manifest_path.is_file():  # a set with its manifest (prepared shards, a checkpoint): upload it as is
        manifest_bytes = manifest_path.read_bytes()
        files = [dict(f) for f in parse_manifest(manifest_bytes, str(manifest_path))["files"]]
    else:  # any other directory: its manifest is built from the hashes computed before the upload
        manifest_bytes = None
        files = [{"name": n, "size": (local_dir / n).stat().st_size, "sha256": None}
                 for n in _local_names(local_dir, manifest_name)]
    if not files:
        raise StorageError(f"{local_dir}: nothing to upload (no files)")
    for f in files:
        path = local_dir / f["name"]
        if not path.is_file() or path.stat().st_size != f["size"]:
            raise StorageError(f"{path}: missing or not the size its manifest says (an incomplete set); re-create "
                               "the directory (rerun `gpt2cloud data prepare`) or download the set again")
    return manifest_bytes, files


def _published(remote_manifest: bytes | None, manifest_key: str) -> dict | None:
    """{name: sha256} of the set a manifest publishes (at a prefix, or in a local directory); None without
    one; {"": ""} for a broken one (replaced by a checkpoint push, refused by a guarded upload or download)."""
    if remote_manifest is None:
        return None
    try:
        return sets.identity(parse_manifest(remote_manifest, manifest_key)["files"])
    except StorageError:
        return {"": ""}


def _hash_entry(local_dir: Path, f: dict, advance) -> None:
    """Set f["sha256"] from the file; a file that no longer matches its manifest entry is refused."""
    path = local_dir / f["name"]
    sha = sha256_file(path, advance)
    if f["sha256"] and sha != f["sha256"]:
        raise StorageError(f"{path}: does not match its manifest entry (sha256): an incomplete or altered set; "
                           "re-create the directory (rerun `gpt2cloud data prepare`) or download the set again")
    f["sha256"] = sha


def _send(store: Store, prefix: str, local_dir: Path, todo: list[dict], published: dict, manifest_key: str,
          progress: bool) -> list[dict]:
    """Upload the todo files (hashed); return them."""
    lock = threading.Lock()

    def unpublish(name: str, sha: str) -> None:
        # Before an object of the published set is replaced, the old manifest goes: a reader never
        # finds a manifest whose objects are changing under it. (The new manifest differs from it,
        # so it is published at the end.)
        with lock:
            if published.get(name, sha) != sha:
                store.delete(manifest_key)
                published.clear()  # gone: once is enough

    def upload(f: dict) -> None:
        unpublish(f["name"], f["sha256"])
        store.put_file(local_dir / f["name"], join_key(prefix, f["name"]), progress=advance, sha256=f["sha256"])

    store.abort_incomplete_uploads([join_key(prefix, f["name"]) for f in todo])  # a killed run's leftovers
    with _bar(progress, sum(f["size"] for f in todo), f"upload {len(todo)} files") as advance:
        _run_all(store, todo, upload)
    return todo


def _local_names(local_dir: Path, manifest_name: str) -> list[str]:
    """Every regular file under local_dir except the manifest, the tool's state files and temporary
    files, sorted: a state file in a published set would make it look unfinished wherever it lands."""
    return sorted(
        rel for rel in (p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file())
        if Path(rel).name not in (manifest_name, *STATE_FILES) and not rel.endswith(".tmp") and not sets.is_scratch(rel)
    )


def check_files(local_dir, files: list[dict], progress: bool = False) -> None:
    """Check local files against manifest entries (name, size, sha256); StorageError names the first bad one."""
    local_dir = Path(local_dir)
    with _bar(progress, sum(f["size"] for f in files), "check local files") as advance:
        for f in files:
            path = local_dir / f["name"]
            if not path.is_file():
                raise StorageError(f"{path}: missing (listed in the manifest); re-create or re-fetch the set")
            size = path.stat().st_size
            if size != f["size"]:
                raise StorageError(f"{path}: {size} bytes, the manifest says {f['size']} (truncated or altered); "
                                   "re-create or re-fetch the set")
            if sha256_file(path, advance) != f["sha256"]:
                raise StorageError(f"{path}: sha256 does not match the manifest (corrupt, or changed after the "
                                   "manifest was written); re-create or re-fetch the set")


# ---------------------------------------------------------------- download


def download_dir(store: Store, prefix: str, local_dir, manifest_name: str = MANIFEST,
                 progress: bool = True, guard: bool = False, vocab_size: int | None = None) -> dict:
    """Download the set under prefix into local_dir, verifying every file's sha256 against the manifest.

    Files already present and verified are kept (a rerun resumes); the local manifest is written
    last, so a directory with a manifest is a complete, verified set. With vocab_size every .bin shard's
    token ids are checked too, before it gets its final name (sets.fetch_checked).

    guard (`data download`): the directory may hold only this set (or a part of it that this command
    brought, named by its marker), never another set, an unfinished prepare or files of no set (sets.py).
    Without guard (a checkpoint fetch) an older set there is replaced.
    """
    t0 = time.monotonic()
    manifest_key = join_key(prefix, manifest_name)
    try:
        manifest_bytes = store.get_bytes(manifest_key)
    except NoSuchObject:
        raise StorageError(
            f"{store.url_for(manifest_key)}: no manifest there; the set was never uploaded or its upload did "
            "not finish: run `gpt2cloud data upload` (again), or check the URL"
        ) from None
    files = parse_manifest(manifest_bytes, store.url_for(manifest_key))["files"]

    local_dir = Path(local_dir)
    if guard:
        sets.prepare_local_dir(local_dir)
    else:
        local_dir.mkdir(parents=True, exist_ok=True)
    local_manifest = local_dir / manifest_name
    with _bar(progress, sum(f["size"] for f in files), "check local files") as advance:
        verified = _verified(local_dir, files, advance, vocab_size)
    if guard:
        held = _published(local_manifest.read_bytes() if local_manifest.is_file() else None, str(local_manifest))
        sets.check_local_dir(local_dir, files, manifest_name, held, verified)
    elif local_manifest.is_file() and local_manifest.read_bytes() != manifest_bytes:
        local_manifest.unlink()  # an older set: the directory is not complete until we finish
    todo = [f for f in files if f["name"] not in verified]
    if guard and (todo or not local_manifest.is_file()):
        _write_local(lambda: sets.write_local_marker(local_dir, files, store.url_for(prefix)), local_dir)
    for f in todo:
        remove_stale_tmp(local_dir / f["name"])

    total = sum(f["size"] for f in todo)
    with _bar(progress, total, f"download {len(todo)} files") as advance:
        # get_file verifies the sha256 (fetch_checked the token ids) before the file gets its final name.
        _run_all(store, todo, lambda f: sets.fetch_checked(store, join_key(prefix, f["name"]), local_dir / f["name"],
                                                           f["sha256"], advance, vocab_size))
    _write_local(lambda: atomic_write(local_manifest, manifest_bytes), local_dir)
    (local_dir / DOWNLOAD_MARK).unlink(missing_ok=True)  # complete: nothing under way
    seconds = time.monotonic() - t0
    return {
        "url": store.url_for(prefix), "dir": str(local_dir), "files": len(files), "downloaded": len(todo),
        "skipped": len(files) - len(todo), "bytes": total, "verified": len(files), "seconds": round(seconds, 3),
        "mb_per_s": round(total / 1e6 / seconds, 1) if seconds > 0 else None,
    }


def _verified(local_dir: Path, files: list[dict], advance, vocab_size: int | None) -> set[str]:
    """Names of the set's files already in local_dir with the right size and sha256 (an interrupted
    download's, kept), their token ids checked when vocab_size is given."""
    verified = set()
    for f in files:
        path = local_dir / f["name"]
        if path.is_file() and path.stat().st_size == f["size"] and sha256_file(path, advance) == f["sha256"]:
            if vocab_size is not None and f["name"].endswith(".bin"):
                sets.check_shard_tokens(path, vocab_size)
            verified.add(f["name"])
    return verified


def _write_local(write, local_dir: Path) -> None:
    try:
        write()
    except OSError as e:
        raise StorageError(f"{local_dir}: cannot write: {e.strerror}; check the directory's permissions and "
                           "free space") from None


def verify_dir(local_dir, manifest_name: str = MANIFEST) -> dict:
    """Check every file of a local set against its manifest; raise StorageError naming the first bad one."""
    local_dir = Path(local_dir)
    path = local_dir / manifest_name
    if not path.is_file():
        raise StorageError(f"{path}: no manifest; the directory is not a complete set")
    files = parse_manifest(path.read_bytes(), str(path))["files"]
    check_files(local_dir, files)
    return {"dir": str(local_dir), "files": len(files), "bytes": sum(f["size"] for f in files)}

