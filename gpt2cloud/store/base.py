"""The object-store interface every store implements, its errors, and the helpers they share.

Imports only the standard library: the GPU node uses the store package (to fetch shards, to publish
checkpoints) without typer, pydantic or rich, and boto3 is imported only when an `s3://` URL is opened.

Keys are relative to the store's prefix and always use "/". Every write is whole-or-nothing for a
reader: S3 makes an object visible only once its (multipart) upload completes, and the file store
writes to a temporary name and renames. Sets of objects are published by uploading their manifest
last (see gpt2cloud/store/transfer.py).

    store = open_store("s3://my-bucket/gpt2/data")   # or "file:///mnt/data"
    store.put_file("shards/x_train_000001.bin", "x_train_000001.bin")
    store.get_file("x_train_000001.bin", "/tmp/x.bin", sha256="...")   # verified before it appears
"""

from __future__ import annotations

import glob
import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

Progress = Optional[Callable[[int], None]]  # called with the number of bytes moved since the last call
TMP_MARK = ".gpt2cloud-tmp-"  # temporary files of the file store and of get_file; never listed
COPY_CHUNK = 8 * 1024 * 1024


class StorageError(Exception):
    """A storage problem the user can fix; the message is one line naming the object and the fix.

    Not a gpt2cloud.errors.UserError (the store imports nothing else of gpt2cloud); the CLI shows both
    the same way: one line, exit code 2."""


class NoSuchObject(StorageError):
    """No object under that key (a missing S3 bucket is a plain StorageError that says so)."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the store's prefix
    size: int


def sha256_file(path: str | os.PathLike, progress: Progress = None) -> str:
    """Hex sha256 of a local file, read in 8 MiB chunks; StorageError if it cannot be read."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(COPY_CHUNK):
                h.update(chunk)
                if progress:
                    progress(len(chunk))
    except OSError as e:
        raise StorageError(f"{path}: cannot read: {e.strerror}") from None
    return h.hexdigest()


def tmp_path(path: Path) -> Path:
    """A unique temporary sibling of path: same directory (so rename is atomic), never a final name."""
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def clean_key(key: str) -> str:
    key = str(key).replace("\\", "/").strip("/")
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"invalid object key {key!r}: use a relative name like 'dir/file.bin' without '..'")
    return key


def join_key(prefix: str, key: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/{key}" if prefix else key


def atomic_write(path: str | os.PathLike, *chunks, fsync: bool = True, mode: int | None = None) -> None:
    """Write chunks (str or bytes-like) to path whole or not at all: a temporary sibling, flushed and
    fsynced, then renamed.

    A reader (or a rerun after kill -9) sees the old content or the new, never a torn file; the
    temporary name carries TMP_MARK, so listings skip it and remove_stale_tmp() finds it. `mode` (e.g.
    0o600 for a file that holds credentials): the file's permissions, whatever the umask, from its
    creation on (the temporary file is created with them, never readable by others even for a moment)."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        if mode is None:
            f = open(tmp, "wb")
        else:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            try:
                os.fchmod(fd, mode)  # exactly `mode`: the umask may have taken bits off what os.open made
            except BaseException:
                os.close(fd)
                raise
            f = os.fdopen(fd, "wb")
        with f:
            for chunk in chunks:
                f.write(chunk.encode() if isinstance(chunk, str) else chunk)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_tmp(path: str | os.PathLike) -> None:
    """Remove what a write to path killed midway (kill -9) left under a temporary name."""
    path = Path(path)
    for stale in path.parent.glob(glob.escape(f".{path.name}{TMP_MARK}") + "*"):
        stale.unlink(missing_ok=True)


class Store:
    """The interface; open_store() returns an S3Store (store/s3.py) or a FileStore (store/files.py)."""

    url: str

    def put_file(self, local_path, key: str, progress: Progress = None, sha256: str | None = None) -> str:
        """Upload a local file (multipart and concurrent on S3); record its sha256 (computed when not
        given) with the object; return the sha256."""
        raise NotImplementedError

    def get_file(self, key: str, local_path, progress: Progress = None, sha256: str | None = None) -> None:
        """Download to local_path atomically (temporary file, then rename). With sha256 the content is
        verified before it gets its final name; a mismatch raises StorageError and leaves nothing."""
        raise NotImplementedError

    def put_bytes(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def get_bytes(self, key: str) -> bytes:
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Objects whose key starts with prefix, sorted by key."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        """Delete an object; deleting a missing one is not an error."""
        raise NotImplementedError

    def sha256(self, key: str) -> str | None:
        """The stored object's sha256 when it is known without downloading it (S3: the metadata that
        put_file recorded; file store: hashed in place), else None (e.g. written by another tool)."""
        raise NotImplementedError

    def url_for(self, key: str = "") -> str:
        key = key.strip("/")
        return f"{self.url.rstrip('/')}/{key}" if key else self.url

    def abort(self) -> None:
        """Cancel transfers in flight (after Ctrl-C); their partial data never gets a final name."""

    def abort_incomplete_uploads(self, keys) -> int:
        """Abort unfinished uploads of these keys that a killed process left behind (S3 bills the parts
        of a multipart upload until it is aborted); return how many. Other stores have none."""
        return 0

    def close(self) -> None:
        pass
