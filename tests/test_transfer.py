"""upload_dir / download_dir: skip what is there, manifest last, resume, verify every sha256."""

import json
import os

import pytest

from gpt2cloud.store import StorageError, open_store
from gpt2cloud.store.transfer import build_manifest, download_dir, upload_dir, verify_dir


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        return open_store(f"file://{tmp_path}/remote")
    return open_store(f"s3://{request.getfixturevalue('s3_bucket')}/sets",
                      endpoint_url=request.getfixturevalue("s3_server"))


@pytest.fixture
def local_set(tmp_path):
    """A directory with a checkpoint-style manifest (name/size/sha256), as the trainer writes it."""
    d = tmp_path / "set"
    (d / "sub").mkdir(parents=True)
    for name, size in [("a.bin", 300_000), ("b.bin", 1000), ("sub/c.bin", 5)]:
        (d / name).write_bytes(os.urandom(size))
    manifest = {"format": "gpt2cloud-checkpoint", "step": 7, **build_manifest(d)}
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


def test_upload_skip_download(store, local_set, tmp_path):
    r = upload_dir(local_set, store, prefix="run1", progress=False)
    assert (r["uploaded"], r["skipped"], r["bytes"]) == (3, 0, 301_005) and r["manifest_uploaded"]
    again = upload_dir(local_set, store, prefix="run1", progress=False)
    assert (again["uploaded"], again["skipped"], again["bytes"], again["manifest_uploaded"]) == (0, 3, 0, False)

    dst = tmp_path / "dst"
    d = download_dir(store, "run1", dst, progress=False)
    assert (d["downloaded"], d["verified"]) == (3, 3)
    for name in ("a.bin", "b.bin", "sub/c.bin", "manifest.json"):
        assert (dst / name).read_bytes() == (local_set / name).read_bytes()
    assert download_dir(store, "run1", dst, progress=False)["downloaded"] == 0  # all verified in place
    verify_dir(dst)


def test_directory_without_manifest_gets_one(store, tmp_path):
    d = tmp_path / "plain"
    d.mkdir()
    (d / "x.txt").write_text("hello")
    upload_dir(d, store, progress=False)
    manifest = json.loads(store.get_bytes("manifest.json"))
    assert manifest["files"] == [{"name": "x.txt", "size": 5,
                                  "sha256": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}]


def test_interrupted_upload_is_finished_by_a_rerun(store, local_set):
    # A crash after some objects: they are there, the manifest is not, so no reader sees the set.
    store.put_file(local_set / "a.bin", "a.bin")
    with pytest.raises(StorageError, match="no manifest there"):
        download_dir(store, "", local_set.parent / "early", progress=False)
    r = upload_dir(local_set, store, progress=False)
    assert (r["uploaded"], r["skipped"]) == (2, 1)
    assert [o.key for o in store.list()] == ["a.bin", "b.bin", "manifest.json", "sub/c.bin"]


def test_changed_object_is_reuploaded_and_old_manifest_unpublished_first(store, local_set):
    upload_dir(local_set, store, progress=False)
    (local_set / "b.bin").write_bytes(b"new content")
    manifest = json.loads((local_set / "manifest.json").read_text())
    manifest.update(build_manifest(local_set))
    (local_set / "manifest.json").write_text(json.dumps(manifest))
    deleted = []
    real_delete = store.delete
    store.delete = lambda key: (deleted.append((key, store.exists("b.bin"))), real_delete(key))
    r = upload_dir(local_set, store, progress=False)
    assert (r["uploaded"], r["skipped"]) == (1, 2)
    assert deleted == [("manifest.json", True)]  # unpublished before b.bin was replaced
    assert json.loads(store.get_bytes("manifest.json")) == manifest


def test_local_file_changed_after_manifest_refuses_upload(store, local_set):
    (local_set / "b.bin").write_bytes(b"t" * 1000)  # same size, other content
    with pytest.raises(StorageError, match="b.bin: does not match its manifest entry"):
        upload_dir(local_set, store, progress=False)
    assert not store.exists("manifest.json")
    (local_set / "b.bin").write_bytes(b"tampered")
    with pytest.raises(StorageError, match="b.bin: missing or not the size its manifest says"):
        upload_dir(local_set, store, progress=False)


def test_corrupted_object_detected_on_download(store, local_set, tmp_path):
    upload_dir(local_set, store, progress=False)
    store.put_bytes("b.bin", os.urandom(1000))  # same size, different content (bit rot, bad actor)
    dst = tmp_path / "dst"
    with pytest.raises(StorageError, match=r"b\.bin: sha256 mismatch"):
        download_dir(store, "", dst, progress=False)
    assert not (dst / "b.bin").exists()  # never under its final name
    assert not (dst / "manifest.json").exists()  # the directory does not claim to be complete


def test_download_resumes_and_replaces_bad_local_files(store, local_set, tmp_path):
    upload_dir(local_set, store, progress=False)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "a.bin").write_bytes((local_set / "a.bin").read_bytes())  # finished before the interruption
    (dst / "b.bin").write_bytes(b"x" * 1000)  # right size, wrong content
    (dst / "sub").mkdir()
    (dst / "sub" / ".c.bin.gpt2cloud-tmp-999-dead").write_bytes(b"par")  # a killed download's partial file
    r = download_dir(store, "", dst, progress=False)
    assert (r["downloaded"], r["skipped"]) == (2, 1)
    assert (dst / "b.bin").read_bytes() == (local_set / "b.bin").read_bytes()
    assert sorted(p.name for p in (dst / "sub").iterdir()) == ["c.bin"]


def test_upload_missing_or_empty_dir(store, tmp_path):
    with pytest.raises(StorageError, match="no such directory"):
        upload_dir(tmp_path / "nope", store, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StorageError, match="nothing to upload"):
        upload_dir(tmp_path / "empty", store, progress=False)


def test_manifest_with_unsafe_names_is_rejected(store, tmp_path):
    store.put_bytes("manifest.json", json.dumps({"files": [{"name": "../../etc/x", "size": 1,
                                                            "sha256": "0" * 64}]}).encode())
    with pytest.raises(StorageError, match="invalid manifest"):
        download_dir(store, "", tmp_path / "dst", progress=False)


def test_rerun_aborts_a_killed_runs_multipart_uploads(s3_server, s3_bucket, local_set):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_multipart_upload(Bucket=s3_bucket, Key="sets/a.bin")  # as a kill -9 mid-upload leaves it
    upload_dir(local_set, open_store(f"s3://{s3_bucket}/sets", endpoint_url=s3_server), progress=False)
    assert not s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")


def test_sigkill_mid_multipart_upload_then_rerun_sends_only_what_was_incomplete(s3_server, s3_bucket, tmp_path,
                                                                                 monkeypatch):
    """A real upload to the local S3 server, SIGKILLed while a file over the multipart threshold is half
    sent (the server holds its second part until the uploader is dead). The rerun aborts the dead upload
    and sends that file again, and only it: the server receives its bytes and no others (the manifest aside)."""
    import subprocess
    import sys
    import threading
    import time
    from pathlib import Path

    import boto3
    from moto.s3.models import S3Backend

    from gpt2cloud.store.s3 import MULTIPART_THRESHOLD

    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "model.safetensors").write_bytes(os.urandom(MULTIPART_THRESHOLD + 4096))  # 2 parts
    (src / "optimizer.pt").write_bytes(os.urandom(200_000))
    (src / "trainer_state.json").write_text('{"step": 10}')
    (src / "manifest.json").write_text(json.dumps({"format": "gpt2cloud-checkpoint", **build_manifest(src)}))
    big = (src / "model.safetensors").stat().st_size

    part_one_stored, release = threading.Event(), threading.Event()
    killed_upload, received = [], []  # the dead upload's id; (kind, key or upload id, bytes) the server took
    real_upload_part, real_put_object = S3Backend.upload_part, S3Backend.put_object

    def upload_part(self, bucket_name, multipart_id, part_id, value):
        if bucket_name == s3_bucket and not killed_upload:  # the first uploader: hold part 2 until it is dead
            if part_id > 1:
                release.wait(60)
            result = real_upload_part(self, bucket_name, multipart_id, part_id, value)
            if part_id == 1:
                part_one_stored.set()
            return result
        if bucket_name == s3_bucket and multipart_id not in killed_upload:
            received.append(("part", multipart_id, len(value)))
        return real_upload_part(self, bucket_name, multipart_id, part_id, value)

    def put_object(self, bucket_name, key_name, value, *args, **kwargs):
        if bucket_name == s3_bucket and kwargs.get("multipart") is None:
            received.append(("object", key_name, len(value)))
        return real_put_object(self, bucket_name, key_name, value, *args, **kwargs)

    monkeypatch.setattr(S3Backend, "upload_part", upload_part)
    monkeypatch.setattr(S3Backend, "put_object", put_object)
    s3 = boto3.client("s3", endpoint_url=s3_server)
    code = ("import sys\nfrom gpt2cloud.store import open_store\nfrom gpt2cloud.store.transfer import upload_dir\n"
            "upload_dir(sys.argv[1], open_store(sys.argv[2], endpoint_url=sys.argv[3]), progress=False)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(src), f"s3://{s3_bucket}/run/ckpt", s3_server],
                            cwd=Path(__file__).resolve().parents[1], stderr=subprocess.PIPE, text=True)
    try:
        small = {"run/ckpt/optimizer.pt", "run/ckpt/trainer_state.json"}
        deadline = time.monotonic() + 60
        while not (part_one_stored.is_set() and small <= _keys(s3, s3_bucket)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "stuck"
            time.sleep(0.02)
        proc.kill()  # SIGKILL, mid multipart upload
        assert proc.wait(timeout=30) == -9
    finally:
        proc.kill()
        proc.wait()
        release.set()
    uploads = s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
    assert [u["Key"] for u in uploads] == ["run/ckpt/model.safetensors"]
    killed_upload.append(uploads[0]["UploadId"])
    assert _keys(s3, s3_bucket) == small  # no manifest: nobody sees the set yet

    received.clear()
    store = open_store(f"s3://{s3_bucket}/run/ckpt", endpoint_url=s3_server)
    r = upload_dir(src, store, progress=False)
    assert (r["uploaded"], r["skipped"], r["bytes"]) == (1, 2, big) and r["manifest_uploaded"]
    data = [(kind, n) for kind, key, n in received if key != "run/ckpt/manifest.json"]
    assert sum(n for _, n in data) == big and {kind for kind, _ in data} == {"part"}  # model.safetensors alone
    assert not s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")  # the dead upload was aborted
    assert _keys(s3, s3_bucket) == small | {"run/ckpt/model.safetensors", "run/ckpt/manifest.json"}
    d = download_dir(store, "", tmp_path / "back", progress=False)
    assert d["verified"] == 3 and (tmp_path / "back" / "model.safetensors").read_bytes() == \
        (src / "model.safetensors").read_bytes()


def _keys(s3, bucket) -> set[str]:
    return {o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}
