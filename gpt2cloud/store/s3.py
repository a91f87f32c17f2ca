"""The `s3://` store (AWS S3, Cloudflare R2, MinIO, ...) and its error messages.

open_store() imports this module for s3:// URLs only. Like the rest of the store package it imports
only the standard library at its top: boto3 is imported when an S3Store is made.
"""

from __future__ import annotations

import concurrent.futures
import glob
import hashlib
import os
import queue
import threading
from pathlib import Path

from gpt2cloud.store.base import (NoSuchObject, ObjectInfo, Progress, StorageError, Store, clean_key, join_key,
                                  sha256_file, tmp_path)


# An endpoint that is unreachable, or accepts connections and never answers, fails a command within
# MAX_ATTEMPTS x (CONNECT_TIMEOUT_S or READ_TIMEOUT_S) + botocore's backoff (< 2 s): under 30 s.
# READ_TIMEOUT_S bounds one socket wait, not a request: a 16 MiB part on a slow link is sent in small
# writes that each make progress, and S3 answers a part within a second or two of receiving it, so 10 s
# of total silence means a dead endpoint, not a slow one. A failed file is resumed by rerunning.
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 10
MAX_ATTEMPTS = 2
DOWNLOAD_ATTEMPTS = 2  # s3transfer's own retries of a download stream cut mid-way (its default is 5)
# After Ctrl-C: how long abort() lets transfers in flight wind down (they stop at their next chunk, or at
# READ_TIMEOUT_S for a request the endpoint never answers) before it returns without them.
ABORT_WAIT_S = 2.0
# Part size and parallel requests of the transfer manager (awscli's defaults are 8 MiB and 10).
MULTIPART_THRESHOLD = 16 * 1024 * 1024
MULTIPART_CHUNKSIZE = 16 * 1024 * 1024
MAX_CONCURRENCY = 10
SHA256_METADATA = "sha256"  # user metadata (x-amz-meta-sha256) that put_file records on every object


class S3Store(Store):
    """An S3 bucket and prefix through boto3; any S3-compatible endpoint (R2, MinIO, moto)."""

    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None = None, region: str | None = None):
        try:
            import boto3  # noqa: F401 - here only to say how to install it; _s3_client uses it
            from boto3.s3.transfer import TransferConfig
            from botocore.config import Config
            from s3transfer.manager import TransferManager
        except ImportError:
            raise StorageError("s3:// URLs need boto3: pip install boto3") from None
        self.bucket, self.prefix = bucket, prefix
        self.url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        config = Config(  # a function of endpoint_url alone, which is part of the client cache key
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=READ_TIMEOUT_S,
            retries={"total_max_attempts": MAX_ATTEMPTS, "mode": "standard"},  # the first try included
            max_pool_connections=MAX_CONCURRENCY + 4,
            # Custom endpoints (MinIO, moto, most self-hosted stores) expect path-style URLs.
            s3={"addressing_style": "path"} if self.endpoint_url else None,
        )
        self.client = _s3_client(self.endpoint_url, region, config)
        self._aborted = threading.Event()
        # s3transfer's classic manager, on threads that never hold the process at exit: after Ctrl-C a
        # request the endpoint does not answer must not keep the command alive (abort()).
        self._manager = TransferManager(
            self.client,
            TransferConfig(
                multipart_threshold=MULTIPART_THRESHOLD,
                multipart_chunksize=MULTIPART_CHUNKSIZE,
                max_concurrency=MAX_CONCURRENCY,
                num_download_attempts=DOWNLOAD_ATTEMPTS,
                preferred_transfer_client="classic",
            ),
            executor_cls=DaemonThreadExecutor,
        )

    def _key(self, key: str) -> str:
        return join_key(self.prefix, clean_key(key))

    def _error(self, exc: BaseException, key: str | None = None) -> StorageError:
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in ("404", "NotFound"):
            # HEAD (and so every download) answers a bare 404 for a missing bucket too: tell them apart.
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket", "NotFound"):
                    e.response["Error"]["Code"] = "NoSuchBucket"
                    exc = e
            except Exception:
                pass
        return s3_error(exc, self.url_for(key) if key else self.url, self.bucket, self.endpoint_url)

    def _submit(self, start, key: str):
        """start() a transfer on the manager, unless abort() ran (then the manager takes no more)."""
        cancelled = StorageError(f"{self.url_for(key)}: not started: the transfers were cancelled (Ctrl-C) "
                                 "or the store closed")
        if self._aborted.is_set():
            raise cancelled
        try:
            return start()
        except RuntimeError:  # abort() shut the executors down between the check and the start
            if self._aborted.is_set():
                raise cancelled from None
            raise

    def _wait(self, future, done: threading.Event, key: str):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            # not future.result() alone: a thread waiting here must return as soon as abort() runs, not
            # when the requests in flight end. `done` is set by the transfer's on_done, after its result is
            # ready (future.done() is True at cancel already, while result() still waits for the requests)
            while not done.wait(0.1):
                if self._aborted.is_set():
                    raise StorageError(f"{self.url_for(key)}: cancelled (Ctrl-C); rerun to resume")
            return future.result()
        except KeyboardInterrupt:
            self.abort()
            raise
        except (BotoCoreError, ClientError) as e:
            raise self._error(e, key) from None
        except OSError as e:  # the local side: unreadable source, unwritable destination, full disk
            raise StorageError(f"{self.url_for(key)}: local file error: {e.strerror}: {e.filename}") from None

    def put_file(self, local_path, key, progress=None, sha256=None):
        local_path = Path(local_path)
        if not local_path.is_file():
            raise StorageError(f"{local_path}: no such file")
        sha256 = sha256 or sha256_file(local_path)
        done = threading.Event()
        future = self._submit(lambda: self._manager.upload(
            str(local_path), self.bucket, self._key(key),
            extra_args={"Metadata": {SHA256_METADATA: sha256}},
            subscribers=_subscribers(progress, done),
        ), key)
        self._wait(future, done, key)
        return sha256

    def get_file(self, key, local_path, progress=None, sha256=None):
        local_path = Path(local_path)
        tmp = tmp_path(local_path)
        try:
            try:
                local_path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StorageError(f"{local_path.parent}: cannot create the directory: {e.strerror}") from None
            done = threading.Event()
            future = self._submit(lambda: self._manager.download(self.bucket, self._key(key), str(tmp),
                                                                 subscribers=_subscribers(progress, done)), key)
            self._wait(future, done, key)
            if sha256:
                digest = sha256_file(tmp)
                if digest != sha256:
                    raise StorageError(
                        f"{self.url_for(key)}: sha256 mismatch (expected {sha256[:12]}..., got {digest[:12]}...); "
                        "the stored object is corrupt or was replaced: delete it and run `gpt2cloud data upload` again"
                    )
            os.replace(tmp, local_path)
        finally:
            tmp.unlink(missing_ok=True)
            # s3transfer writes to TMP.<random> and renames it to TMP; a download cancelled (Ctrl-C) and
            # left behind by abort() may leave that file: tmp is this call's own name, so these are ours
            for partial in tmp.parent.glob(glob.escape(tmp.name) + ".*"):
                partial.unlink(missing_ok=True)

    def put_bytes(self, key, data):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data,
                Metadata={SHA256_METADATA: hashlib.sha256(data).hexdigest()},
            )
        except (BotoCoreError, ClientError) as e:
            raise self._error(e, key) from None

    def get_bytes(self, key):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except (BotoCoreError, ClientError) as e:
            raise self._error(e, key) from None

    def list(self, prefix=""):
        from botocore.exceptions import BotoCoreError, ClientError

        base = self.prefix + "/" if self.prefix else ""
        out = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base + prefix):
                for obj in page.get("Contents", []):
                    out.append(ObjectInfo(obj["Key"][len(base):], int(obj["Size"])))
        except (BotoCoreError, ClientError) as e:
            raise self._error(e) from None
        return sorted(out, key=lambda o: o.key)

    def _head(self, key) -> dict | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._error(e, key) from None
        except BotoCoreError as e:
            raise self._error(e, key) from None

    def exists(self, key):
        return self._head(key) is not None

    def delete(self, key):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except (BotoCoreError, ClientError) as e:
            raise self._error(e, key) from None

    def sha256(self, key):
        head = self._head(key)
        return (head or {}).get("Metadata", {}).get(SHA256_METADATA)

    def abort(self):
        """Cancel every transfer (a multipart upload in flight is aborted by s3transfer), wait at most
        ABORT_WAIT_S for them to wind down, and take no new ones: never a wait without a bound."""
        from s3transfer.exceptions import CancelledError

        if self._aborted.is_set():
            return
        self._aborted.set()  # before cancelling: a file started by another thread now is refused (_submit)
        controller = self._manager._coordinator_controller
        controller.cancel("KeyboardInterrupt()", CancelledError)
        waiter = threading.Thread(target=controller.wait, daemon=True)
        waiter.start()
        waiter.join(ABORT_WAIT_S)
        self._shutdown_executors()

    def _shutdown_executors(self) -> None:
        # TransferManager.shutdown() waits for every transfer it ever registered, one that a thread
        # submitted after a cancel included, which never ends: that was the hang after Ctrl-C.
        for executor in (self._manager._submission_executor, self._manager._request_executor,
                         self._manager._io_executor):
            executor.shutdown(False)

    def abort_incomplete_uploads(self, keys) -> int:
        from botocore.exceptions import BotoCoreError, ClientError

        wanted = {self._key(k) for k in keys}
        if not wanted:
            return 0
        base = self.prefix + "/" if self.prefix else ""
        aborted = 0
        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=base)
            for page in pages:
                for up in page.get("Uploads", []):
                    if up["Key"] in wanted:
                        self.client.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"])
                        aborted += 1
        except (BotoCoreError, ClientError) as e:
            raise self._error(e) from None
        return aborted

    def close(self):
        # Transfers still in flight when the store is closed belong to a command that is failing (an
        # error or Ctrl-C elsewhere): cancel them, within abort()'s bound, rather than wait them out.
        if self._manager._coordinator_controller.tracked_transfer_coordinators:
            self.abort()
        if not self._aborted.is_set():
            self._aborted.set()
            self._shutdown_executors()


class DaemonThreadExecutor(concurrent.futures.Executor):
    """concurrent.futures' thread pool, with daemon threads: a worker stuck in a request the endpoint
    never answers does not keep the interpreter from exiting (ThreadPoolExecutor's threads are joined at
    exit). s3transfer's executor interface: __init__(max_workers), submit(), shutdown(wait)."""

    def __init__(self, max_workers=None):
        self._max = max_workers or 4
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, fn, *args, **kwargs):
        future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._queue.put((future, fn, args, kwargs))
            if len(self._threads) < self._max:
                t = threading.Thread(target=self._work, name="gpt2cloud-s3", daemon=True)
                t.start()
                self._threads.append(t)
        return future

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(e)

    def shutdown(self, wait=True, *, cancel_futures=False):
        with self._lock:
            self._closed = True
            for _ in self._threads:
                self._queue.put(None)
        if wait:
            for t in self._threads:
                t.join()


# ---- boto3 sessions and clients, made once per process and environment
#
# A new boto3 session parses the S3 service model again when it makes a client (~0.1 s); `status` opens
# one store per run and `fetch` several. Sessions and clients are cached for the process's lifetime,
# keyed by everything they read when they are made: the AWS_* variables (credentials, profile, region,
# config files, endpoints), HOME (~/.aws), the proxy variables and the PID (a forked child makes its
# own: pooled connections must not be shared across a fork). boto3 clients are thread-safe; making
# one from a session is not, hence the lock.

_PROXY_VARS = ("http_proxy", "https_proxy", "no_proxy", "all_proxy")
_MAX_CACHED = 16
_sessions: dict = {}
_clients: dict = {}
_cache_lock = threading.Lock()


def _env_key() -> tuple:
    env = sorted((k, v) for k, v in os.environ.items()
                 if k.startswith("AWS_") or k == "HOME" or k.lower() in _PROXY_VARS)
    return (os.getpid(), tuple(env))


def _cache_put(cache: dict, key, value):
    while len(cache) >= _MAX_CACHED:
        cache.pop(next(iter(cache)))  # the oldest: environments a test (or a long process) left behind
    cache[key] = value
    return value


def _s3_client(endpoint_url: str | None, region: str | None, config):
    """The process's S3 client for this endpoint, region and environment (config follows from endpoint_url)."""
    import boto3

    env = _env_key()
    key = (env, endpoint_url, region)
    with _cache_lock:
        client = _clients.get(key)
        if client is None:
            try:
                session = _sessions.get(env) or _cache_put(_sessions, env, boto3.session.Session())
            except Exception as e:  # noqa: BLE001 - botocore's ProfileNotFound, a broken ~/.aws/config
                raise StorageError(f"S3 credentials: {type(e).__name__}: {str(e).splitlines()[0]}; fix AWS_PROFILE "
                                   "or ~/.aws/config, or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") from None
            region_name = region or os.environ.get("AWS_REGION") or session.region_name
            client = _cache_put(_clients, key, session.client("s3", endpoint_url=endpoint_url,
                                                              region_name=region_name, config=config))
        return client


def clear_client_cache() -> None:
    """Forget the cached boto3 sessions and clients (the next store makes new ones)."""
    with _cache_lock:
        _sessions.clear()
        _clients.clear()


def _subscribers(progress: Progress, done: threading.Event):
    from s3transfer.subscribers import BaseSubscriber

    class _Subscriber(BaseSubscriber):
        def on_progress(self, bytes_transferred, **kwargs):
            if progress:
                progress(bytes_transferred)

        def on_done(self, **kwargs):
            done.set()

    return [_Subscriber()]


def s3_error(exc: BaseException, url: str, bucket: str, endpoint_url: str | None) -> StorageError:
    """Translate a botocore exception into one line that says what is wrong and how to fix it."""
    from botocore import exceptions as bx

    where = f" at {endpoint_url}" if endpoint_url else ""
    if isinstance(exc, bx.NoCredentialsError):
        return StorageError(
            f"{url}: no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE, or run `aws configure`)"
        )
    if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError)):
        return StorageError(
            f"{url}: cannot reach the S3 endpoint{where or ' (AWS)'}; check --endpoint-url / AWS_ENDPOINT_URL "
            "and the network"
        )
    if isinstance(exc, (bx.ReadTimeoutError, bx.ConnectionClosedError)):
        return StorageError(
            f"{url}: the S3 endpoint{where or ' (AWS)'} accepted the connection but did not answer "
            f"({type(exc).__name__}, {MAX_ATTEMPTS} tries of {READ_TIMEOUT_S} s); check that --endpoint-url / "
            "AWS_ENDPOINT_URL names an S3 server that is up, and the network; rerun to resume")
    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return StorageError(
                f"{url}: bucket '{bucket}' does not exist{where}; create it (aws s3 mb s3://{bucket}) or fix the URL"
            )
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
            return StorageError(
                f"{url}: the S3 credentials were rejected ({code}){where}; check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY / AWS_PROFILE"
            )
        if code in ("AccessDenied", "AllAccessDisabled", "403") or status == 403:
            return StorageError(
                f"{url}: access denied{where}; the credentials lack permission for this bucket/prefix "
                "(s3:GetObject, s3:PutObject, s3:ListBucket)"
            )
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return NoSuchObject(f"{url}: no such object")
        if code in ("PermanentRedirect", "301", "AuthorizationHeaderMalformed") or status == 301:
            return StorageError(f"{url}: the bucket is in another region; set AWS_REGION to the bucket's region")
        msg = err.get("Message") or str(exc)
        return StorageError(f"{url}: S3 error {code or status}: {msg}".replace("\n", " "))
    return StorageError(f"{url}: {type(exc).__name__}: {exc}".replace("\n", " "))
