"""Nothing you own is lost: shard sets in bucket prefixes and data directories (issue 20; docs/ownership.md).

Each row sets up what a user has (a published set, a directory of their own files, an unfinished
prepare, shards with token ids outside GPT-2's vocabulary, ...), runs one `gpt2cloud data ...` (or
`train`) command in-process as the user would, and asserts the one-line refusal (exit 2, a needle, no
traceback) and that every file under the fingerprinted roots (local directories, and the objects of
an s3:// prefix) is byte-for-byte what it was. The tests after the table check the other side: the
same command on the same set stays a no-op or a resume, and `upload --force` replaces a set cleanly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from owned_helpers import assert_refused, cli, fingerprint
from test_hub import hub  # noqa: F401  (the fake Hub fixture, reused)
from trainer_helpers import make_shards

from gpt2cloud.data.prepare import STATE, prepare
from gpt2cloud.store import StorageError, open_store
from gpt2cloud.store.layout import DOWNLOAD_MARK, UPLOAD_MARK
from gpt2cloud.store.sets import GPT2_VOCAB_SIZE, marker_bytes
from gpt2cloud.store.transfer import build_manifest, upload_dir
from model.shards import ShardError, write_shard
from model.tokenizer import VOCAB_SIZE

KW = dict(shard_tokens=1500, val_tokens=1000, chunk_bytes=4000, progress=False, workers=1)
WORDS = "the model reads tokens and learns to predict the next one while numbers like 1337 split oddly".split()


def _docs(path: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    lines = [json.dumps({"text": " ".join(rng.choice(WORDS, size=rng.integers(20, 80)))}) for _ in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Two prepared sets of other sources (a and b), an interrupted prepare of a, shards with bad ids."""
    root = tmp_path_factory.mktemp("owned-data")
    for name, seed in (("a", 0), ("b", 1)):
        prepare(str(_docs(root / f"{name}.jsonl", 120, seed)), root / f"set_{name}", **KW)

    def crash(shards):
        if len(shards) == 2:
            raise KeyboardInterrupt  # as Ctrl-C after two shards

    with pytest.raises(KeyboardInterrupt):
        prepare(str(root / "a.jsonl"), root / "unfinished", on_shard=crash, **KW)
    for top in (50257, 60000):  # inside the padding (trains silently) / beyond it (IndexError)
        bad = make_shards(root / f"bad_{top}")
        tokens = np.arange(3000) % 256
        tokens[1234] = top
        write_shard(bad / "tiny_train_000002.bin", tokens)
    return root


@dataclass
class World:
    tmp: Path
    src: Path
    request: object
    s3_urls: list = field(default_factory=list)

    def copy(self, name: str, to: str | None = None) -> Path:
        dest = self.tmp / (to or name)
        shutil.copytree(self.src / name, dest)
        return dest

    def bucket(self, name: str = "bucket") -> str:
        return (self.tmp / name).as_uri()

    def s3(self, prefix: str = "sets/x") -> list[str]:
        """URL and --endpoint-url args of a fresh S3 prefix (a real local S3 server)."""
        endpoint = self.request.getfixturevalue("s3_server")
        url = f"s3://{self.request.getfixturevalue('s3_bucket')}/{prefix}"
        self.s3_urls.append((url, endpoint))
        return [url, "--endpoint-url", endpoint]

    def publish(self, name: str, url: str, endpoint: str | None = None) -> None:
        store = open_store(url, endpoint_url=endpoint)
        upload_dir(self.src / name, store, progress=False)


def remote_print(url: str, endpoint: str) -> dict:
    store = open_store(url, endpoint_url=endpoint if url.startswith("s3://") else None)
    return {f"{url}/{o.key}": hashlib.sha256(store.get_bytes(o.key)).hexdigest() for o in store.list("")}


# ---------------------------------------------------------------- rows: (args, fingerprinted roots, needle)


def upload_other_set_file(w):
    w.publish("set_a", w.bucket())
    return ["data", "upload", w.copy("set_b"), w.bucket()], [w.tmp], "another prefix, or add --force"


def upload_other_set_s3(w):
    url = w.s3()
    w.publish("set_a", url[0], url[2])
    return ["data", "upload", w.copy("set_b"), *url], [w.tmp], "already holds a published set"


def upload_foreign_files(w):
    (w.tmp / "bucket").mkdir()
    (w.tmp / "bucket" / "notes.txt").write_text("mine")
    return ["data", "upload", w.copy("set_a"), w.bucket()], [w.tmp], "no manifest names"


def upload_foreign_files_s3(w):
    url = w.s3()
    open_store(url[0], endpoint_url=url[2]).put_bytes("theirs.bin", b"not ours")
    return ["data", "upload", w.copy("set_a"), *url], [w.tmp], "no manifest names"


def upload_foreign_beside_own_set(w):
    w.publish("set_a", w.bucket())
    (w.tmp / "bucket" / "extra.bin").write_bytes(b"someone's")
    return ["data", "upload", w.copy("set_a"), w.bucket()], [w.tmp], "extra.bin"


def upload_force_never_touches_foreign(w):
    w.publish("set_a", w.bucket())
    (w.tmp / "bucket" / "extra.bin").write_bytes(b"someone's")
    return ["data", "upload", w.copy("set_b"), w.bucket(), "--force"], [w.tmp], "remove them yourself"


def upload_unfinished_prepare(w):
    return ["data", "upload", w.copy("unfinished"), w.bucket()], [w.tmp], "rerun the same `gpt2cloud data prepare`"


def upload_missing_shard(w):
    d = w.copy("set_a")
    next(d.glob("*_train_000002.bin")).unlink()
    return ["data", "upload", d, w.bucket()], [w.tmp], "incomplete set"


def upload_altered_shard(w):
    d = w.copy("set_a")
    p = next(d.glob("*_train_000001.bin"))
    data = bytearray(p.read_bytes())
    data[-1] ^= 1
    p.write_bytes(bytes(data))
    return ["data", "upload", d, w.bucket()], [w.tmp], "does not match its manifest"


def upload_truncated_shard(w):
    d = w.copy("set_a")
    p = next(d.glob("*_train_000001.bin"))
    p.write_bytes(p.read_bytes()[:2000])
    return ["data", "upload", d, w.bucket()], [w.tmp], "not the size its manifest says"


def upload_broken_local_manifest(w):
    d = w.copy("set_a")
    (d / "manifest.json").write_text("{not json")
    return ["data", "upload", d, w.bucket()], [w.tmp], "not a valid manifest"


def upload_broken_remote_manifest(w):
    (w.tmp / "bucket").mkdir()
    (w.tmp / "bucket" / "manifest.json").write_text('{"files": "theirs"}')
    return ["data", "upload", w.copy("set_a"), w.bucket()], [w.tmp], "not a gpt2cloud manifest"


def upload_over_unfinished_other_upload(w):
    (w.tmp / "bucket").mkdir()
    files = json.loads((w.src / "set_b" / "manifest.json").read_text())["files"]
    (w.tmp / "bucket" / UPLOAD_MARK).write_bytes(marker_bytes(files[:1]))
    shutil.copy(w.src / "set_b" / files[0]["name"], w.tmp / "bucket")
    return ["data", "upload", w.copy("set_a"), w.bucket()], [w.tmp], "unfinished upload"


def upload_empty_dir(w):
    (w.tmp / "empty").mkdir()
    return ["data", "upload", w.tmp / "empty", w.bucket()], [w.tmp], "nothing to upload"


def upload_to_relative_file_url(w):
    return ["data", "upload", w.copy("set_a"), "file://relbkt/x"], [w.tmp], "file:///abs/path"


def upload_to_the_hub(w):
    return ["data", "upload", w.copy("set_a"), "hf://org/shards"], [w.tmp], "hf:// is read-only"


def download_into_other_set(w):
    w.publish("set_a", w.bucket())
    return ["data", "download", w.bucket(), w.copy("set_b")], [w.tmp], "already holds another shard set"


def download_s3_into_other_set(w):
    url = w.s3()
    w.publish("set_a", url[0], url[2])
    return ["data", "download", url[0], w.copy("set_b"), *url[1:]], [w.tmp], "another shard set"


def download_into_shards_of_no_set(w):
    w.publish("set_a", w.bucket())
    make_shards(w.tmp / "mine")
    return ["data", "download", w.bucket(), w.tmp / "mine"], [w.tmp], "of no set"


def download_into_same_names_other_bytes(w):
    w.publish("set_a", w.bucket())
    d = w.tmp / "mine"
    d.mkdir()
    first = json.loads((w.src / "set_a" / "manifest.json").read_text())["files"][0]["name"]
    (d / first).write_bytes(b"my own shard, same name")
    return ["data", "download", w.bucket(), d], [w.tmp], first


def download_into_unfinished_prepare(w):
    w.publish("set_a", w.bucket())
    return ["data", "download", w.bucket(), w.copy("unfinished")], [w.tmp], "unfinished `data prepare`"


def download_into_broken_manifest(w):
    w.publish("set_a", w.bucket())
    (w.tmp / "d").mkdir()
    (w.tmp / "d" / "manifest.json").write_text("[]")
    return ["data", "download", w.bucket(), w.tmp / "d"], [w.tmp], "not a gpt2cloud manifest"


def download_into_other_unfinished_download(w):
    w.publish("set_a", w.bucket())
    (w.tmp / "d").mkdir()
    files = json.loads((w.src / "set_b" / "manifest.json").read_text())["files"]
    (w.tmp / "d" / DOWNLOAD_MARK).write_bytes(marker_bytes(files))
    return ["data", "download", w.bucket(), w.tmp / "d"], [w.tmp], "unfinished download of another set"


def download_over_a_symlink(w):
    w.publish("set_a", w.bucket())
    (w.tmp / "d").mkdir()
    (w.tmp / "precious.bin").write_bytes(b"the user's own file")
    first = json.loads((w.src / "set_a" / "manifest.json").read_text())["files"][0]["name"]
    (w.tmp / "d" / first).symlink_to(w.tmp / "precious.bin")
    return ["data", "download", w.bucket(), w.tmp / "d"], [w.tmp], "of no set"


def download_into_a_subfolder_of_mine(w):
    w.publish("set_a", w.bucket())
    (w.tmp / "d" / "notes").mkdir(parents=True)
    (w.tmp / "d" / "notes" / "todo.txt").write_text("mine")
    return ["data", "download", w.bucket(), w.tmp / "d"], [w.tmp], "notes/todo.txt"


def download_into_a_file(w):
    w.publish("set_a", w.bucket())
    (w.tmp / "a_file").write_text("not a directory")
    return ["data", "download", w.bucket(), w.tmp / "a_file"], [w.tmp], "is a file"


def download_into_read_only_dir(w):
    w.publish("set_a", w.bucket())
    d = w.tmp / "ro"
    d.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: what the permission check sees is what a user sees
        real = os.access
        mp = w.request.getfixturevalue("monkeypatch")
        mp.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == d else real(p, mode, **kw))
    else:
        d.chmod(0o555)
        w.request.addfinalizer(lambda: d.chmod(0o755))
    return ["data", "download", w.bucket(), d], [w.tmp], "not writable"


def download_truncated_after_publishing(w):
    w.publish("set_a", w.bucket())
    p = next((w.tmp / "bucket").glob("*_train_000001.bin"))
    p.write_bytes(p.read_bytes()[:-2])
    return ["data", "download", w.bucket(), w.tmp / "d"], [w.tmp / "bucket", w.src], "sha256"


def download_bad_token_ids(w):
    w.publish("bad_50257", w.bucket())
    return ["data", "download", w.bucket(), w.tmp / "d"], [w.tmp / "bucket"], "token id 50257"


def download_bad_token_ids_s3(w):
    url = w.s3()
    w.publish("bad_60000", url[0], url[2])
    return ["data", "download", url[0], w.tmp / "d", *url[1:]], [w.tmp / "bucket"], "token id 60000"


def download_bad_token_ids_hub(w):
    server = w.request.getfixturevalue("hub")
    server.push("org/bad", {f"x/{p.name}": p.read_bytes() for p in sorted((w.src / "bad_60000").glob("*.bin"))})
    return ["data", "download", "hf://org/bad/x", w.tmp / "d"], [w.src], "token id 60000"


def download_from_relative_file_url(w):
    return ["data", "download", "file://relbkt/x", w.tmp / "d"], [w.tmp], "needs an absolute path"


def download_nothing_published(w):
    (w.tmp / "bucket").mkdir()
    (w.tmp / "bucket" / "a.bin").write_bytes(b"x")
    return ["data", "download", w.bucket(), w.tmp / "d"], [w.tmp], "no manifest there"


def train_on_bad_token_ids(w):
    d = w.copy("bad_50257")
    return ["train", "gpt2-tiny", "--data", d, "--out", w.tmp / "out"], [w.tmp], "token id 50257"


def prepare_parquet_int_text(w):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2, 3]}), w.tmp / "ints.parquet")
    return ["data", "prepare", w.tmp / "ints.parquet", "--out", w.tmp / "out"], [w.tmp], "holds int64"


def prepare_out_is_a_file(w):
    (w.tmp / "out").write_text("a file")
    return ["data", "prepare", w.src / "a.jsonl", "--out", w.tmp / "out"], [w.tmp], "is a file"


def prepare_out_holds_my_files(w):
    make_shards(w.tmp / "out")
    return ["data", "prepare", w.src / "a.jsonl", "--out", w.tmp / "out"], [w.tmp], "did not write"


def prepare_out_holds_another_set(w):
    return ["data", "prepare", w.src / "a.jsonl", "--out", w.copy("set_b")], [w.tmp], "another source"


ROWS = [upload_other_set_file, upload_other_set_s3, upload_foreign_files, upload_foreign_files_s3,
        upload_foreign_beside_own_set, upload_force_never_touches_foreign, upload_unfinished_prepare,
        upload_missing_shard, upload_altered_shard, upload_truncated_shard, upload_broken_local_manifest,
        upload_broken_remote_manifest, upload_over_unfinished_other_upload, upload_empty_dir,
        upload_to_relative_file_url, upload_to_the_hub,
        download_into_other_set, download_s3_into_other_set, download_into_shards_of_no_set,
        download_into_same_names_other_bytes, download_into_unfinished_prepare, download_into_broken_manifest,
        download_into_other_unfinished_download, download_over_a_symlink, download_into_a_subfolder_of_mine,
        download_into_a_file, download_into_read_only_dir, download_truncated_after_publishing,
        download_bad_token_ids, download_bad_token_ids_s3, download_bad_token_ids_hub,
        download_from_relative_file_url, download_nothing_published, train_on_bad_token_ids,
        prepare_parquet_int_text, prepare_out_is_a_file, prepare_out_holds_my_files, prepare_out_holds_another_set]


@pytest.fixture
def world(prepared, tmp_path, request):
    return World(tmp_path / "w", prepared, request)


def _print(w: World, roots) -> dict:
    out = fingerprint(*roots)
    for url, endpoint in w.s3_urls:
        out.update(remote_print(url, endpoint))
    return out


@pytest.mark.parametrize("row", ROWS, ids=[r.__name__ for r in ROWS])
def test_refused_and_nothing_of_yours_changes(world, row):
    world.tmp.mkdir()
    args, roots, needle = row(world)
    before = _print(world, roots)
    result = cli(args)
    assert_refused(result, needle, before, _print(world, roots))


# ---------------------------------------------------------------- the other side: same set, resume, --force


def _json(args) -> dict:
    r = cli([*args, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def test_reupload_and_redownload_of_the_same_set_are_no_ops(prepared, tmp_path, s3_server, s3_bucket):
    for url in ((tmp_path / "bucket").as_uri(), f"s3://{s3_bucket}/sets/a"):
        extra = ["--endpoint-url", s3_server] if url.startswith("s3://") else []
        first = _json(["data", "upload", prepared / "set_a", url, *extra])
        assert first["uploaded"] == first["files"] > 0
        before = remote_print(url, s3_server)
        again = _json(["data", "upload", prepared / "set_a", url, *extra])
        assert again["uploaded"] == 0 and not again["manifest_uploaded"]
        assert remote_print(url, s3_server) == before and not any(UPLOAD_MARK in k for k in before)
        dest = tmp_path / f"dl-{url[:2]}"
        assert _json(["data", "download", url, dest, *extra])["downloaded"] == first["files"]
        kept = fingerprint(dest)
        assert _json(["data", "download", url, dest, *extra])["downloaded"] == 0
        assert fingerprint(dest) == kept and not (dest / DOWNLOAD_MARK).exists()
    # the directory prepare wrote is that same set: downloading it there is a no-op too
    shutil.copytree(prepared / "set_a", tmp_path / "own")
    assert _json(["data", "download", (tmp_path / "bucket").as_uri(), tmp_path / "own"])["downloaded"] == 0


def test_force_replaces_a_published_set_without_mixing(prepared, tmp_path, s3_server, s3_bucket):
    for url in ((tmp_path / "bucket").as_uri(), f"s3://{s3_bucket}/sets/a"):
        extra = ["--endpoint-url", s3_server] if url.startswith("s3://") else []
        _json(["data", "upload", prepared / "set_a", url, *extra])
        r = _json(["data", "upload", prepared / "set_b", url, "--force", *extra])
        assert r["manifest_uploaded"]
        names = {k.rsplit("/", 1)[1] for k in remote_print(url, s3_server)}
        expected = {f["name"] for f in json.loads((prepared / "set_b" / "manifest.json").read_text())["files"]}
        assert names == expected | {"manifest.json"}  # nothing of set a is left beside set b
        dest = tmp_path / f"b-{url[:2]}"
        _json(["data", "download", url, dest, *extra])
        assert all((dest / n).read_bytes() == (prepared / "set_b" / n).read_bytes() for n in expected)


def test_an_interrupted_upload_resumes_and_a_forced_one_too(prepared, tmp_path, monkeypatch):
    """Cut off after the first file, the rerun of the same command finishes (its marker says the files
    are ours); a cut --force replacement finishes on a rerun with --force, without a mix."""
    from gpt2cloud.store.files import FileStore

    url = (tmp_path / "bucket").as_uri()
    real = FileStore.put_file
    calls = []

    def flaky(self, *a, **kw):
        calls.append(a[1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(FileStore, "put_file", flaky)
    for src, force in (("set_a", []), ("set_b", ["--force"])):
        calls.clear()
        assert cli(["data", "upload", prepared / src, url, *force]).exit_code == 130
        assert (tmp_path / "bucket" / UPLOAD_MARK).is_file()
        _json(["data", "upload", prepared / src, url, *force])
        assert not (tmp_path / "bucket" / UPLOAD_MARK).exists()
        names = sorted(p.name for p in (tmp_path / "bucket").iterdir())
        expected = sorted([f["name"] for f in json.loads((prepared / src / "manifest.json").read_text())["files"]]
                          + ["manifest.json"])
        assert names == expected


def test_an_interrupted_download_resumes(prepared, tmp_path, monkeypatch):
    from gpt2cloud.store.files import FileStore

    url = (tmp_path / "bucket").as_uri()
    upload_dir(prepared / "set_a", open_store(url), progress=False)
    real, calls = FileStore.get_file, []

    def flaky(self, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(FileStore, "get_file", flaky)
    dest = tmp_path / "d"
    assert cli(["data", "download", url, dest]).exit_code == 130
    assert (dest / DOWNLOAD_MARK).is_file() and not (dest / "manifest.json").exists()
    r = _json(["data", "download", url, dest])
    assert r["skipped"] >= 1 and r["downloaded"] + r["skipped"] == r["files"]
    assert not (dest / DOWNLOAD_MARK).exists() and (dest / "manifest.json").is_file()


def test_a_built_manifest_never_lists_state_files(tmp_path):
    d = make_shards(tmp_path / "plain")
    for name in (STATE, UPLOAD_MARK, DOWNLOAD_MARK, ".x.bin.gpt2cloud-tmp-1-abc", "half.tmp"):
        (d / name).write_text("{}")
    (d / ".x.bin.hf-partial").mkdir()
    (d / ".x.bin.hf-partial" / "x.bin.incomplete").write_bytes(b"..")
    names = [f["name"] for f in build_manifest(d)["files"]]
    assert names == sorted(p.name for p in d.glob("tiny_*.bin"))


def test_prepare_records_the_largest_token_id(prepared):
    m = json.loads((prepared / "set_a" / "manifest.json").read_text())
    assert all(0 < s["max_token"] < VOCAB_SIZE for s in m["shards"])
    assert m["tokens"]["max_token"] == max(s["max_token"] for s in m["shards"])
    assert GPT2_VOCAB_SIZE == VOCAB_SIZE == m["tokenizer"]["vocab_size"]


def test_a_bad_shard_never_gets_its_final_name(prepared, tmp_path):
    url = (tmp_path / "bucket").as_uri()
    upload_dir(prepared / "bad_50257", open_store(url), progress=False)
    r = cli(["data", "download", url, tmp_path / "d"])
    assert r.exit_code == 2 and "50257" in r.output
    assert not (tmp_path / "d" / "tiny_train_000002.bin").exists()
    assert not (tmp_path / "d" / "manifest.json").exists()
    assert not [p for p in (tmp_path / "d").iterdir() if "gpt2cloud-tmp" in p.name]


def test_the_node_download_refuses_bad_ids(prepared, tmp_path):
    from model import datadir, sync

    url = (tmp_path / "bucket").as_uri()
    upload_dir(prepared / "bad_60000", open_store(url), progress=False)
    dest = tmp_path / "node"
    assert sync.data(url, dest) == sync.EXIT_DATA
    assert not (dest / "tiny_train_000002.bin").exists()
    status = datadir.read_status(dest)
    assert status["state"] == datadir.FAILED and "token id 60000" in status["error"]


@pytest.mark.parametrize("top", [50257, 60000])
def test_the_loader_checks_token_ids_before_any_step(prepared, top):
    from model.data import TokenLoader, find_shards

    with pytest.raises(ShardError, match=f"token id {top} .* {VOCAB_SIZE} ids"):
        find_shards(prepared / f"bad_{top}")
    # the bound is the model's vocabulary (the trainer passes cfg.model.vocab_size), not GPT-2's alone
    train, _ = find_shards(prepared / f"bad_{top}", vocab_size=top + 1)
    assert TokenLoader(train, 2, 8, 0, 1, 1).next_batch()[0].shape == (2, 8)
    with pytest.raises(ShardError, match="token id"):
        find_shards(prepared / "set_a", vocab_size=100)  # GPT-2 tokens for a 100-id model


def test_relative_file_urls_are_refused():
    for url in ("file://relbkt/x", "file:relative", "file://~/x"):
        with pytest.raises(StorageError, match="absolute path"):
            open_store(url)
    assert open_store("file://localhost/tmp/x").url == "file:///tmp/x"
