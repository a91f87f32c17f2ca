"""Whose files are these? The identity of a shard set, and the checks that keep gpt2cloud from replacing
or mixing what it did not write (docs/ownership.md), for a bucket prefix (`data upload`) and a local
directory (`data download`); and the token-id check every downloaded shard passes.

A set's identity is its files' names and sha256 (its manifest). What the tool wrote shows itself:

- a published set: its `manifest.json`;
- an upload or a download still under way (or cut off): a marker written BEFORE the first file,
  removed after the manifest (UPLOAD_MARK in the prefix, DOWNLOAD_MARK in the directory), naming the
  set it brings and, for a `--force` upload, the old set's files it replaces. A rerun of the same
  command finds its own marker and resumes; any other set's marker is refused like a published set.

Anything else in the place (files that no manifest or marker names) is not ours: refused, always.

Imports only the standard library at module top (numpy, for the token check, when a shard is checked).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from gpt2cloud.store.base import TMP_MARK, NoSuchObject, StorageError, Store, atomic_write, join_key
from gpt2cloud.store.layout import DATA_STATUS, DOWNLOAD_MARK, PREPARE_STATE, UPLOAD_MARK

GPT2_VOCAB_SIZE = 50257  # = model.tokenizer.VOCAB_SIZE (the store cannot import model; a test ties them)
SHARD_MAGIC, SHARD_HEADER_BYTES = 20240520, 1024  # llm.c's .bin shard (model/shards.py)
CHECK_MARK = TMP_MARK + "check"  # a downloaded shard waiting for its token check: .NAME{CHECK_MARK}
PARTIAL_DIR = ".hf-partial"  # the Hub store's resumable staging folder (store/hub.py PARTIAL)


def identity(files: list[dict]) -> dict[str, str]:
    """{name: sha256}: what makes two sets the same set."""
    return {f["name"]: f["sha256"] for f in files}


def _example(names) -> str:
    names = sorted(names)
    return f"{len(names)} file{'s' if len(names) != 1 else ''}, e.g. {names[0]}" if names else "no files"


# ---------------------------------------------------------------- token ids


def check_shard_tokens(path, vocab_size: int, shown: str | None = None) -> int | None:
    """The largest token id of an llm.c shard, or None for a file that is not one (the loader's header
    checks judge those). StorageError when an id is outside the vocabulary: such a shard either
    crashes the trainer's embedding lookup or trains on ids no tokenizer produces."""
    import numpy as np

    path = Path(path)
    size = path.stat().st_size
    if size < SHARD_HEADER_BYTES:
        return None
    header = np.fromfile(path, dtype="<i4", count=3)
    n = int(header[2])
    if int(header[0]) != SHARD_MAGIC or size != SHARD_HEADER_BYTES + 2 * n or n == 0:
        return None
    top = int(np.memmap(path, dtype="<u2", mode="r", offset=SHARD_HEADER_BYTES, shape=(n,)).max())
    if top >= vocab_size:
        raise StorageError(f"{shown or path}: token id {top} in a shard, but GPT-2's vocabulary has {vocab_size} "
                           "ids (0 to {}): not GPT-2 tokens; re-prepare the set with `gpt2cloud data prepare`"
                           .format(vocab_size - 1))
    return top


def stage_name(dest: Path) -> Path:
    """Where a shard lands before its token check; the final name comes only after it."""
    return dest.with_name(f".{dest.name}{CHECK_MARK}")


def final_name(path: Path) -> Path:
    """The final name of a staged shard (itself for any other path): the Hub store keeps its resumable
    partial folder under the final name, so a cut download resumes whichever way it is fetched."""
    name = path.name
    if name.startswith(".") and name.endswith(CHECK_MARK):
        return path.with_name(name[1:-len(CHECK_MARK)])
    return path


def fetch_checked(store: Store, key: str, dest: Path, sha256: str | None, progress=None,
                  vocab_size: int | None = None) -> None:
    """store.get_file (sha256 verified), and for a .bin shard with vocab_size also its token ids, all
    before the file gets its final name: a bad shard is deleted, never seen by a reader or the trainer."""
    if vocab_size is None or not dest.name.endswith(".bin"):
        store.get_file(key, dest, progress=progress, sha256=sha256)
        return
    stage = stage_name(dest)
    store.get_file(key, stage, progress=progress, sha256=sha256)
    try:
        check_shard_tokens(stage, vocab_size, shown=store.url_for(key))
    except BaseException:
        stage.unlink(missing_ok=True)
        raise
    os.replace(stage, dest)


# ---------------------------------------------------------------- a bucket prefix (upload)


def read_marker(data: bytes | None) -> dict[str, str] | None:
    """{name: sha256} claimed by an upload or download marker ("files" and, for a replacing upload,
    "replacing" names: sha256 ""), or None without a readable one."""
    if data is None:
        return None
    try:
        m = json.loads(data)
        claimed = {f["name"]: f["sha256"] for f in m["files"]}
        claimed.update({n: "" for n in m.get("replacing", []) if n not in claimed})
        return claimed
    except (ValueError, KeyError, TypeError):
        return None


def marker_bytes(files: list[dict], replacing=(), url: str = "") -> bytes:
    doc = {"format": "gpt2cloud-transfer", "url": url, "files": [{"name": f["name"], "sha256": f["sha256"]}
                                                                  for f in files], "replacing": sorted(replacing)}
    return (json.dumps(doc, indent=1) + "\n").encode()


def check_prefix(store: Store, prefix: str, files: list[dict], remote: dict[str, int], published: dict | None,
                 manifest_name: str, force: bool) -> tuple[set[str], bytes | None]:
    """Refuse an upload that would replace or mix what gpt2cloud did not publish here (or, without
    --force, another set it did publish); return (names of our old files to delete, the current marker).

    `remote`: {key: size} under the prefix; `published`: the remote manifest's {name: sha256}, None
    when there is none, {"": ""} when there is one that is not a manifest."""
    url = store.url_for(prefix)
    marker_key = join_key(prefix, UPLOAD_MARK)
    marker_raw = _get_or_none(store, marker_key) if marker_key in remote else None
    marker = read_marker(marker_raw)
    if marker_raw is not None and marker is None:
        raise StorageError(f"{store.url_for(marker_key)}: not a gpt2cloud upload marker; the prefix is not ours: "
                           "upload to another prefix, or remove it yourself")
    if published == {"": ""}:
        raise StorageError(f"{url}: holds a {manifest_name} that is not a gpt2cloud manifest (another tool's?); "
                           "upload to another prefix, or remove it yourself")
    new = identity(files)
    ours = set(published or {}) | set(marker or {})
    foreign = _foreign(store, prefix, remote, ours | {manifest_name, UPLOAD_MARK}, new)
    if foreign:
        raise StorageError(f"{url}: holds {_example(foreign)}, that no manifest names (not written by gpt2cloud); "
                           "upload to another prefix, or remove them yourself (--force replaces only a set "
                           "gpt2cloud published)")
    marker_set = {n: s for n, s in (marker or {}).items() if s}
    other = [what for what, ids in (("a published set", published), ("an unfinished upload of a set", marker_set))
             if ids and ids != new]
    if other and not force:
        old = published if published and published != new else marker_set
        raise StorageError(f"{url}: already holds {other[0]} ({_example(old)}) other than the one in this "
                           "directory; upload to another prefix, or add --force to replace it (its files are "
                           "deleted first, so the two sets never mix)")
    return ours - set(new), marker_raw


def _foreign(store: Store, prefix: str, remote: dict[str, int], ours: set[str], new: dict[str, str]) -> list[str]:
    """Objects under the prefix that nothing of ours names. An object that is byte for byte a file of
    the new set (same name and sha256: a copy made by hand) is not in the way."""
    base = prefix.strip("/")
    out = []
    for key in remote:
        name = key[len(base) + 1:] if base else key
        if name in ours:
            continue
        if name in new and store.sha256(key) == new[name]:
            continue
        out.append(name)
    return out


def _get_or_none(store: Store, key: str) -> bytes | None:
    try:
        return store.get_bytes(key)
    except NoSuchObject:
        return None


# ---------------------------------------------------------------- a local directory (download)


def is_scratch(rel: str) -> bool:
    """Our own scratch: temporary names, the Hub's partial folders."""
    return TMP_MARK in rel or any(part.endswith(PARTIAL_DIR) for part in rel.split("/"))


def prepare_local_dir(local_dir: Path, name: str = "", way_on: str = "download into another directory") -> None:
    """The directory to fill exists and is writable; StorageError (one line) if it cannot be. `name`
    prefixes the path in the message (e.g. "--out "), `way_on` says what to do instead."""
    where = f"{name}{local_dir}"
    if local_dir.exists() and not local_dir.is_dir():
        raise StorageError(f"{where} is a file, not a directory; {way_on}")
    try:
        local_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(f"{where}: cannot create the directory: {e.strerror}; {way_on}") from None
    if not os.access(local_dir, os.W_OK | os.X_OK):
        raise StorageError(f"{where}: not writable (permission denied); {way_on}, or fix its permissions")


def check_local_dir(local_dir: Path, files: list[dict], manifest_name: str, local_manifest: dict | None,
                    verified: set[str]) -> None:
    """Refuse a download into a directory holding another set, an unfinished prepare, or files of no set.

    `local_manifest`: the directory's manifest {name: sha256} (None: none; {"": ""}: not a manifest);
    `verified`: names of files there whose size and sha256 match the set being downloaded."""
    if (local_dir / PREPARE_STATE).is_file():
        raise StorageError(f"{local_dir}: holds an unfinished `data prepare` ({PREPARE_STATE}); download into "
                           "another directory")
    if local_manifest == {"": ""}:
        raise StorageError(f"{local_dir}: its {manifest_name} is not a gpt2cloud manifest; download into another "
                           "directory")
    new = identity(files)
    if local_manifest is not None and local_manifest != new:
        raise StorageError(f"{local_dir}: already holds another shard set ({manifest_name}: "
                           f"{_example(local_manifest)}); download into another directory, or delete that one first")
    raw = (local_dir / DOWNLOAD_MARK).read_bytes() if (local_dir / DOWNLOAD_MARK).is_file() else None
    marker = read_marker(raw)
    if raw is not None and (marker is None or {n: s for n, s in marker.items() if s} != new):
        raise StorageError(f"{local_dir}: holds an unfinished download of another set ({DOWNLOAD_MARK}); download "
                           "into another directory, or delete that one first")
    ours = set(local_manifest or {}) | set(marker or {}) | verified | {manifest_name, DOWNLOAD_MARK, DATA_STATUS}
    foreign = [rel for rel in _local_files(local_dir) if rel not in ours and not is_scratch(rel)]
    if foreign:
        raise StorageError(f"{local_dir}: holds {_example(foreign)}, of no set this download brings (not written "
                           "by gpt2cloud); download into a new or empty directory")


def _local_files(local_dir: Path) -> list[str]:
    """Every file (symlinks included) under local_dir, relative, "/"-separated."""
    return [p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file() or p.is_symlink()]


def write_local_marker(local_dir: Path, files: list[dict], url: str) -> None:
    atomic_write(local_dir / DOWNLOAD_MARK, marker_bytes(files, url=url))
