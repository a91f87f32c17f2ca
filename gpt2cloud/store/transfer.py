"""Move a whole directory (token shards, a checkpoint) to and from a Store as one verified set.

A set is described by its manifest, JSON with a `files` list of {"name", "size", "sha256"} (names
relative to the directory, "/"-separated). `gpt2cloud data prepare` and the trainer's checkpoints
write such manifests; a directory without one gets one built on upload.

Publication is atomic for readers: the manifest is uploaded LAST, after every object it names, and
an outdated remote manifest is deleted before any of its objects is replaced. A reader that finds a
manifest therefore finds the whole set, and download_dir verifies every sha256 anyway. Both helpers
are idempotent: a rerun after a crash (even kill -9) skips what is already in place and verified,
and finishes the rest.

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

from gpt2cloud.store.base import (TMP_MARK, NoSuchObject, StorageError, Store, atomic_write, clean_key, join_key,
                                  remove_stale_tmp, sha256_file)
from gpt2cloud.store.layout import MANIFEST

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
               progress: bool = True) -> dict:
    """Upload local_dir to store under prefix; return {"uploaded", "skipped", "bytes", ...}.

    Objects already stored with the same size and sha256 are skipped; the manifest goes last.
    """
    t0 = time.monotonic()
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise StorageError(f"{local_dir}: no such directory")
    manifest_path = local_dir / manifest_name
    if manifest_path.is_file():  # a set with its manifest (prepared shards, a checkpoint): upload it as is
        manifest_bytes = manifest_path.read_bytes()
        files = [dict(f) for f in parse_manifest(manifest_bytes, str(manifest_path))["files"]]
    else:  # any other directory: its manifest is built from the hashes computed below
        manifest_bytes = None
        files = [{"name": n, "size": (local_dir / n).stat().st_size, "sha256": None}
                 for n in _local_names(local_dir, manifest_name)]
    if not files:
        raise StorageError(f"{local_dir}: nothing to upload (no files)")
    for f in files:
        path = local_dir / f["name"]
        if not path.is_file() or path.stat().st_size != f["size"]:
            raise StorageError(f"{path}: missing or not the size its manifest says; re-create the directory")

    # What is there already: one listing, then the sha256 of each same-size object (metadata we
    # stored; objects from other tools are trusted only if the remote manifest names them).
    manifest_key = join_key(prefix, manifest_name)
    remote = {o.key: o.size for o in store.list(prefix.strip("/") + "/" if prefix.strip("/") else "")}
    remote_manifest = store.get_bytes(manifest_key) if manifest_key in remote else None
    published = {}
    if remote_manifest is not None:
        try:
            published = {f["name"]: f["sha256"] for f in parse_manifest(remote_manifest, manifest_key)["files"]}
        except StorageError:
            pass  # a broken remote manifest is simply replaced
    in_place = {}
    for f in files:
        key = join_key(prefix, f["name"])
        if remote.get(key) == f["size"]:
            in_place[f["name"]] = store.sha256(key) or published.get(f["name"])
    # With a manifest, an object that already matches it needs no local work at all (fast reruns).
    todo = [f for f in files if not (f["sha256"] and in_place.get(f["name"]) == f["sha256"])]
    store.abort_incomplete_uploads([join_key(prefix, f["name"]) for f in todo])  # a killed run's leftovers

    lock = threading.Lock()

    def unpublish(name: str, sha: str) -> None:
        # Before an object of the published set is replaced, the old manifest goes: a reader never
        # finds a manifest whose objects are changing under it. (The new manifest differs from it,
        # so it is published at the end.)
        with lock:
            if published.get(name, sha) != sha:
                store.delete(manifest_key)
                published.clear()  # gone: once is enough

    def upload(f: dict) -> bool:
        path = local_dir / f["name"]
        sha = sha256_file(path)  # hashed here, on the file threads, so hashing overlaps other uploads
        if f["sha256"] and sha != f["sha256"]:
            raise StorageError(f"{path}: does not match its manifest entry (sha256); the file changed after "
                               "the manifest was written: re-create the directory")
        f["sha256"] = sha
        if in_place.get(f["name"]) == sha:
            advance(f["size"])
            return False
        unpublish(f["name"], sha)
        store.put_file(path, join_key(prefix, f["name"]), progress=advance, sha256=sha)
        return True

    with _bar(progress, sum(f["size"] for f in todo), f"upload {len(todo)} files") as advance:
        sent = [f for f, up in zip(todo, _run_all(store, todo, upload)) if up]
    if manifest_bytes is None:
        manifest_bytes = (json.dumps(_files_manifest(files), indent=2) + "\n").encode()
    publish = remote_manifest != manifest_bytes
    if publish:
        store.put_bytes(manifest_key, manifest_bytes)  # last: now the set is visible, and complete
    seconds = time.monotonic() - t0
    nbytes = sum(f["size"] for f in sent)
    return {
        "url": store.url_for(prefix), "files": len(files), "uploaded": len(sent),
        "skipped": len(files) - len(sent), "bytes": nbytes, "manifest_uploaded": publish,
        "seconds": round(seconds, 3), "mb_per_s": round(nbytes / 1e6 / seconds, 1) if seconds > 0 else None,
    }


def _local_names(local_dir: Path, manifest_name: str) -> list[str]:
    """Every regular file under local_dir except the manifest and temporary files, sorted."""
    return sorted(
        p.relative_to(local_dir).as_posix()
        for p in local_dir.rglob("*")
        if p.is_file() and p.name != manifest_name and TMP_MARK not in p.name and not p.name.endswith(".tmp")
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
                 progress: bool = True) -> dict:
    """Download the set under prefix into local_dir, verifying every file's sha256 against the manifest.

    Files already present and verified are kept (a rerun resumes); the local manifest is written
    last, so a directory with a manifest is a complete, verified set.
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
    local_dir.mkdir(parents=True, exist_ok=True)
    local_manifest = local_dir / manifest_name
    if local_manifest.is_file() and local_manifest.read_bytes() != manifest_bytes:
        local_manifest.unlink()  # an older set: the directory is not complete until we finish

    # Files left by an earlier, interrupted download count only once their sha256 checks out.
    present = [f for f in files if (local_dir / f["name"]).is_file()
               and (local_dir / f["name"]).stat().st_size == f["size"]]
    verified = set()
    with _bar(progress, sum(f["size"] for f in present), "check local files") as advance:
        for f in present:
            if sha256_file(local_dir / f["name"], advance) == f["sha256"]:
                verified.add(f["name"])
    todo = [f for f in files if f["name"] not in verified]
    skipped = len(verified)
    for f in todo:
        remove_stale_tmp(local_dir / f["name"])

    total = sum(f["size"] for f in todo)
    with _bar(progress, total, f"download {len(todo)} files") as advance:
        # get_file verifies the sha256 before the file gets its final name.
        _run_all(store, todo, lambda f: store.get_file(
            join_key(prefix, f["name"]), local_dir / f["name"], progress=advance, sha256=f["sha256"]))
    atomic_write(local_manifest, manifest_bytes)
    seconds = time.monotonic() - t0
    return {
        "url": store.url_for(prefix), "dir": str(local_dir), "files": len(files), "downloaded": len(todo),
        "skipped": skipped, "bytes": total, "verified": len(files), "seconds": round(seconds, 3),
        "mb_per_s": round(total / 1e6 / seconds, 1) if seconds > 0 else None,
    }


def verify_dir(local_dir, manifest_name: str = MANIFEST) -> dict:
    """Check every file of a local set against its manifest; raise StorageError naming the first bad one."""
    local_dir = Path(local_dir)
    path = local_dir / manifest_name
    if not path.is_file():
        raise StorageError(f"{path}: no manifest; the directory is not a complete set")
    files = parse_manifest(path.read_bytes(), str(path))["files"]
    check_files(local_dir, files)
    return {"dir": str(local_dir), "files": len(files), "bytes": sum(f["size"] for f in files)}

