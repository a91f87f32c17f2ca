"""The `hf://` store: token shards published on the Hugging Face Hub, read straight from it (read-only).

    hf://ORG/REPO[/PATH][@REVISION]             a dataset repo: where shard sets are published
    hf://datasets/ORG/REPO[/PATH][@REVISION]    the same, in huggingface_hub's filesystem spelling
    hf://models/ORG/REPO[/PATH][@REVISION]      a model repo
    hf://ORG/REPO@REVISION/PATH                 the revision may also follow the repo's name

A revision containing "/" (refs/pr/1) is written with %2F. The revision (default: main) is resolved
to one commit when the store is first used; every listing and download after that reads that commit,
so the files and the manifest built from them always agree, even while the repo is being pushed to.

The manifest download_dir needs (store/transfer.py) is the repo's own manifest.json under PATH when
it has one (a set prepared by gpt2cloud and uploaded with `hf upload`), else one built from the
listing: every `.bin` file directly under PATH with its size and the sha256 the Hub keeps for LFS
files, the validation shards first (they are what the trainer reads first). So `gpt2cloud data
download`, `launch --data` and the node's `python -m model.sync data` need no change for the Hub.

Downloads go through huggingface_hub's downloader into a hidden staging folder next to the target
(`.NAME.hf-partial/`): a download cut off midway continues from its partial file on the next try (an
HTTP Range request), and the file gets its final name only after its sha256 matches the Hub's.

Imports only the standard library at module top, like the rest of the store package: huggingface_hub
is imported when an `hf://` URL is used, so the node's wheel works without it for s3:// data.
HF_TOKEN (private or gated repos) and HF_ENDPOINT (a mirror) are read from the environment.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from gpt2cloud.store.base import (NoSuchObject, ObjectInfo, StorageError, Store, clean_key, join_key,
                                  sha256_file)
from gpt2cloud.store.layout import MANIFEST
from gpt2cloud.store.sets import PARTIAL_DIR, final_name
from gpt2cloud.store.transfer import _files_manifest, parse_manifest

SCHEME = "hf://"
SPELLING = "hf://ORG/REPO[/PATH][@REVISION]"
PARTIAL = PARTIAL_DIR  # the staging folder of a download in progress: .NAME.hf-partial/ beside NAME
DEFAULT_ENDPOINT = "https://huggingface.co"
REPO_TYPES = {"datasets": "dataset", "models": "model"}
# The Hub's rule for user, organization and repo names (huggingface_hub's validate_repo_id), shortened.
NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")


@dataclass(frozen=True)
class HubLocation:
    repo_type: str  # "dataset" or "model"
    repo_id: str  # ORG/REPO
    path: str  # folder inside the repo, "" for its root
    revision: str  # as the user wrote it; "" means main

    def url(self, key: str = "") -> str:
        """The canonical spelling: dataset repos without a type, the revision at the end."""
        kind = "" if self.repo_type == "dataset" else "models/"
        where = "/".join(p for p in (self.repo_id, self.path, key) if p)
        return f"{SCHEME}{kind}{where}" + (f"@{self.revision}" if self.revision else "")


def parse_hub_url(url: str) -> HubLocation:
    """Split an hf:// URL; StorageError (one line, with the expected spelling) for a malformed one."""
    url = str(url).strip()
    if not url.lower().startswith(SCHEME):
        raise StorageError(f"{url}: not an hf:// URL; use {SPELLING}")
    rest = url[len(SCHEME):].strip("/")
    if rest.count("@") > 1:
        raise StorageError(f"{url}: more than one '@'; use {SPELLING} (one revision)")
    parts = rest.split("/")
    repo_type = "dataset"
    if parts[0] in REPO_TYPES:
        repo_type = REPO_TYPES[parts.pop(0)]
    elif parts[0] in ("spaces", "kernels", "buckets"):
        raise StorageError(f"{url}: {parts[0]} hold no token shards; use a dataset repo: {SPELLING}")
    if len(parts) < 2 or not parts[0] or not parts[1] or parts[1].startswith("@"):
        raise StorageError(f"{url}: name the repo as ORG/REPO: {SPELLING}, e.g. hf://kjj0/fineweb10B-gpt2")
    org, repo, path_parts = parts[0], parts[1], parts[2:]
    revision = ""
    if "@" in repo:  # hf://ORG/REPO@REVISION[/PATH]
        repo, revision = repo.split("@", 1)
    else:  # hf://ORG/REPO[/PATH]@REVISION
        path = "/".join(path_parts)
        if "@" in path:
            path, revision = path.rsplit("@", 1)
            path_parts = path.split("/") if path else []
    revision = unquote(revision)
    if "@" in url and not revision:
        raise StorageError(f"{url}: empty revision after '@'; use {SPELLING}, e.g. @main or a commit sha")
    if revision and (any(c.isspace() for c in revision) or ".." in revision):
        raise StorageError(f"{url}: bad revision {revision!r}; use a branch, tag or commit sha")
    for name in (org, repo):
        if not NAME.match(name) or ".." in name or "--" in name:
            raise StorageError(f"{url}: {name!r} is not a valid Hub name (letters, digits, '-', '_', '.'); "
                               f"use {SPELLING}")
    if any(p in ("", ".", "..") for p in path_parts):
        raise StorageError(f"{url}: a path inside the repo may not contain '.', '..' or empty parts; "
                           f"use {SPELLING}")
    return HubLocation(repo_type, f"{org}/{repo}", "/".join(path_parts), revision)


@dataclass(frozen=True)
class _HubFile:
    size: int
    sha256: str | None  # the Hub's LFS sha256; None for a small file kept in git itself


class HubStore(Store):
    """A folder of a Hugging Face Hub repo at one commit, read-only."""

    def __init__(self, url: str):
        self.loc = parse_hub_url(url)
        self.url = self.loc.url()
        self.endpoint = endpoint_override()
        self._lock = threading.Lock()
        self._commit: str | None = None
        self._files: dict[str, _HubFile] | None = None
        self._manifest: bytes | None = None
        self._aborted = threading.Event()

    def url_for(self, key: str = "") -> str:
        return self.loc.url(key.strip("/"))

    # ------------------------------------------------------------ the pinned listing

    def commit(self) -> str:
        """The commit the revision (default main) pointed to when this store was first used."""
        with self._lock:
            if self._commit is None:
                with self._errors():
                    info = self._api().repo_info(self.loc.repo_id, repo_type=self.loc.repo_type,
                                                 revision=self.loc.revision or "main")
                if not info.sha:
                    raise StorageError(f"{self.url}: the Hub did not say which commit "
                                       f"{self.loc.revision or 'main'} is; check HF_ENDPOINT")
                self._commit = info.sha
            return self._commit

    def pinned_url(self) -> str:
        """This URL with the resolved commit as its revision: the same bytes for every node and every
        recovery, whatever is pushed to the repo later."""
        return HubLocation(self.loc.repo_type, self.loc.repo_id, self.loc.path, self.commit()).url()

    def files(self) -> dict[str, _HubFile]:
        """Every file under PATH at the pinned commit, by key (its path relative to PATH)."""
        commit = self.commit()
        with self._lock:
            if self._files is None:
                RepoFile = _hf().hf_api.RepoFile

                # No expand=True: the plain listing already carries each LFS file's sha256 and size, and
                # it comes 1000 entries a page instead of 50.
                try:
                    with self._errors():
                        entries = list(self._api().list_repo_tree(
                            self.loc.repo_id, path_in_repo=self.loc.path or None, recursive=True,
                            revision=commit, repo_type=self.loc.repo_type))
                except NoSuchObject:  # the Hub's 404 for a folder that is not there
                    raise StorageError(f"{self.url}: no folder {self.loc.path!r} in {self.loc.repo_type} repo "
                                       f"{self.loc.repo_id} at commit {commit[:12]}; check the PATH in the URL"
                                       ) from None
                prefix = self.loc.path + "/" if self.loc.path else ""
                self._files = {
                    e.path[len(prefix):]: _HubFile(e.size, e.lfs.sha256 if e.lfs else None)
                    for e in entries if isinstance(e, RepoFile) and e.path.startswith(prefix)
                }
            return self._files

    # ------------------------------------------------------------ reading

    def list(self, prefix=""):
        return [ObjectInfo(k, f.size) for k, f in sorted(self.files().items()) if k.startswith(prefix)]

    def exists(self, key):
        key = clean_key(key)
        if key in self.files():
            return True
        return key == MANIFEST and any(_is_shard(k) for k in self.files())

    def sha256(self, key):
        f = self.files().get(clean_key(key))
        return f.sha256 if f else None

    def get_bytes(self, key):
        key = clean_key(key)
        if key == MANIFEST:
            return self.manifest()
        with tempfile.TemporaryDirectory(prefix="gpt2cloud-hub-") as tmp:
            dest = Path(tmp) / "file"
            self.get_file(key, dest)
            return dest.read_bytes()

    def manifest(self) -> bytes:
        """The repo's own manifest.json under PATH if it is a gpt2cloud one, else one built from the listing."""
        if self._manifest is not None:
            return self._manifest
        if MANIFEST in self.files():
            with tempfile.TemporaryDirectory(prefix="gpt2cloud-hub-") as tmp:
                self.get_file(MANIFEST, Path(tmp) / MANIFEST)
                own = (Path(tmp) / MANIFEST).read_bytes()
            try:
                parse_manifest(own, self.url_for(MANIFEST))
                self._manifest = own
                return own
            except StorageError:
                pass  # another tool's manifest.json: the listing describes the shards as well
        shards = sorted((k for k in self.files() if _is_shard(k)), key=lambda k: ("val" not in k, k))
        if not shards:
            deeper = sorted({k.rsplit("/", 1)[0] for k in self.files() if k.endswith(".bin")})
            if deeper:
                raise StorageError(f"{self.url}: no .bin shards directly in this folder; they are in "
                                   f"{', '.join(deeper[:3])}{', ...' if len(deeper) > 3 else ''}: put the folder "
                                   f"in the URL, e.g. {self.loc.url(deeper[0])}")
            raise StorageError(f"{self.url}: no {MANIFEST} and no .bin token shards here (commit "
                               f"{self.commit()[:12]}); check the repo and PATH, or publish shards made by "
                               "`gpt2cloud data prepare`")
        entries = []
        for k in shards:
            f = self.files()[k]
            # A .bin kept in git itself (not LFS: small, uploaded without the Hub's LFS rules) has no
            # sha256 in the listing: hash its bytes once here.
            sha = f.sha256 or _sha256_bytes(self.get_bytes(k))
            entries.append({"name": k, "size": f.size, "sha256": sha})
        self._manifest = (json.dumps(_files_manifest(entries), indent=2) + "\n").encode()
        return self._manifest

    def get_file(self, key, local_path, progress=None, sha256=None):
        key = clean_key(key)
        what = self.url_for(key)
        f = self.files().get(key)
        if f is None:
            raise NoSuchObject(f"{what}: no such file in {self.loc.repo_id} at commit {self.commit()[:12]}")
        if sha256 and f.sha256 and sha256 != f.sha256:
            raise StorageError(f"{what}: the manifest says sha256 {sha256}, the Hub says {f.sha256}; the repo's "
                               f"{MANIFEST} is out of date: regenerate it, or remove it to use the listing")
        expected = f.sha256 or sha256
        local_path = Path(local_path)
        # kept between tries, under the final name even when the file lands at a checking name first
        # (sets.fetch_checked): a cut download resumes from it
        staging = local_path.with_name(f".{final_name(local_path).name}{PARTIAL}")
        hf_hub_download = _hf().hf_hub_download
        local_path.parent.mkdir(parents=True, exist_ok=True)
        with self._errors(key):
            got = Path(hf_hub_download(
                self.loc.repo_id, join_key(self.loc.path, key), repo_type=self.loc.repo_type,
                revision=self.commit(), local_dir=staging, endpoint=self.endpoint,
                tqdm_class=_progress_bar(progress, self._aborted)))
        actual = sha256_file(got)
        if expected and actual != expected:
            shutil.rmtree(staging, ignore_errors=True)  # the next try starts over, not from these bytes
            raise StorageError(f"{what}: sha256 mismatch: expected {expected}, got {actual}; nothing was kept: run "
                               "again, and if it repeats, the Hub serves bytes that do not match its own sha256")
        os.replace(got, local_path)
        shutil.rmtree(staging, ignore_errors=True)

    # ------------------------------------------------------------ writing: never

    def _read_only(self, *_args, **_kwargs):
        raise StorageError(f"hf:// is read-only ({self.url}): gpt2cloud reads shards from the Hub; write to "
                           "s3://BUCKET/PREFIX or file:///PATH, or publish with `hf upload`")

    put_file = put_bytes = delete = _read_only

    def abort(self):
        self._aborted.set()

    # ------------------------------------------------------------ huggingface_hub

    def _api(self):
        return _hf().HfApi(endpoint=self.endpoint)

    @contextmanager
    def _errors(self, key: str = ""):
        """huggingface_hub's and httpx's exceptions -> one-line StorageErrors that say what to do."""
        hf = _hf().errors
        import httpx  # huggingface_hub's HTTP client

        what = self.url_for(key)
        endpoint = self.endpoint or DEFAULT_ENDPOINT
        repo = f"{self.loc.repo_type} repo {self.loc.repo_id}"
        rev = self.loc.revision or "main"
        try:
            yield
        except StorageError:
            raise
        except hf.GatedRepoError:
            raise StorageError(f"{what}: {repo} is gated: accept its terms on its page on {endpoint}, then set "
                               "HF_TOKEN to a read token of that account") from None
        except hf.RepositoryNotFoundError:
            other = "models/" if self.loc.repo_type == "dataset" else "datasets/"
            raise StorageError(f"{what}: no {repo} on {endpoint}, or it is private (set HF_TOKEN to a read token "
                               f"that can see it); for a {other[:-2]} repo write hf://{other}{self.loc.repo_id}"
                               ) from None
        except hf.RevisionNotFoundError:
            raise StorageError(f"{what}: {repo} has no revision {rev!r}; use a branch, tag or commit sha that "
                               "exists") from None
        except hf.LocalEntryNotFoundError as e:  # the HEAD request failed and nothing is cached
            raise StorageError(f"{what}: cannot reach {endpoint} ({_cause(e)}); check the network or "
                               "HF_ENDPOINT, and run again: a download resumes where it stopped") from None
        except hf.EntryNotFoundError:
            raise NoSuchObject(f"{what}: not in {repo} at {rev} (commit {(self._commit or '?')[:12]}); check "
                               "the PATH in the URL") from None
        except hf.OfflineModeIsEnabled:
            raise StorageError(f"{what}: HF_HUB_OFFLINE is set; unset it to download from the Hub") from None
        except hf.HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else None
            if status in (401, 403):
                fix = "set HF_TOKEN to a read token that can see this repo"
            elif status == 429:
                fix = "rate-limited: wait a minute, and set HF_TOKEN (signed-in users get higher limits)"
            else:
                fix = "the Hub may be down: run again later; a download resumes where it stopped"
            raise StorageError(f"{what}: HTTP {status} from {endpoint}: {fix}") from None
        except httpx.HTTPError as e:  # refused, timed out, or the connection dropped midway
            raise StorageError(f"{what}: connection to {endpoint} failed ({type(e).__name__}: {_first_line(e)}); "
                               "run again: the download resumes where it stopped") from None
        except ValueError as e:  # huggingface_hub's argument checks (a repo id it refuses, ...)
            raise StorageError(f"{what}: {_first_line(e)}") from None
        except OSError as e:  # a short download (size check), a full disk, a permission
            raise StorageError(f"{what}: {_first_line(e)}; run again: the download resumes where it stopped"
                               ) from None


def _hf():
    """huggingface_hub, imported on first use of an hf:// URL; a one-line fix when it is missing."""
    try:
        import huggingface_hub
        import huggingface_hub.errors
        import huggingface_hub.hf_api
    except ImportError:
        raise StorageError("hf:// URLs need huggingface_hub: pip install huggingface_hub") from None
    return huggingface_hub


def _is_shard(key: str) -> bool:
    """A token shard of this folder: the trainer reads the .bin files of one directory, not below it."""
    return key.endswith(".bin") and "/" not in key


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def endpoint_override() -> str | None:
    """HF_ENDPOINT (a mirror, or the tests' local Hub), or None: read at each use, not at huggingface_hub's
    import (it freezes its constants then)."""
    return (os.environ.get("HF_ENDPOINT") or "").strip().rstrip("/") or None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _cause(e: BaseException) -> str:
    cause = e.__cause__ or e.__context__
    return f"{type(cause).__name__}: {_first_line(cause)}" if cause else _first_line(e)


def _progress_bar(progress, aborted: threading.Event):
    """A stand-in for tqdm that huggingface_hub's downloader drives: it passes the bytes on to the
    caller's progress callback and stops the transfer (its partial file is kept) after Ctrl-C."""

    class Bar:
        def __init__(self, *args, initial=0, **kwargs):
            if progress and initial:
                progress(initial)  # a resumed download: the bytes already on disk count

        def update(self, n=1):
            if aborted.is_set():
                raise KeyboardInterrupt
            if progress and n:
                progress(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def __getattr__(self, name):  # close(), refresh(), set_description(), ...: nothing to draw
            return lambda *a, **k: None

    return Bar
