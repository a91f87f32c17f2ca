"""Shared fixtures.

`s3_server`: a real S3 endpoint over HTTP (moto's server in a thread of the test process), started
once per session, with fake AWS credentials in the environment. boto3 is not patched: code under
test talks to it exactly as to AWS, through `endpoint_url`. `s3_bucket`: a fresh, empty bucket on it.
"""

from __future__ import annotations

import os
import uuid

import pytest

FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never wait on an instance-metadata credential lookup
}


@pytest.fixture(scope="session")
def s3_server():
    """Start a local S3 server; return its endpoint URL, e.g. "http://127.0.0.1:41234"."""
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in [*FAKE_AWS_ENV, "AWS_PROFILE", "AWS_ENDPOINT_URL"]}
    os.environ.update(FAKE_AWS_ENV)
    os.environ.pop("AWS_PROFILE", None)  # a developer's profile must not leak real credentials in
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """Create a new empty bucket on the local S3 server; return its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name
