"""`gpt2cloud data ...` as a user runs it, against the local S3 server: prepare -> upload -> download."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
from typer.testing import CliRunner

from gpt2cloud.cli import app
from model.shards import read_shard
from model.tokenizer import EOT_TOKEN, decode

EXE = shutil.which("gpt2cloud") or str(Path(sys.executable).parent / "gpt2cloud")
DOCS = [
    "Hello, I'm a language model, and this is the first document of the corpus.",
    "GPT-2 was trained on WebText. Ünïcode survives the round trip: café, naïve, 日本語, €5 ✓",
    "A third document,\nwith a newline and  two spaces.",
] * 20


def cli(*args):
    res = CliRunner().invoke(app, list(args))
    return res.exit_code, res.stdout, res.stderr


def test_prepare_upload_download_decode(s3_server, s3_bucket, tmp_path):
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    code, out, err = cli("data", "prepare", str(src), "--out", str(tmp_path / "shards"),
                         "--shard-tokens", "400", "--val-tokens", "300", "--json")
    assert code == 0, err
    prepared = json.loads(out)
    assert prepared["documents"] == len(DOCS) and prepared["shards"] >= 3

    url = f"s3://{s3_bucket}/datasets/corpus"
    code, out, err = cli("data", "upload", str(tmp_path / "shards"), url, "--endpoint-url", s3_server, "--json")
    assert code == 0, err
    up = json.loads(out)
    assert (up["uploaded"], up["skipped"]) == (prepared["shards"], 0) and up["bytes"] > 0
    code, out, _ = cli("data", "upload", str(tmp_path / "shards"), url, "--endpoint-url", s3_server, "--json")
    assert (json.loads(out)["uploaded"], json.loads(out)["skipped"]) == (0, prepared["shards"])  # nothing re-sent

    code, out, err = cli("data", "download", url, str(tmp_path / "node"), "--endpoint-url", s3_server, "--json")
    assert code == 0, err
    assert json.loads(out)["verified"] == prepared["shards"]
    for p in (tmp_path / "shards").iterdir():
        assert (tmp_path / "node" / p.name).read_bytes() == p.read_bytes()

    # The second document, decoded from the downloaded val shard, is the original text.
    tokens = read_shard(tmp_path / "node" / "corpus_val_000000.bin").tolist()
    starts = [i for i, t in enumerate(tokens) if t == EOT_TOKEN]
    assert decode(tokens[starts[1] + 1:starts[2]]) == DOCS[1]


def test_missing_bucket_is_one_line_exit_2(s3_server, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f.bin").write_bytes(b"x")
    code, out, err = cli("data", "upload", str(tmp_path / "d"), "s3://not-a-bucket/x", "--endpoint-url", s3_server)
    assert code == 2
    assert err.count("\n") == 1 and "bucket 'not-a-bucket' does not exist" in err and "aws s3 mb" in err
    code, _, err = cli("data", "download", "gs://b/x", str(tmp_path / "e"))
    assert code == 2 and "unsupported URL scheme 'gs://'" in err


def test_corrupt_object_fails_download_with_exit_2(s3_server, s3_bucket, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "shard.bin").write_bytes(os.urandom(5000))
    url = f"s3://{s3_bucket}/set"
    assert cli("data", "upload", str(d), url, "--endpoint-url", s3_server)[0] == 0
    boto3.client("s3", endpoint_url=s3_server).put_object(Bucket=s3_bucket, Key="set/shard.bin",
                                                          Body=os.urandom(5000))
    code, _, err = cli("data", "download", url, str(tmp_path / "node"), "--endpoint-url", s3_server)
    assert code == 2 and "shard.bin: sha256 mismatch" in err
    assert not (tmp_path / "node" / "shard.bin").exists()


def test_upload_killed_with_sigkill_is_finished_by_a_rerun(s3_server, s3_bucket, tmp_path):
    d = tmp_path / "set"
    d.mkdir()
    (d / "a_small.bin").write_bytes(b"small")  # uploads in milliseconds, beside five big ones
    for i in range(5):
        (d / f"big{i}.bin").write_bytes(os.urandom(12 * 1024 * 1024))
    url = f"s3://{s3_bucket}/killed"
    s3 = boto3.client("s3", endpoint_url=s3_server)

    def keys():
        return {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="killed/").get("Contents", [])}

    proc = subprocess.Popen([EXE, "data", "upload", str(d), url, "--endpoint-url", s3_server, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while "killed/a_small.bin" not in keys() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert "killed/manifest.json" not in keys()  # the interrupted set is not published

    rerun = subprocess.run([EXE, "data", "upload", str(d), url, "--endpoint-url", s3_server, "--json"],
                           capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    r = json.loads(rerun.stdout)
    assert r["skipped"] >= 1 and r["uploaded"] + r["skipped"] == 6
    code, out, err = cli("data", "download", url, str(tmp_path / "node"), "--endpoint-url", s3_server, "--json")
    assert code == 0, err
    assert all((tmp_path / "node" / p.name).read_bytes() == p.read_bytes() for p in d.iterdir())
