"""gs://bucket/object through google-cloud-storage (the ``gs`` extra, imported on first use).

Credentials: a service-account JSON file (``storage.gs.credentials_file``), none at all
(``anonymous``: public buckets, emulators), else Application Default Credentials.
``endpoint_url`` points the client at an emulator or a private endpoint. Objects are
files; a directory URL is the objects under ``prefix/``. Large uploads are resumable
(the library's), downloads are checked against the stored CRC32C/MD5. Objects of
``ranged_threshold_mb`` or more come down in ranges of ``ranged_chunk_mb``, up to
``storage.max_parallel_transfers`` at once (one pool per worker, whatever the number of
files), pinned to the generation first seen, then checked (size, and CRC32C or MD5 when
the object has one). Cost: one metadata request per download, to learn the size. The
library's own retries are off: storage/retry.py decides what is tried again.
"""

from __future__ import annotations

import threading
from pathlib import Path

from funnel_hpc.worker.storage.base import Store, directory_names, join_url
from funnel_hpc.worker.storage.errors import StorageError
from funnel_hpc.worker.storage.retry import transient_status

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from concurrent.futures import ThreadPoolExecutor
    from typing import Any

    from funnel_hpc.core.config import GsOptions, WorkerConfig

MB = 1 << 20
SCOPES = ["https://www.googleapis.com/auth/devstorage.read_write"]
MISSING = ("gs:// needs the google-cloud-storage package on the worker's Python "
           "(pip install 'funnel-hpc[gs]')")


class GsStore(Store):
    """One google.cloud.storage client, made on first use."""

    def __init__(self, options: GsOptions, parallel: int = 1):
        self.options = options
        self.timeout = 60.0
        self.parallel = max(1, parallel)
        self.ranged_threshold = int(options.ranged_threshold_mb * MB)  # 0: never ranged
        self.chunk = max(1, int(options.ranged_chunk_mb * MB))
        self._client: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def client(self) -> Any:
        with self._lock:  # transfers run in threads; one client serves them all
            if self._client is None:
                self._client = self._make_client()
            return self._client

    def _make_client(self) -> Any:
        try:
            from google.cloud import storage  # type: ignore[import-untyped]
        except ImportError:
            raise StorageError(MISSING) from None
        options = self.options
        project = options.project or None
        client_options = {"api_endpoint": options.endpoint_url} if options.endpoint_url else None
        if options.anonymous:
            from google.auth.credentials import AnonymousCredentials

            credentials: Any = AnonymousCredentials()  # type: ignore[no-untyped-call]
            project = project or "<none>"
        elif options.credentials_file:
            from google.oauth2 import service_account

            credentials = service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
                options.credentials_file, scopes=SCOPES)
            project = project or credentials.project_id
        else:
            import google.auth

            credentials, default_project = google.auth.default(scopes=SCOPES)
            project = project or default_project or "<none>"
        return storage.Client(project=project, credentials=credentials,
                              client_options=client_options)

    @staticmethod
    def split(url: str) -> tuple[str, str]:
        """(bucket, key), the key taken literally: '?', '#' and '%' are part of it."""
        bucket, _, key = url.partition("://")[2].partition("/")
        return bucket, key

    def child(self, url: str, name: str) -> str:
        return join_url(url, name)

    def _error(self, url: str, exc: BaseException) -> StorageError:
        from google.api_core.exceptions import GoogleAPICallError
        from google.auth.exceptions import TransportError

        if isinstance(exc, GoogleAPICallError):
            status = exc.code if isinstance(exc.code, int) else None
            return StorageError(f"{url}: HTTP {status}: {exc.message}",
                                transient=transient_status(status))
        response = getattr(exc, "response", None)  # google.resumable_media InvalidResponse
        status = getattr(response, "status_code", None)
        if status is not None:
            return StorageError(f"{url}: HTTP {status}: {exc}", transient=transient_status(status))
        # DataCorruption (a download cut short), connection errors, token fetch trouble
        transient = isinstance(exc, (ConnectionError, TransportError)) or \
            exc.__class__.__name__ in ("DataCorruption", "ChunkedEncodingError",
                                       "ConnectionError", "Timeout", "ReadTimeout",
                                       "ConnectTimeout", "ProtocolError")
        return StorageError(f"{url}: {exc.__class__.__name__}: {exc}", transient=transient)

    def _call(self, url: str, work: Callable[[], Any]) -> Any:
        from google.api_core.exceptions import GoogleAPIError
        from google.auth.exceptions import GoogleAuthError
        from requests import RequestException

        try:
            return work()
        except StorageError:
            raise
        except (GoogleAPIError, GoogleAuthError, RequestException, ConnectionError) as exc:
            raise self._error(url, exc) from None
        except Exception as exc:
            if exc.__class__.__module__.startswith("google.resumable_media"):
                raise self._error(url, exc) from None
            raise

    def get_file(self, url: str, dest: Path) -> None:
        bucket, name = self.split(url)
        self.check_stop(url)
        if self.ranged_threshold <= 0:
            self._call(url, lambda: self.client().bucket(bucket).blob(name)
                       .download_to_filename(str(dest), retry=None, timeout=self.timeout))
            return
        blob = self._call(url, lambda: self.client().bucket(bucket).get_blob(
            name, retry=None, timeout=self.timeout))
        if blob is None:
            raise StorageError(f"{url}: HTTP 404: no such object")
        # gzip with transcoding: served whole and decompressed, whatever the range
        if (blob.size or 0) >= self.ranged_threshold and blob.content_encoding != "gzip":
            from funnel_hpc.worker.storage.gs_ranged import download_ranges

            download_ranges(self, url, blob, dest)
            return
        # the metadata's blob: its media link names the generation just seen
        self._call(url, lambda: blob.download_to_filename(str(dest), retry=None,
                                                          timeout=self.timeout))

    def pool(self) -> ThreadPoolExecutor:
        """The threads ranged downloads share (made on first use): transfers already run
        several at once, so a pool per file would multiply threads and connections."""
        with self._lock:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(self.parallel, thread_name_prefix="gs-range")
            return self._pool

    def call(self, url: str, work: Callable[[], Any]) -> Any:
        """work() with the library's failures turned into StorageError (see _error)."""
        return self._call(url, work)

    def put_file(self, src: Path, url: str) -> None:
        bucket, name = self.split(url)
        self.check_stop(url)
        self._call(url, lambda: self.client().bucket(bucket).blob(name).upload_from_filename(
            str(src), retry=None, timeout=self.timeout))

    def list(self, url: str) -> list[str]:
        bucket, prefix = self.split(url)
        prefix = prefix.rstrip("/") + "/" if prefix else ""

        def names() -> list[str]:
            return [blob.name[len(prefix):] for blob in self.client().list_blobs(
                bucket, prefix=prefix, retry=None, timeout=self.timeout)]
        found = self._call(url, names)
        if not found:
            raise StorageError(f"{url}: no objects under this prefix")
        return directory_names(found)

    def make_dir(self, url: str) -> bool:
        """A zero-byte "name/" object: the folder marker the Cloud console makes."""
        bucket, name = self.split(url)
        self.check_stop(url)
        self._call(url, lambda: self.client().bucket(bucket).blob(name.rstrip("/") + "/")
                   .upload_from_string(b"", retry=None, timeout=self.timeout))
        return True

    def exists(self, url: str) -> bool:
        bucket, name = self.split(url)
        try:
            return bool(self._call(url, lambda: self.client().bucket(bucket).blob(name).exists(
                retry=None, timeout=self.timeout)))
        except StorageError:
            return False


def make_store(config: WorkerConfig, _scheme: str) -> GsStore:
    return GsStore(config.storage.gs, config.storage.max_parallel_transfers)
