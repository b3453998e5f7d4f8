"""s3://bucket/key on AWS or S3-compatible stores, several endpoints at once.

``storage.s3`` is the default endpoint; ``storage.s3.endpoints`` adds named ones (Funnel's
GenericS3), each with its own credentials and options, chosen by bucket name (``buckets``:
names or shell patterns) or by URL host (``host``: ``s3://host:port/bucket/key``). An
endpoint without keys uses boto3's chain (environment, profile, instance role). Uploads
may ask for server-side encryption (``sse``: AES256 or aws:kms with ``sse_kms_key_id``);
objects over ``multipart_threshold_mb`` move in parts, several at once (boto3's transfer
manager). Smaller ones, most of a many-file task, take one request each: GetObject
streamed to the file (no HEAD first), PutObject from the open file; the manager and its
threads, made per call, would cost more than the transfer. boto3 itself makes one
attempt: storage/retry.py decides what is tried again.
"""

from __future__ import annotations

import fnmatch
import os
import threading
from pathlib import Path

from funnel_hpc.worker.storage.base import Store, directory_names, join_url
from funnel_hpc.worker.storage.errors import Stopped, StorageError
from funnel_hpc.worker.storage.retry import transient_status

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from funnel_hpc.core.config import S3Connection, S3Options, WorkerConfig

THROTTLED = {"Throttling", "ThrottlingException", "SlowDown", "RequestTimeout",
             "RequestLimitExceeded", "TooManyRequestsException", "InternalError",
             "ServiceUnavailable"}
MB = 1 << 20
CHUNK = 1 << 18  # bytes read from a GetObject body at a time (between cancel checks)


class S3Endpoint:
    """One S3 service: a boto3 client, its transfer settings and upload options."""

    def __init__(self, name: str, options: S3Connection):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.name = name
        session = boto3.session.Session(
            aws_access_key_id=options.access_key_id or None,
            aws_secret_access_key=options.secret_access_key or None,
            profile_name=options.profile or None)
        self.client = session.client(
            "s3", endpoint_url=options.endpoint_url or None,
            region_name=options.region or None,
            config=Config(retries={"max_attempts": 1, "mode": "standard"},
                          max_pool_connections=32))
        self.transfer = TransferConfig(
            multipart_threshold=int(options.multipart_threshold_mb * MB),
            multipart_chunksize=int(options.multipart_chunk_mb * MB),
            max_concurrency=4, num_download_attempts=1)
        self.upload_args: dict[str, str] = {}
        if options.sse:
            self.upload_args["ServerSideEncryption"] = options.sse
        if options.sse_kms_key_id:
            self.upload_args["SSEKMSKeyId"] = options.sse_kms_key_id


class S3Store(Store):
    """Every configured S3 endpoint; clients are made on first use."""

    def __init__(self, options: S3Options):
        self.options = options
        self.named = options.endpoints
        self._endpoints: dict[str, S3Endpoint] = {}
        self._lock = threading.Lock()

    def _endpoint(self, name: str) -> S3Endpoint:
        with self._lock:  # boto3 sessions are not thread-safe; their clients are
            if name not in self._endpoints:
                options = self.named[name] if name else self.options
                self._endpoints[name] = S3Endpoint(name or "default", options)
            return self._endpoints[name]

    def locate(self, url: str) -> tuple[S3Endpoint, str, str]:
        """(endpoint, bucket, key) of an s3:// URL."""
        netloc, path = self.split(url)
        for name, options in self.named.items():
            if options.host and netloc.lower() == options.host.lower():
                bucket, _, key = path.partition("/")
                return self._endpoint(name), bucket, key
            if any(fnmatch.fnmatchcase(netloc, pattern) for pattern in options.buckets):
                return self._endpoint(name), netloc, path
        return self._endpoint(""), netloc, path

    @staticmethod
    def split(url: str) -> tuple[str, str]:
        """(bucket, key), the key taken literally: '?', '#' and '%' are part of it."""
        bucket, _, key = url.partition("://")[2].partition("/")
        return bucket, key

    def child(self, url: str, name: str) -> str:
        return join_url(url, name)

    def _error(self, url: str, exc: BaseException) -> StorageError:
        from botocore.exceptions import (
            ClientError,
            ConnectionClosedError,
            EndpointConnectionError,
            FlexibleChecksumError,
            IncompleteReadError,
            ReadTimeoutError,
            ResponseStreamingError,
        )

        if self.stop is not None and self.stop.is_set():
            return Stopped(f"{url}: transfer stopped (task canceled)")
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = str(error.get("Code") or status)
            words = error.get("Message") or str(exc)
            said = f"{status} {code}" if status and code != str(status) else code
            return StorageError(f"{url}: {said}: {words}",
                                transient=code in THROTTLED or transient_status(status))
        # FlexibleChecksumError: a body that does not match its checksum (cut, mangled)
        transient = isinstance(exc, (EndpointConnectionError, ConnectionClosedError,
                                     ReadTimeoutError, IncompleteReadError,
                                     ResponseStreamingError, FlexibleChecksumError,
                                     ConnectionError))
        return StorageError(f"{url}: {exc.__class__.__name__}: {exc}", transient=transient)

    def _call(self, url: str, work: Callable[[], Any]) -> Any:
        from boto3.exceptions import Boto3Error, S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return work()
        except StorageError:
            raise
        except (BotoCoreError, ClientError, Boto3Error, OSError) as exc:
            cause: BaseException = exc
            if isinstance(exc, S3UploadFailedError) and exc.__context__ is not None:
                cause = exc.__context__  # boto3 re-raises the ClientError as a string
            cause = getattr(cause, "last_exception", None) or cause  # RetriesExceededError
            raise self._error(url, cause) from None

    def _progress(self, url: str) -> Callable[[int], None]:
        """boto3 transfer callback: raising in it makes the transfer fail."""
        return lambda _bytes: self.check_stop(url)

    def get_file(self, url: str, dest: Path) -> None:
        endpoint, bucket, key = self.locate(url)
        self.check_stop(url)
        if self._call(url, lambda: self._get_small(url, endpoint, bucket, key, dest)):
            return
        self._call(url, lambda: endpoint.client.download_file(
            bucket, key, str(dest), Callback=self._progress(url), Config=endpoint.transfer))

    def _get_small(self, url: str, endpoint: S3Endpoint, bucket: str, key: str,
                   dest: Path) -> bool:
        """One GetObject streamed into dest; False (nothing written) when the object is
        over the multipart threshold: the transfer manager fetches it in parts."""
        response = endpoint.client.get_object(Bucket=bucket, Key=key)
        body = response["Body"]
        try:
            size = int(response.get("ContentLength") or 0)
            if size > endpoint.transfer.multipart_threshold:
                return False
            got = 0
            with open(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                              | os.O_CLOEXEC, 0o644), "wb") as out:
                while chunk := body.read(CHUNK):
                    self.check_stop(url)
                    out.write(chunk)
                    got += len(chunk)
        finally:
            body.close()
        if got != size:
            raise StorageError(f"{url}: got {got} of {size} bytes", transient=True)
        return True

    def put_file(self, src: Path, url: str) -> None:
        endpoint, bucket, key = self.locate(url)
        self.check_stop(url)
        if os.stat(src).st_size <= endpoint.transfer.multipart_threshold:
            def put() -> None:
                with open(src, "rb") as body:
                    endpoint.client.put_object(Bucket=bucket, Key=key, Body=body,
                                               **endpoint.upload_args)
            self._call(url, put)
            return
        self._call(url, lambda: endpoint.client.upload_file(
            str(src), bucket, key, ExtraArgs=dict(endpoint.upload_args),
            Callback=self._progress(url), Config=endpoint.transfer))

    def list(self, url: str) -> list[str]:
        endpoint, bucket, prefix = self.locate(url)
        prefix = prefix.rstrip("/") + "/" if prefix else ""

        def keys() -> list[str]:
            names = []
            for page in endpoint.client.get_paginator("list_objects_v2").paginate(
                    Bucket=bucket, Prefix=prefix):
                names += [o["Key"][len(prefix):] for o in page.get("Contents", [])]
            return names
        names = self._call(url, keys)
        if not names:
            raise StorageError(f"{url}: no objects under this prefix")
        return directory_names(names)

    def make_dir(self, url: str) -> bool:
        """A zero-byte "key/" object: the directory marker S3 consoles make."""
        endpoint, bucket, key = self.locate(url)
        self.check_stop(url)
        self._call(url, lambda: endpoint.client.put_object(
            Bucket=bucket, Key=key.rstrip("/") + "/", Body=b"", **endpoint.upload_args))
        return True

    def exists(self, url: str) -> bool:
        endpoint, bucket, key = self.locate(url)
        try:
            endpoint.client.head_object(Bucket=bucket, Key=key)
            return True
        except Exception:  # noqa: BLE001 - any failure means "cannot be had"
            return False


def make_store(config: WorkerConfig, _scheme: str) -> S3Store:
    return S3Store(config.storage.s3)
