"""hf:// data: token shards read straight from the Hugging Face Hub (gpt2cloud/store/hub.py).

The Hub here is a local HTTP server the test starts (FakeHub, 127.0.0.1, a free port) that answers
the requests huggingface_hub 1.16 makes, in the Hub's shapes: the revision endpoint (commit sha), the
tree listing (sizes, LFS sha256), and /resolve/ with HEAD and Range (X-Repo-Commit, X-Linked-Etag,
X-Linked-Size). HF_ENDPOINT points at it; nothing reaches the network. It sends no Xet headers, so
huggingface_hub downloads over plain HTTP, as it does for any repo not stored on Xet.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import huggingface_hub.constants
import pytest
import yaml
from trainer_helpers import make_shards
from typer.testing import CliRunner

from gpt2cloud.cli import app
from gpt2cloud.errors import UserError
from gpt2cloud.launch.plan import plan
from gpt2cloud.store import StorageError, open_store
from gpt2cloud.store.hub import PARTIAL, parse_hub_url
from gpt2cloud.store.transfer import download_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_not_a_real_token_0123456789abcdef"
SHARDS = "org/shards"  # a dataset repo with shards under tiny/ and a README at its root


def _sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


class FakeHub:
    """Repos as {path: bytes} per commit; `.bin` files are LFS files (the listing carries their sha256)."""

    def __init__(self):
        self.repos: dict = {}  # repo_id -> {"type", "commits": [(sha, files)], "gated"}
        self.corrupt: set = set()  # paths served with one byte changed (listing and ETag keep the true sha256)
        self.cut: dict = {}  # path -> body bytes sent before the connection drops (once)
        self.served: Counter = Counter()  # path -> body bytes sent
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                hub.handle(self, body=True)

            def do_HEAD(self):
                hub.handle(self, body=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def push(self, repo_id: str, files: dict, repo_type: str = "dataset", gated: bool = False) -> str:
        repo = self.repos.setdefault(repo_id, {"type": repo_type, "commits": [], "gated": gated})
        sha = hashlib.sha1(f"{repo_id} {len(repo['commits'])}".encode()).hexdigest()
        repo["commits"].append((sha, dict(files)))
        return sha

    # ---- the Hub's answers

    def handle(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = urlsplit(h.path).path
        if m := re.match(r"^/api/(datasets|models)/([^/]+/[^/]+)/revision/([^/]+)$", path):
            found = self._find(h, m[1], unquote(m[2]), unquote(m[3]))
            if found:
                self._json(h, {"id": unquote(m[2]), "sha": found[0]})
        elif m := re.match(r"^/api/(datasets|models)/([^/]+/[^/]+)/tree/([^/]+)(?:/(.+))?$", path):
            found = self._find(h, m[1], unquote(m[2]), unquote(m[3]))
            prefix = unquote(m[4]) + "/" if m[4] else ""
            if found and not any(p.startswith(prefix) for p in found[1]):
                self._error(h, 404, "EntryNotFound", found[0])  # as the Hub answers for a missing folder
            elif found:
                self._json(h, self._tree(found[1], prefix))
        elif m := re.match(r"^/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path):
            found = self._find(h, "datasets" if m[1] else "models", unquote(m[2]), unquote(m[3]))
            if found:
                self._file(h, found[0], found[1], unquote(m[4]), body)
        else:
            self._error(h, 404, "RepoNotFound")

    def _find(self, h, kind: str, repo_id: str, revision: str):
        repo = self.repos.get(repo_id)
        if repo is None or kind != repo["type"] + "s":
            return self._error(h, 401, "RepoNotFound")
        if repo["gated"] and h.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._error(h, 401, "GatedRepo")
        commits = dict(repo["commits"])
        if revision == "main":
            return repo["commits"][-1]
        if revision in commits:
            return revision, commits[revision]
        return self._error(h, 404, "RevisionNotFound")

    @staticmethod
    def _tree(files: dict, prefix: str) -> list:
        out, folders = [], set()
        for path in sorted(files):
            if not path.startswith(prefix):
                continue
            data = files[path]
            entry = {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            if path.endswith(".bin"):
                entry["lfs"] = {"oid": _sha256(data), "size": len(data), "pointerSize": 134}
            out.append(entry)
            parts = path[len(prefix):].split("/")[:-1]
            folders |= {prefix + "/".join(parts[:i + 1]) for i in range(len(parts))}
        return out + [{"type": "directory", "path": f, "oid": "0" * 40} for f in sorted(folders)]

    def _file(self, h, commit: str, files: dict, path: str, body: bool) -> None:
        if path not in files:
            return self._error(h, 404, "EntryNotFound", commit)
        data = files[path]
        start = 0
        if body and (m := re.match(r"bytes=(\d+)-$", h.headers.get("Range", ""))):
            start = int(m[1])
        h.send_response(206 if start else 200)
        h.send_header("X-Repo-Commit", commit)
        if path.endswith(".bin"):  # LFS: the Hub's ETag for it is its sha256
            h.send_header("X-Linked-Etag", f'"{_sha256(data)}"')
            h.send_header("X-Linked-Size", str(len(data)))
        h.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
        h.send_header("Accept-Ranges", "bytes")
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.send_header("Content-Length", str(len(data) - start))
        h.end_headers()
        if not body:
            return
        if path in self.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        out = data[start:]
        with self.lock:
            cut = self.cut.pop(path, None)
        if cut is not None:  # the connection drops midway, as a flaky network does
            out = out[:cut]
        h.wfile.write(out)
        h.wfile.flush()
        with self.lock:
            self.served[path] += len(out)
        if cut is not None:
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)

    @staticmethod
    def _json(h, obj) -> None:
        data = json.dumps(obj).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    @staticmethod
    def _error(h, status: int, code: str, commit: str | None = None):
        h.send_response(status)
        h.send_header("X-Error-Code", code)
        if commit:
            h.send_header("X-Repo-Commit", commit)
        h.send_header("Content-Length", "0")
        h.end_headers()
        return None


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fake Hub holding org/shards: tiny/ (a val and two train shards), README.md; HF_ENDPOINT -> it."""
    server = FakeHub()
    src = make_shards(tmp_path / "src")
    files = {f"tiny/{p.name}": p.read_bytes() for p in sorted(src.glob("*.bin"))}
    files["README.md"] = b"# shards\n"
    server.push(SHARDS, files)
    server.push("org/docs", {"README.md": b"# no shards here\n"})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # subprocesses; conftest turns the real Hub off
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read at import: this process
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield server
    server.server.shutdown()
    server.server.server_close()


def _served_files(hub: FakeHub, repo=SHARDS) -> dict:
    return hub.repos[repo]["commits"][-1][1]


def _download(args: list[str]):
    r = CliRunner().invoke(app, ["data", "download", *args])
    return r.exit_code, r.output


# ---------------------------------------------------------------- downloads


def test_cli_download_gets_the_served_shards_and_a_manifest(hub, tmp_path):
    dest = tmp_path / "dl"
    code, out = _download(["hf://org/shards/tiny", str(dest), "--json"])
    assert code == 0, out
    served = {k[len("tiny/"):]: v for k, v in _served_files(hub).items() if k.startswith("tiny/")}
    assert {p.name: p.read_bytes() for p in dest.glob("*.bin")} == served
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["format"] == "gpt2cloud-files"
    # built from the listing: the val shard first (the trainer reads it first), each with the Hub's sha256
    assert [f["name"] for f in manifest["files"]] == ["tiny_val_000000.bin", "tiny_train_000001.bin",
                                                       "tiny_train_000002.bin"]
    assert all(f["sha256"] == _sha256(served[f["name"]]) for f in manifest["files"])
    assert not [p for p in dest.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    assert json.loads(out)["downloaded"] == 3
    code, out = _download(["hf://datasets/org/shards/tiny@main", str(dest), "--json"])  # the fs spelling
    assert code == 0 and json.loads(out)["downloaded"] == 0 and json.loads(out)["skipped"] == 3


def test_a_sha256_mismatch_is_refused_and_nothing_keeps_the_name(hub, tmp_path):
    hub.corrupt.add("tiny/tiny_train_000002.bin")
    dest = tmp_path / "dl"
    code, out = _download(["hf://org/shards/tiny", str(dest), "--json"])
    true_sha = _sha256(_served_files(hub)["tiny/tiny_train_000002.bin"])
    assert code == 2 and out.count("\n") == 1 and out.startswith("error: "), out
    assert "tiny_train_000002.bin: sha256 mismatch" in out and f"expected {true_sha}" in out
    assert re.search(r"got [0-9a-f]{64}", out)
    assert not (dest / "tiny_train_000002.bin").exists()
    assert not list(dest.glob(f".tiny_train_000002.bin{PARTIAL}"))  # the bad bytes are gone, not resumed from
    assert not (dest / "manifest.json").exists()  # the set is not complete


def test_a_cut_download_resumes_from_its_partial_file(hub, tmp_path, monkeypatch):
    # huggingface_hub writes what it receives in chunks of DOWNLOAD_CHUNK_SIZE (10 MB); small ones here,
    # so a few KB of shard leave a partial file when the connection drops
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 1024)
    name = "tiny/tiny_train_000001.bin"
    size = len(_served_files(hub)[name])
    hub.cut[name] = size // 2
    dest = tmp_path / "dl"
    code, out = _download(["hf://org/shards/tiny", str(dest), "--json"])
    assert code == 2 and out.count("\n") == 1 and "resumes" in out, out
    assert not (dest / "tiny_train_000001.bin").exists()
    (partial,) = dest.glob(".tiny_train_000001.bin.hf-partial/**/*.incomplete")
    kept = partial.stat().st_size
    assert 0 < kept <= size // 2
    before = hub.served[name]
    code, out = _download(["hf://org/shards/tiny", str(dest), "--json"])
    assert code == 0, out
    assert hub.served[name] - before == size - kept  # only the rest, through a Range request
    assert (dest / "tiny_train_000001.bin").read_bytes() == _served_files(hub)[name]
    assert json.loads(out)["downloaded"] == 1 and json.loads(out)["skipped"] == 2


def test_the_node_downloads_with_model_sync(hub, tmp_path):
    dest = tmp_path / "node-data"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    r = subprocess.run([sys.executable, "-m", "model.sync", "data", "hf://org/shards/tiny", str(dest)],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "3 files" in r.stderr and "all sha256-verified" in r.stderr
    assert sorted(p.name for p in dest.glob("*.bin")) == ["tiny_train_000001.bin", "tiny_train_000002.bin",
                                                          "tiny_val_000000.bin"]
    assert (dest / "manifest.json").is_file() and not list(dest.glob(f"*{PARTIAL}"))
    r = subprocess.run([sys.executable, "-m", "model.sync", "data", "hf://org/nope", str(tmp_path / "x")],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 3 and "no dataset repo org/nope" in r.stderr  # EXIT_DATA, one line


# ---------------------------------------------------------------- listing, manifest, revisions


def test_the_listing_is_pinned_to_one_commit(hub, tmp_path):
    store = open_store("hf://org/shards/tiny")
    old = _served_files(hub)
    manifest = json.loads(store.get_bytes("manifest.json"))
    hub.push(SHARDS, {**old, "tiny/tiny_train_000001.bin": b"changed after the listing"})
    # the store goes on reading the commit it listed: files and manifest agree
    download_dir(store, "", tmp_path / "a", progress=False)
    assert (tmp_path / "a" / "tiny_train_000001.bin").read_bytes() == old["tiny/tiny_train_000001.bin"]
    assert json.loads((tmp_path / "a" / "manifest.json").read_bytes()) == manifest
    first = hub.repos[SHARDS]["commits"][0][0]
    assert store.pinned_url() == f"hf://org/shards/tiny@{first}"
    assert open_store(f"hf://org/shards@{first}/tiny").sha256("tiny_train_000001.bin") == \
        _sha256(old["tiny/tiny_train_000001.bin"])
    assert open_store("hf://org/shards/tiny").sha256("tiny_train_000001.bin") == _sha256(b"changed after the listing")


def test_store_interface_reads_and_refuses_writes(hub, tmp_path):
    store = open_store("hf://org/shards")
    assert [o.key for o in store.list()] == ["README.md", "tiny/tiny_train_000001.bin",
                                             "tiny/tiny_train_000002.bin", "tiny/tiny_val_000000.bin"]
    assert [o.key for o in store.list("tiny/tiny_val")] == ["tiny/tiny_val_000000.bin"]
    assert store.get_bytes("README.md") == b"# shards\n" and store.sha256("README.md") is None
    assert store.exists("tiny/tiny_val_000000.bin") and not store.exists("nope.bin")
    assert store.url_for("tiny/x.bin") == "hf://org/shards/tiny/x.bin"
    # at the repo's root there are no shards: the error says where they are
    assert not store.exists("manifest.json")
    with pytest.raises(StorageError, match=r"they are in tiny: put the folder in the URL, e.g. hf://org/shards/tiny"):
        store.get_bytes("manifest.json")
    for write in (lambda: store.put_bytes("x", b"x"), lambda: store.put_file(tmp_path, "x"),
                  lambda: store.delete("x")):
        with pytest.raises(StorageError, match="hf:// is read-only"):
            write()
    with pytest.raises(StorageError, match="no such file"):
        store.get_file("tiny/missing.bin", tmp_path / "m")


def test_a_repo_with_its_own_manifest_uses_it(hub, tmp_path):
    src = make_shards(tmp_path / "src2", train_tokens=(2000,))
    files = {p.name: p.read_bytes() for p in src.glob("*.bin")}
    own = {"format": "gpt2cloud-files", "version": 1, "note": "uploaded by gpt2cloud",
           "files": [{"name": n, "size": len(b), "sha256": _sha256(b)} for n, b in sorted(files.items())]}
    raw = json.dumps(own).encode()
    hub.push("org/prepared", {**files, "manifest.json": raw})
    store = open_store("hf://org/prepared")
    assert store.get_bytes("manifest.json") == raw
    download_dir(store, "", tmp_path / "dl", progress=False)
    assert (tmp_path / "dl" / "manifest.json").read_bytes() == raw
    # a manifest that disagrees with the Hub's sha256 is refused before any download
    own["files"][0]["sha256"] = "0" * 64
    hub.push("org/prepared", {**files, "manifest.json": json.dumps(own).encode()})
    with pytest.raises(StorageError, match="the manifest says sha256 0000.*the Hub says"):
        download_dir(open_store("hf://org/prepared"), "", tmp_path / "dl2", progress=False)


def test_gated_repos_need_hf_token_and_model_repos_their_type(hub, tmp_path, monkeypatch):
    src = make_shards(tmp_path / "src3", train_tokens=(2000,))
    hub.push("org/gated", {p.name: p.read_bytes() for p in src.glob("*.bin")}, gated=True)
    with pytest.raises(StorageError, match="is gated: .* set HF_TOKEN"):
        open_store("hf://org/gated").get_bytes("manifest.json")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    download_dir(open_store("hf://org/gated"), "", tmp_path / "dl", progress=False)
    assert len(list((tmp_path / "dl").glob("*.bin"))) == 2
    hub.push("org/model-shards", {p.name: p.read_bytes() for p in src.glob("*.bin")}, repo_type="model")
    with pytest.raises(StorageError, match="no dataset repo org/model-shards .* write hf://models/org/model-shards"):
        open_store("hf://org/model-shards").list()
    download_dir(open_store("hf://models/org/model-shards"), "", tmp_path / "dl-model", progress=False)
    assert len(list((tmp_path / "dl-model").glob("*.bin"))) == 2


@pytest.mark.parametrize("url, message", [
    ("hf://org/shards@v9/tiny", "has no revision 'v9'"),
    ("hf://org/shards/nothere", "no folder 'nothere' in dataset repo org/shards"),
    ("hf://org/docs", "no manifest.json and no .bin token shards here"),
    ("hf://org/shards/tiny/x.bin", "no folder 'tiny/x.bin'"),
])
def test_hub_errors_are_one_line_and_say_what_to_do(hub, tmp_path, url, message):
    code, out = _download([url, str(tmp_path / "dl")])
    assert code == 2 and out.startswith("error: ") and out.count("\n") == 1 and message in out, out


def test_an_unreachable_hub_is_one_line(hub, tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    code, out = _download(["hf://org/shards/tiny", str(tmp_path / "dl")])
    assert code == 2 and out.count("\n") == 1 and f"127.0.0.1:{port} failed (ConnectError" in out, out


@pytest.mark.parametrize("url, parsed", [
    ("hf://org/repo", ("dataset", "org/repo", "", "")),
    ("hf://org/repo/a/b@v1.0", ("dataset", "org/repo", "a/b", "v1.0")),
    ("hf://org/repo@refs%2Fpr%2F3/a", ("dataset", "org/repo", "a", "refs/pr/3")),
    ("hf://datasets/org/repo.x_y-z/", ("dataset", "org/repo.x_y-z", "", "")),
    ("hf://models/org/repo@abc", ("model", "org/repo", "", "abc")),
])
def test_url_spellings(url, parsed):
    loc = parse_hub_url(url)
    assert (loc.repo_type, loc.repo_id, loc.path, loc.revision) == parsed


@pytest.mark.parametrize("url, message", [
    ("hf://", "name the repo as ORG/REPO"),
    ("hf://onlyorg", "name the repo as ORG/REPO"),
    ("hf://datasets/org", "name the repo as ORG/REPO"),
    ("hf://org/repo/../x", "'..'"),
    ("hf://org/repo/a//b", "empty parts"),
    ("hf://org/re po", "not a valid Hub name"),
    ("hf://org/repo@", "empty revision"),
    ("hf://org/repo@a/b@c", "more than one '@'"),
    ("hf://spaces/org/app", "spaces hold no token shards"),
])
def test_bad_urls_are_refused_before_any_request(url, message):
    with pytest.raises(StorageError, match=re.escape(message)):
        open_store(url)


# ---------------------------------------------------------------- launch


def test_launch_dry_run_carries_the_url_and_the_token_as_a_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    args = ["launch", "gpt2-tiny", "--infra", "local", "--gpus", "CPU:2", "--data", "hf://org/shards/tiny@main",
            "--bucket", (tmp_path / "bucket").as_uri(), "--name", "hub1", "--dry-run"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert TOKEN not in r.output
    cfg = yaml.safe_load(r.stdout)
    assert cfg["envs"]["GPT2CLOUD_DATA_URL"] == "hf://org/shards/tiny@main"
    assert cfg["envs"]["HF_ENDPOINT"] == "http://127.0.0.1:9" and "HF_TOKEN" not in cfg["envs"]
    assert cfg["secrets"] == {"HF_TOKEN": None}
    p = plan("gpt2-tiny", "CPU:2", infra="local", data="hf://org/shards/tiny", bucket=(tmp_path / "b").as_uri())
    assert p.secrets == {"HF_TOKEN": TOKEN}
    monkeypatch.delenv("HF_TOKEN")
    p = plan("gpt2-tiny", "CPU:2", infra="local", data="hf://org/shards/tiny", bucket=(tmp_path / "b").as_uri())
    assert p.secrets == {} and "secrets" not in p.task_cfg


@pytest.mark.parametrize("kw, message", [
    (dict(data="hf://org"), "--data hf://org: name the repo as ORG/REPO"),
    (dict(data="hf://org/repo/../x"), "'..'"),
    (dict(bucket="hf://org/runs"), "--bucket hf://org/runs: the Hub is read-only here"),
    (dict(data="hf://org/repo", infra="lambda", gpus="H100:1"), "HF_ENDPOINT http://127.0.0.1:9 is on this machine"),
])
def test_launch_refuses_bad_hub_urls(tmp_path, monkeypatch, kw, message):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    args = dict(recipe="gpt2-tiny", gpus="CPU:2", infra="local", data="hf://org/repo",
                bucket=(tmp_path / "b").as_uri())
    with pytest.raises(UserError, match=re.escape(message)):
        plan(**{**args, **kw})


def test_launch_pins_the_hub_data_to_the_commit_it_checked(hub, tmp_path, monkeypatch):
    """The launch's preflight reads the listing once and hands the node that commit: a push to the repo
    mid-run cannot give a recovered node other bytes."""
    from gpt2cloud.launch import start

    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path / "g2"))
    p = plan("gpt2-tiny", "CPU:2", infra="local", data="hf://org/shards/tiny", bucket=(tmp_path / "b").as_uri(),
             name="pin1")
    first = hub.repos[SHARDS]["commits"][0][0]
    pinned = start.preflight(p)
    assert pinned.spec.data_url == f"hf://org/shards/tiny@{first}"
    assert pinned.task_cfg["envs"]["GPT2CLOUD_DATA_URL"] == pinned.spec.data_url
    # start() writes this spec as the bucket's run.json, once it owns the run's record; preflight writes nothing
    assert pinned.spec.to_dict()["data_url"] == pinned.spec.data_url
    assert not (tmp_path / "b" / "pin1" / "run.json").exists()
    # a repo with no shards there: one line about the Hub, not advice to upload to S3
    p = plan("gpt2-tiny", "CPU:2", infra="local", data="hf://org/docs", bucket=(tmp_path / "b").as_uri(), name="pin2")
    with pytest.raises(UserError) as e:
        start.preflight(p)
    assert "hf://org/docs" in str(e.value) and "\n" not in str(e.value)
