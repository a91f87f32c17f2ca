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

from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from gpt2cloud.store.base import NoSuchObject, ObjectInfo, StorageError, Store, atomic_write, sha256_file
from gpt2cloud.store.files import FileStore

__all__ = ["NoSuchObject", "ObjectInfo", "StorageError", "Store", "FileStore", "atomic_write", "open_store",
           "sha256_file"]


def _s3(url: str, parsed, endpoint_url: str | None, region: str | None) -> Store:
    if not parsed.netloc:
        raise StorageError(f"{url}: no bucket name; use s3://BUCKET/PREFIX")
    parts = parsed.path.strip("/").split("/")
    if any(p in (".", "..") for p in parts) or "//" in parsed.path.strip("/"):
        raise StorageError(f"{url}: a prefix may not contain '.', '..' or empty parts (S3 would store them "
                           "literally); use s3://BUCKET/a/b")
    from gpt2cloud.store.s3 import S3Store  # boto3: only once an s3:// URL is opened

    return S3Store(parsed.netloc, parsed.path.strip("/"), endpoint_url=endpoint_url, region=region)


def _file(url: str, parsed, endpoint_url: str | None, region: str | None) -> Store:
    if endpoint_url:
        raise StorageError(f"--endpoint-url applies to s3:// URLs only, not {url}")
    # Only file:///abs/path (or file://localhost/abs/path): file://relbkt/x would land under whatever
    # the current directory happens to be, a different place from another shell or the node.
    if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
        raise StorageError(f"{url}: a file:// URL needs an absolute path: file:///abs/path (three slashes), "
                           f"e.g. file://{Path(parsed.netloc + parsed.path).expanduser().resolve().as_posix()}")
    return FileStore(Path(parsed.path).resolve())


def _hf(url: str, parsed, endpoint_url: str | None, region: str | None) -> Store:
    if endpoint_url:
        raise StorageError(f"--endpoint-url applies to s3:// URLs only, not {url}; a Hub mirror is set "
                           "with HF_ENDPOINT")
    from gpt2cloud.store.hub import HubStore  # huggingface_hub: only once an hf:// URL is opened

    return HubStore(url)


@dataclass(frozen=True)
class Scheme:
    """A kind of store, by URL scheme: how to open it, and what a launched node needs to reach it."""

    open: Callable  # (url, urlparse(url), endpoint_url, region) -> Store: checks the URL, imports its module
    cloud: bool = True  # reachable from a cloud node (file:// is this machine's disk)
    writable: bool = True  # can hold a run's bucket or a prepared set (hf:// is read only here)
    node_requirements: tuple = ()  # what the node installs to open it (gpt2cloud/launch/build.py)
    plain_envs: tuple = ()  # settings the launch passes on as plain envs (an endpoint, a region)
    secret_envs: tuple = ()  # credentials the launch passes on as secrets, never written or printed


# URL scheme -> Scheme. A new store (say gs://) is one module and one line here: the launch reads the
# rest (gpt2cloud/launch/task.py check_url and storage_settings, build.py's node requirements).
STORES = {
    "s3": Scheme(_s3, node_requirements=("boto3",),
                 plain_envs=("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION"),
                 secret_envs=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")),
    "file": Scheme(_file, cloud=False),
    # the Hub: HF_TOKEN for private and gated repos is a secret, a mirror's address is not
    "hf": Scheme(_hf, writable=False, node_requirements=("huggingface_hub",), plain_envs=("HF_ENDPOINT",),
                 secret_envs=("HF_TOKEN",)),
}


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
    if scheme in STORES:
        return STORES[scheme].open(url, parsed, endpoint_url, region)
    if not scheme:
        raise StorageError(
            f"{url!r} is not a storage URL; use s3://BUCKET/PREFIX, file:///ABSOLUTE/PATH or hf://ORG/REPO"
        )
    raise StorageError(f"unsupported URL scheme '{scheme}://' in {url}; use s3://BUCKET/PREFIX, file:///PATH "
                       "or (to read) hf://ORG/REPO[/PATH][@REVISION]")
