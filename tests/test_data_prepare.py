"""gpt2cloud.data.prepare: llm.c shards from local text, identical for any worker count and after a resume."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

import gpt2cloud.data.prepare
from gpt2cloud.errors import UserError
from gpt2cloud.store.base import TMP_MARK
from gpt2cloud.data.prepare import STATE, prepare
from model.shards import read_header, read_shard
from model.tokenizer import EOT_TOKEN, decode, encode

WORDS = ("the model reads tokens and learns to predict the next one; Ünïcode ✓ costs € while "
         "numbers like 1337 and 3.14 split oddly, newlines\nand  double  spaces too").split(" ")


def make_docs(n, seed=0):
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 120))) for _ in range(n)]
    docs[3] = ""  # an empty document contributes no tokens (not even <|endoftext|>)
    return docs


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def shard_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.bin"))}


def all_tokens(out):
    names = sorted(p.name for p in out.glob("*.bin"))
    names = [n for n in names if "_val_" in n] + [n for n in names if "_train_" in n]
    return np.concatenate([read_shard(out / n) for n in names])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    docs = make_docs(300)
    return docs, write_jsonl(tmp_path_factory.mktemp("src") / "corpus.jsonl", docs)


KW = dict(shard_tokens=1500, val_tokens=1000, chunk_bytes=2000, progress=False)


def interrupt_after(n_shards, src, out, workers):
    """Run prepare and stop it (as Ctrl-C would) once n_shards shards are finished."""
    def crash(shards):
        if len(shards) == n_shards:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare(str(src), out, workers=workers, on_shard=crash, **KW)


def test_jsonl_to_valid_shards(corpus, tmp_path):
    docs, src = corpus
    r = prepare(str(src), tmp_path / "out", workers=1, **KW)
    out = tmp_path / "out"
    expected = [t for d in docs if d for t in [EOT_TOKEN, *encode(d)]]
    tokens = all_tokens(out)
    assert tokens.tolist() == expected
    assert r["tokens"] == len(expected) and r["documents"] == len(docs) and r["val_tokens"] == 1000

    manifest = json.loads((out / "manifest.json").read_text())
    names = [s["name"] for s in manifest["shards"]]
    assert names[0] == "corpus_val_000000.bin" and names[1] == "corpus_train_000001.bin"
    assert all(read_header(out / n) == s["tokens"] for n, s in zip(names, manifest["shards"]))
    assert [s["tokens"] for s in manifest["shards"][1:-1]] == [1500] * (len(names) - 2)
    assert manifest["files"] == [{"name": s["name"], "size": s["size"], "sha256": s["sha256"]}
                                 for s in manifest["shards"]]
    assert manifest["tokenizer"]["ranks_sha256"].startswith("306cd27f")
    assert manifest["parameters"]["shard_tokens"] == 1500 and manifest["source"]["spec"] == str(src)
    assert not (out / STATE).exists()
    # Documents come back out of the stream: split at <|endoftext|>.
    text_docs = decode(tokens).split("<|endoftext|>")[1:]
    assert text_docs == [d for d in docs if d]


def test_workers_do_not_change_the_bytes(corpus, tmp_path):
    _, src = corpus
    prepare(str(src), tmp_path / "w1", workers=1, **KW)
    r = prepare(str(src), tmp_path / "w2", workers=2, **KW)
    assert r["workers"] == 2
    assert shard_bytes(tmp_path / "w1") == shard_bytes(tmp_path / "w2")


def test_resume_after_interruption_is_byte_identical(corpus, tmp_path):
    _, src = corpus
    prepare(str(src), tmp_path / "clean", workers=1, **KW)
    out = tmp_path / "resumed"
    interrupt_after(3, src, out, workers=2)
    assert len(list(out.glob("*.bin"))) == 3 and not (out / "manifest.json").exists()
    half = out / f".corpus_train_000003.bin{TMP_MARK}123-abcd"  # a write killed midway (store.atomic_write's name)
    half.write_bytes(b"half a shard")
    r = prepare(str(src), out, workers=2, **KW)
    assert r["resumed_shards"] == 3
    assert shard_bytes(out) == shard_bytes(tmp_path / "clean")
    assert not half.exists() and not [p for p in out.iterdir() if TMP_MARK in p.name]
    clean = json.loads((tmp_path / "clean" / "manifest.json").read_text())
    resumed = json.loads((out / "manifest.json").read_text())
    for key in ("shards", "files", "tokens", "documents", "text_bytes", "fingerprint"):
        assert resumed[key] == clean[key], key

    again = prepare(str(src), out, workers=2, **KW)
    assert again["already_complete"]
    with pytest.raises(UserError, match="already holds shards prepared from another source or with other"):
        prepare(str(src), out, workers=1, **{**KW, "shard_tokens": 999})


def test_resume_rewrites_a_corrupt_finished_shard(corpus, tmp_path, monkeypatch):
    _, src = corpus
    out = tmp_path / "out"
    interrupt_after(4, src, out, workers=1)
    good = shard_bytes(out)
    victim = out / "corpus_train_000002.bin"
    victim.write_bytes(victim.read_bytes()[:-2])
    tokenized = []
    real = gpt2cloud.data.prepare.tokenize_chunk
    monkeypatch.setattr(gpt2cloud.data.prepare, "tokenize_chunk", lambda texts: (tokenized.extend(texts), real(texts))[1])
    r = prepare(str(src), out, workers=1, **KW)
    assert r["resumed_shards"] == 2  # shards after the bad one are redone too
    assert 0 < len(tokenized) <= len(corpus[0]) - 20  # documents of the kept shards are skipped, not re-tokenized
    assert {k: v for k, v in shard_bytes(out).items() if k in good} == good


def test_limit_tokens_and_txt_directory(tmp_path):
    src = tmp_path / "texts"
    (src / "sub").mkdir(parents=True)
    docs = make_docs(20, seed=1)
    for i, d in enumerate(docs):
        (src / ("sub" if i % 2 else "") / f"doc{i:02d}.txt").write_text(d, encoding="utf-8")
    (src / "notes.md").write_text("ignored: not a supported extension")
    r = prepare(str(src), tmp_path / "out", workers=1, shard_tokens=100, val_tokens=50, limit_tokens=777,
                progress=False)
    assert r["tokens"] == 777 and r["name"] == "texts"
    tokens = all_tokens(tmp_path / "out")
    assert len(tokens) == 777 and tokens[0] == EOT_TOKEN


def test_parquet_source(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    docs = make_docs(50, seed=2)
    pq.write_table(pa.table({"text": docs, "id": list(range(50))}), tmp_path / "part-0.parquet", row_group_size=7)
    prepare(str(tmp_path / "part-0.parquet"), tmp_path / "out", workers=1, val_tokens=100, progress=False)
    assert all_tokens(tmp_path / "out").tolist() == [t for d in docs if d for t in [EOT_TOKEN, *encode(d)]]


@pytest.mark.parametrize("setup, match", [
    (lambda p: p.mkdir(), "no .txt, .jsonl or .parquet files in this directory"),
    (lambda p: p.write_text(""), "no text to tokenize"),
    (lambda p: p.write_text('{"text": ""}\n\n{"text": ""}\n'), "no text to tokenize"),
    (lambda p: p.write_text('{"text": "ok"}\n{"body": "x"}\n'), r":2: not a JSON object with a 'text' field"),
    (lambda p: p.write_text('{"text": "ok"}\nnot json\n'), r":2: not a JSON object"),
    (lambda p: p.write_text('{"text": 5}\n'), "'text' is int, expected a string"),
])
def test_bad_sources(tmp_path, setup, match):
    src = tmp_path / "src.jsonl"
    setup(src)
    with pytest.raises(UserError, match=match):
        prepare(str(src), tmp_path / "out", workers=1, progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_unreadable_and_unknown_sources(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8 text"):
        prepare(str(bad), tmp_path / "o1", workers=1, progress=False)
    if __import__("importlib").util.find_spec("pyarrow"):
        (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
        with pytest.raises(UserError, match="broken.parquet: unreadable parquet file"):
            prepare(str(tmp_path / "broken.parquet"), tmp_path / "o4", workers=1, progress=False)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(UserError, match="unsupported file type '.csv'"):
        prepare(str(tmp_path / "x.csv"), tmp_path / "o2", progress=False)
    with pytest.raises(UserError, match="no such file or directory"):
        prepare(str(tmp_path / "missing.jsonl"), tmp_path / "o3", progress=False)


def test_val_split_taking_everything_is_an_error(corpus, tmp_path):
    _, src = corpus
    with pytest.raises(UserError, match="all of them taken by --val-tokens.*smaller --val-tokens"):
        prepare(str(src), tmp_path / "out", workers=1, val_tokens=10_000_000, progress=False)
    assert not list((tmp_path / "out").glob("*.bin"))  # nothing half-written under a final name
    r = prepare(str(src), tmp_path / "out", workers=1, val_tokens=500, progress=False)  # the fix works
    assert r["train_tokens"] > 0


def test_hugging_face_source_without_datasets(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails, installed or not
    with pytest.raises(UserError, match="needs the `datasets` package"):
        prepare("HuggingFaceFW/fineweb-edu:sample-10BT", tmp_path / "out", progress=False)


def test_bad_record_found_by_a_worker_process_names_file_and_line(tmp_path):
    docs = make_docs(400)
    src = write_jsonl(tmp_path / "src.jsonl", docs)
    with open(src, "a") as f:
        f.write('{"no_text": 1}\n')
    with pytest.raises(UserError, match=r"src\.jsonl:401: not a JSON object with a 'text' field"):
        prepare(str(src), tmp_path / "out", workers=2, chunk_bytes=2000, progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_tokenizer_needs_no_cache_and_writes_none(tmp_path):
    """The bundled GPT-2 ranks are parsed in place: no download, and nothing written to tiktoken's cache
    (an unwritable TIKTOKEN_CACHE_DIR, or one that does not exist, is neither created nor a problem)."""
    cache = tmp_path / "no" / "such" / "dir"
    code = ("from model.tokenizer import encode\n"
            "assert encode('Hello world') == [15496, 995]\n")
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(cache), "HTTPS_PROXY": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "no").exists()


# ---------------------------------------------------------------- the pool cannot hang (issue 19)

BUSY_PARENT = r"""
import signal, sys, threading, time
from gpt2cloud.data.prepare import prepare

stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())  # a handler that only takes note, as push_loop's did
ticker = threading.Thread(target=lambda: stop.wait(600), daemon=True)  # a live thread at fork time
ticker.start()
slowest = 0.0
for i in range(6):  # the pool is torn down with idle workers blocked on its queue: 6 chances to hang
    t0 = time.monotonic()
    prepare(sys.argv[1], f"{sys.argv[2]}/{i}", shard_tokens=1500, val_tokens=1000, chunk_bytes=2000,
            workers=2, progress=False, limit_tokens=None if i % 2 else 5000)
    slowest = max(slowest, time.monotonic() - t0)
print("finished", ticker.is_alive(), slowest)
"""


def test_pool_finishes_in_a_process_with_a_sigterm_handler_and_a_live_thread(corpus, tmp_path):
    """The hang of issue 19: forked workers inherited a SIGTERM handler that only set an Event, so
    Pool.terminate()'s SIGTERM left a worker blocked on the task queue and terminate() joined it forever."""
    p = subprocess.run([sys.executable, "-c", BUSY_PARENT, str(corpus[1]), str(tmp_path)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.split()[:2] == ["finished", "True"], p.stdout + p.stderr
    # Each prepare takes ~0.2 s; close_pool's fallback (kill after 10 s) must not have been needed:
    # the workers died of terminate()'s SIGTERM.
    assert float(p.stdout.split()[2]) < 8, p.stdout
    assert shard_bytes(tmp_path / "1") == shard_bytes(tmp_path / "3")


def _ignore_sigterm():
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def test_close_pool_kills_a_worker_that_ignores_sigterm():
    """Pool.terminate() joins its workers with no time limit; close_pool bounds it: a worker deaf to
    SIGTERM, busy for a minute, is killed after the timeout and the call returns."""
    import multiprocessing as mp
    import time

    ctx = mp.get_context("fork")
    before = set(mp.active_children())
    pool = ctx.Pool(1, initializer=_ignore_sigterm)
    procs = [p for p in mp.active_children() if p not in before]
    assert len(procs) == 1
    pool.apply_async(time.sleep, (60,))
    time.sleep(0.5)  # the worker is inside the task
    t0 = time.monotonic()
    gpt2cloud.data.prepare.close_pool(pool, procs, timeout=1.0)
    assert time.monotonic() - t0 < 5
    assert not procs[0].is_alive() and procs[0].exitcode == -9  # SIGKILL: terminate alone would have waited
