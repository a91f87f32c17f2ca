"""One object-store interface over `s3://bucket/prefix` (AWS S3, Cloudflare R2, MinIO, ...) and `file:///path`.

The GPU node imports this module before training (to fetch shards, to publish checkpoints), so the
module top imports only the standard library: the S3 store (gpt2cloud/s3store.py) and boto3 are
imported when an `s3://` URL is opened, and typer, pydantic and rich are never imported here.

Keys are relative to the store's prefix and always use "/". Every write is whole-or-nothing for a
reader: S3 makes an object visible only once its (multipart) upload completes, and the file store
writes to a temporary name and renames. Sets of objects are published by uploading their manifest
last (see gpt2cloud/transfer.py).

    store = open_store("s3://my-bucket/gpt2/data")   # or "file:///mnt/data"
    store.put_file("shards/x_train_000001.bin", "x_train_000001.bin")
    store.get_file("x_train_000001.bin", "/tmp/x.bin", sha256="...")   # verified before it appears
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlparse

from gpt2cloud.errors import UserError

Progress = Optional[Callable[[int], None]]  # called with the number of bytes moved since the last call
_TMP_MARK = ".gpt2cloud-tmp-"  # temporary files of the file store and of get_file; never listed
_COPY_CHUNK = 8 * 1024 * 1024


class StorageError(UserError):
    """A storage problem the user can fix; the message is one line naming the object and the fix."""


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
            while chunk := f.read(_COPY_CHUNK):
                h.update(chunk)
                if progress:
                    progress(len(chunk))
    except OSError as e:
        raise StorageError(f"{path}: cannot read: {e.strerror}") from None
    return h.hexdigest()


def _tmp_path(path: Path) -> Path:
    """A unique temporary sibling of path: same directory (so rename is atomic), never a final name."""
    return path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _clean_key(key: str) -> str:
    key = str(key).replace("\\", "/").strip("/")
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"invalid object key {key!r}: use a relative name like 'dir/file.bin' without '..'")
    return key


def _join(prefix: str, key: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/{key}" if prefix else key


class Store:
    """The interface; open_store() returns an S3Store (gpt2cloud.s3store) or a FileStore."""

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


def open_store(url: str, endpoint_url: str | None = None, *, region: str | None = None) -> Store:
    """Open `s3://bucket[/prefix]` or `file:///path`.

    S3 uses boto3's standard credential chain (env vars, AWS_PROFILE, ~/.aws, instance roles);
    endpoint_url (or AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL) selects an S3-compatible store such as
    Cloudflare R2 or MinIO; region defaults to AWS_REGION / AWS_DEFAULT_REGION / the profile's.
    """
    url = str(url).strip()
    parsed = urlparse(url)
    scheme = parsed.scheme.lower()
    if scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"{url}: no bucket name; use s3://BUCKET/PREFIX")
        from gpt2cloud.s3store import S3Store

        return S3Store(parsed.netloc, parsed.path.strip("/"), endpoint_url=endpoint_url, region=region)
    if scheme == "file":
        if endpoint_url:
            raise StorageError(f"--endpoint-url applies to s3:// URLs only, not {url}")
        # file:///abs/path is the normal form; accept file://relative/path (netloc + path) too.
        host = parsed.netloc if parsed.netloc not in ("", "localhost") else ""
        path = host + parsed.path
        if not path:
            raise StorageError(f"{url}: no path; use file:///absolute/path")
        return FileStore(Path(path).expanduser().resolve())
    if not scheme:
        raise StorageError(
            f"{url!r} is not a storage URL; use s3://BUCKET/PREFIX or file:///ABSOLUTE/PATH"
        )
    raise StorageError(f"unsupported URL scheme '{scheme}://' in {url}; use s3://BUCKET/PREFIX or file:///PATH")


# ---------------------------------------------------------------- file:// store


class FileStore(Store):
    """A directory used as an object store: the embedded default, no server needed."""

    def __init__(self, root: Path):
        self.root = root
        self.url = "file://" + root.as_posix()
        self._aborted = threading.Event()

    def _path(self, key: str) -> Path:
        return self.root / _clean_key(key)

    def _copy(self, src: Path, dst: Path, progress: Progress, sha256: str | None, what: str) -> str:
        """Copy src to dst through a temporary sibling, hashing on the way; verify before the rename."""
        tmp = _tmp_path(dst)
        h = hashlib.sha256()
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                while chunk := fin.read(_COPY_CHUNK):
                    if self._aborted.is_set():
                        raise KeyboardInterrupt
                    fout.write(chunk)
                    h.update(chunk)
                    if progress:
                        progress(len(chunk))
                fout.flush()
                os.fsync(fout.fileno())
            digest = h.hexdigest()
            if sha256 and digest != sha256:
                raise StorageError(
                    f"{what}: sha256 mismatch (expected {sha256[:12]}..., got {digest[:12]}...); "
                    "the file changed or is corrupt: re-create or re-upload it"
                )
            os.replace(tmp, dst)
            return digest
        except FileNotFoundError as e:
            if Path(e.filename or "") == src:
                raise StorageError(f"{what}: no such file") from None
            raise StorageError(f"{what}: {e.strerror}: {e.filename}") from None
        except PermissionError as e:
            raise StorageError(f"{what}: permission denied: {e.filename}; check the path's permissions") from None
        except OSError as e:  # a directory in the way, a full disk, ...
            raise StorageError(f"{what}: {e.strerror}: {e.filename or dst}") from None
        finally:
            tmp.unlink(missing_ok=True)

    def put_file(self, local_path, key, progress=None, sha256=None):
        return self._copy(Path(local_path), self._path(key), progress, sha256, f"{local_path}")

    def get_file(self, key, local_path, progress=None, sha256=None):
        src = self._path(key)
        if not src.is_file():
            raise NoSuchObject(f"{self.url_for(key)}: no such object")
        self._copy(src, Path(local_path), progress, sha256, self.url_for(key))

    def put_bytes(self, key, data):
        dst = self._path(key)
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = _tmp_path(dst)
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, dst)
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as e:
            raise StorageError(f"{self.url_for(key)}: cannot write: {e.strerror}") from None

    def get_bytes(self, key):
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NoSuchObject(f"{self.url_for(key)}: no such object") from None
        except OSError as e:
            raise StorageError(f"{self.url_for(key)}: cannot read: {e.strerror}") from None

    def list(self, prefix=""):
        out = []
        if not self.root.is_dir():
            return out
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if _TMP_MARK in name:
                    continue  # a write in progress (or killed): not an object
                p = Path(dirpath) / name
                key = p.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    out.append(ObjectInfo(key, p.stat().st_size))
        return sorted(out, key=lambda o: o.key)

    def exists(self, key):
        return self._path(key).is_file()

    def delete(self, key):
        self._path(key).unlink(missing_ok=True)

    def sha256(self, key):
        p = self._path(key)
        return sha256_file(p) if p.is_file() else None

    def abort(self):
        self._aborted.set()
