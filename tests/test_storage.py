"""gpt2cloud.store against a real local S3 server (moto over HTTP) and the file:// store."""

import os
import subprocess
import sys

import pytest
from botocore.exceptions import ClientError

from gpt2cloud.store.s3 import s3_error
from gpt2cloud.store import NoSuchObject, StorageError, open_store, sha256_file


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        return open_store(f"file://{tmp_path}/store/prefix")
    endpoint = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return open_store(f"s3://{bucket}/some/prefix", endpoint_url=endpoint)


def test_bytes_list_exists_delete(store, tmp_path):
    store.put_bytes("a.txt", b"alpha")
    store.put_bytes("dir/b.txt", b"beta!")
    assert store.get_bytes("a.txt") == b"alpha"
    assert store.exists("dir/b.txt") and not store.exists("nope")
    assert [(o.key, o.size) for o in store.list()] == [("a.txt", 5), ("dir/b.txt", 5)]
    assert [o.key for o in store.list("dir/")] == ["dir/b.txt"]
    store.delete("a.txt")
    store.delete("a.txt")  # deleting twice is fine
    assert [o.key for o in store.list()] == ["dir/b.txt"]
    with pytest.raises(NoSuchObject, match="no such object"):
        store.get_bytes("a.txt")
    with pytest.raises(NoSuchObject, match="no such object"):
        store.get_file("a.txt", tmp_path / "a.txt")


def test_files_round_trip_with_sha256(store, tmp_path):
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    seen = []
    digest = store.put_file(src, "x/big.bin", progress=seen.append)
    assert digest == sha256_file(src) and sum(seen) == src.stat().st_size
    assert store.sha256("x/big.bin") == digest  # recorded with the object (S3 metadata)
    dst = tmp_path / "out" / "big.bin"
    store.get_file("x/big.bin", dst, sha256=digest)
    assert dst.read_bytes() == src.read_bytes()
    assert not [p for p in dst.parent.iterdir() if p != dst]  # no temporary file left behind


def test_get_file_sha256_mismatch_leaves_nothing(store, tmp_path):
    store.put_bytes("f.bin", b"corrupted content")
    dst = tmp_path / "got" / "f.bin"
    with pytest.raises(StorageError, match="f.bin: sha256 mismatch"):
        store.get_file("f.bin", dst, sha256="0" * 64)
    assert not dst.parent.exists() or not list(dst.parent.iterdir())


def test_multipart_upload(s3_server, s3_bucket, tmp_path):
    src = tmp_path / "multi.bin"
    src.write_bytes(os.urandom(16 * 1024 * 1024 + 1000))  # over the 16 MiB threshold: 2 parts
    store = open_store(f"s3://{s3_bucket}", endpoint_url=s3_server)
    store.put_file(src, "multi.bin")
    head = store.client.head_object(Bucket=s3_bucket, Key="multi.bin")
    assert head["ETag"].strip('"').endswith("-2")
    dst = tmp_path / "multi.out"
    store.get_file("multi.bin", dst, sha256=sha256_file(src))
    assert dst.stat().st_size == src.stat().st_size


@pytest.mark.parametrize("url, match", [
    ("gs://bucket/x", "unsupported URL scheme 'gs://'"),
    ("my-bucket/data", "not a storage URL; use s3://"),
    ("s3://", "no bucket name"),
])
def test_bad_urls(url, match):
    with pytest.raises(StorageError, match=match):
        open_store(url)


def test_storage_errors_reach_the_user_as_one_line(tmp_path):
    """The store imports nothing else of gpt2cloud, so StorageError is not a UserError; the CLI shows it the same."""
    from typer.testing import CliRunner

    from gpt2cloud.cli import app

    r = CliRunner().invoke(app, ["data", "download", (tmp_path / "nothing").as_uri(), str(tmp_path / "d")])
    assert r.exit_code == 2 and r.output.startswith("error: ") and "no manifest there" in r.output
    assert r.output.strip().count("\n") == 0 and "Traceback" not in r.output


def test_bad_keys_rejected(tmp_path):
    store = open_store(f"file://{tmp_path}")
    for key in ("../escape", "a/../../b", ""):
        with pytest.raises(StorageError, match="invalid object key"):
            store.put_bytes(key, b"x")


def test_missing_bucket(s3_server):
    store = open_store("s3://no-such-bucket-here/data", endpoint_url=s3_server)
    for op in (lambda: store.list(), lambda: store.get_bytes("k"), lambda: store.put_bytes("k", b"x"),
               lambda: store.get_file("k", "/tmp/never-written")):
        with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist.*aws s3 mb"):
            op()


def test_unreachable_endpoint_fails_fast(s3_server):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from gpt2cloud.store import s3 as s3store

    store = open_store("s3://bucket/x", endpoint_url=f"http://127.0.0.1:{port}")
    sent = []
    store.client.meta.events.register("before-send.s3", lambda request, **_: sent.append(request.url))
    with pytest.raises(StorageError, match="cannot reach the S3 endpoint at http://127.0.0.1"):
        store.list()
    # fast by construction: a few attempts (total_max_attempts counts the first try), each with a short
    # connect timeout, so a silent endpoint costs at most ~2 x 5 s, never the SDK's default minutes
    config = store.client.meta.config
    assert len(sent) == config.retries["total_max_attempts"] == s3store.MAX_ATTEMPTS <= 3
    assert config.connect_timeout == s3store.CONNECT_TIMEOUT_S <= 5


def test_no_credentials(s3_server, s3_bucket, tmp_path):
    # moto accepts any credentials, so check that none at all is reported: a clean environment,
    # empty config files, no instance metadata. A subprocess keeps this test's env away from others.
    (tmp_path / "empty").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "empty"), AWS_CONFIG_FILE=str(tmp_path / "empty"),
               AWS_EC2_METADATA_DISABLED="true", AWS_DEFAULT_REGION="us-east-1")
    code = (f"from gpt2cloud.store import open_store, StorageError\n"
            f"try:\n    open_store('s3://{s3_bucket}', endpoint_url='{s3_server}').list()\n"
            f"except StorageError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert "no S3 credentials found; set AWS_ACCESS_KEY_ID" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("code, status, match", [
    ("AccessDenied", 403, "access denied"),
    ("InvalidAccessKeyId", 403, "credentials were rejected"),
    ("NoSuchBucket", 404, "does not exist"),
    ("SlowDown", 503, "S3 error SlowDown"),
])
def test_client_errors_become_one_line_messages(code, status, match):
    exc = ClientError({"Error": {"Code": code, "Message": "m\nmore"},
                       "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")
    msg = str(s3_error(exc, "s3://b/k", "b", None))
    assert match in msg and "\n" not in msg


def test_file_store_ignores_temporary_files(tmp_path):
    store = open_store(f"file://{tmp_path}")
    store.put_bytes("done.bin", b"x")
    (tmp_path / ".half.bin.gpt2cloud-tmp-123-abc").write_bytes(b"partial")  # a killed writer's leftovers
    assert [o.key for o in store.list()] == ["done.bin"]


def test_storage_imports_only_the_standard_library_at_top():
    # The GPU node imports these before training: no boto3 until an s3:// URL, never typer/rich/pydantic.
    code = ("import sys, gpt2cloud.store, gpt2cloud.store.s3, gpt2cloud.store.transfer\n"
            "gpt2cloud.store.open_store('file:///tmp')\n"
            "print([m for m in ('boto3', 'botocore', 'typer', 'rich', 'pydantic', 'numpy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def test_s3_clients_are_reused_per_environment(s3_server, s3_bucket, monkeypatch):
    """open_store reuses one boto3 session and client per (endpoint, region, AWS_* environment); a store
    opened after the environment changed gets a client made from the new one."""
    from gpt2cloud.store import s3 as s3store

    import boto3

    built = []
    real_client = boto3.session.Session.client

    def client(self, *args, **kwargs):  # each new client parses the S3 service model again (~0.1 s)
        built.append(kwargs.get("region_name"))
        return real_client(self, *args, **kwargs)

    monkeypatch.setattr(boto3.session.Session, "client", client)
    s3store.clear_client_cache()
    first = open_store(f"s3://{s3_bucket}/a", endpoint_url=s3_server)
    second = open_store(f"s3://{s3_bucket}/b", endpoint_url=s3_server)
    assert second.client is first.client
    for _ in range(5):
        open_store(f"s3://{s3_bucket}/c", endpoint_url=s3_server).put_bytes("x", b"1")
    assert len(built) == 1  # one client for seven stores
    assert open_store(f"s3://{s3_bucket}/d", endpoint_url=s3_server, region="eu-west-1").client is not first.client
    first.close()  # closing a store leaves the shared client usable
    assert open_store(f"s3://{s3_bucket}/c", endpoint_url=s3_server).get_bytes("x") == b"1"

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAOTHERKEY00000001")
    other = open_store(f"s3://{s3_bucket}/a", endpoint_url=s3_server)
    assert other.client is not first.client
    assert other.client._request_signer._credentials.access_key == "AKIAOTHERKEY00000001"
    assert open_store(f"s3://{s3_bucket}/b", endpoint_url=s3_server).client is other.client
    assert len(built) == 3  # and one each for the other region and the other credentials
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", first.client._request_signer._credentials.access_key)
    assert open_store(f"s3://{s3_bucket}/a", endpoint_url=s3_server).client is first.client
    assert len(built) == 3
