"""Object storage for gpt2cloud and the node: `s3://bucket/prefix` (AWS S3, Cloudflare R2, MinIO, ...),
`file:///path` and, read-only, `hf://ORG/REPO[/PATH][@REVISION]` (the Hugging Face Hub), behind one
Store interface; whole directories moved as verified sets (transfer.py); the names of files and
folders in a run's OUT and bucket (layout.py).

The bottom floor of gpt2cloud: it imports nothing else of the package (an import-linter contract), and
the standard library only at module top, so the wheel shipped to a GPU node holds just `model/` and this.

Keys are relative to the store's prefix and always use "/". Every write is whole-or-nothing for a
reader: S3 makes an object visible only once its (multipart) upload completes, and the file store
writes to a temporary name and renames. Sets of objects are published by uploading their manifest last.

    store = open_store("s3://my-bucket/gpt2/data")   # or "file:///mnt/data"
    store.put_file("shards/x_train_000001.bin", "x_train_000001.bin")
    store.get_file("x_train_000001.bin", "/tmp/x.bin", sha256="...")   # verified before it appears
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from gpt2cloud.store.base import NoSuchObject, ObjectInfo, StorageError, Store, atomic_write, sha256_file
from gpt2cloud.store.files import FileStore

__all__ = ["NoSuchObject", "ObjectInfo", "StorageError", "Store", "FileStore", "atomic_write", "open_store",
           "sha256_file"]


def open_store(url: str, endpoint_url: str | None = None, *, region: str | None = None) -> Store:
    """Open `s3://bucket[/prefix]`, `file:///path` or, read-only, `hf://ORG/REPO[/PATH][@REVISION]`.

    S3 uses boto3's standard credential chain (env vars, AWS_PROFILE, ~/.aws, instance roles);
    endpoint_url (or AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL) selects an S3-compatible store such as
    Cloudflare R2 or MinIO; region defaults to AWS_REGION / AWS_DEFAULT_REGION / the profile's.
    hf:// reads a dataset repo (hf://models/... a model repo) with HF_TOKEN and HF_ENDPOINT from the
    environment; huggingface_hub is imported when it is first used.
    """
    url = str(url).strip()
    parsed = urlparse(url)
    scheme = parsed.scheme.lower()
    if scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"{url}: no bucket name; use s3://BUCKET/PREFIX")
        parts = parsed.path.strip("/").split("/")
        if any(p in (".", "..") for p in parts) or "//" in parsed.path.strip("/"):
            raise StorageError(f"{url}: a prefix may not contain '.', '..' or empty parts (S3 would store them "
                               "literally); use s3://BUCKET/a/b")
        from gpt2cloud.store.s3 import S3Store

        return S3Store(parsed.netloc, parsed.path.strip("/"), endpoint_url=endpoint_url, region=region)
    if scheme == "file":
        if endpoint_url:
            raise StorageError(f"--endpoint-url applies to s3:// URLs only, not {url}")
        # Only file:///abs/path (or file://localhost/abs/path): file://relbkt/x would land under whatever
        # the current directory happens to be, a different place from another shell or the node.
        if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
            raise StorageError(f"{url}: a file:// URL needs an absolute path: file:///abs/path (three slashes), "
                               f"e.g. file://{Path(parsed.netloc + parsed.path).expanduser().resolve().as_posix()}")
        return FileStore(Path(parsed.path).resolve())
    if scheme == "hf":
        if endpoint_url:
            raise StorageError(f"--endpoint-url applies to s3:// URLs only, not {url}; a Hub mirror is set "
                               "with HF_ENDPOINT")
        from gpt2cloud.store.hub import HubStore

        return HubStore(url)
    if not scheme:
        raise StorageError(
            f"{url!r} is not a storage URL; use s3://BUCKET/PREFIX, file:///ABSOLUTE/PATH or hf://ORG/REPO"
        )
    raise StorageError(f"unsupported URL scheme '{scheme}://' in {url}; use s3://BUCKET/PREFIX, file:///PATH "
                       "or (to read) hf://ORG/REPO[/PATH][@REVISION]")
