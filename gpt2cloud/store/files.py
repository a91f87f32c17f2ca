"""The `file:///path` store: a directory used as an object store, the embedded default (no server needed)."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from gpt2cloud.store.base import (COPY_CHUNK, TMP_MARK, NoSuchObject, ObjectInfo, Progress, StorageError, Store,
                                  atomic_write, clean_key, sha256_file, tmp_path)



class FileStore(Store):
    """A directory used as an object store: the embedded default, no server needed."""

    def __init__(self, root: Path):
        self.root = root
        self.url = "file://" + root.as_posix()
        self._aborted = threading.Event()

    def _path(self, key: str) -> Path:
        return self.root / clean_key(key)

    def _copy(self, src: Path, dst: Path, progress: Progress, sha256: str | None, what: str) -> str:
        """Copy src to dst through a temporary sibling, hashing on the way; verify before the rename."""
        tmp = tmp_path(dst)
        h = hashlib.sha256()
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                while chunk := fin.read(COPY_CHUNK):
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
            atomic_write(dst, data)
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
                if TMP_MARK in name:
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
