"""http:// and https://: downloads with GET, uploads with PUT (or POST), headers per host.

``storage.http.headers`` maps a host (``name`` or ``name:port``) to headers sent with
every request to it, e.g. a bearer token for a site's object store. Redirects are
followed only for hosts without configured headers, so those headers never reach
another host. No directory listing: directory inputs are refused; outputs (one file,
a directory tree, wildcard matches) are sent file by file.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from funnel_hpc.worker.storage.base import Store, redact, redact_in
from funnel_hpc.worker.storage.errors import StorageError
from funnel_hpc.worker.storage.retry import transient_status

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

    from funnel_hpc.core.config import WorkerConfig

UPLOAD_OK = (200, 201, 204)


class HttpStore(Store):
    """A requests session with per-host headers."""

    def __init__(self, headers: Mapping[str, Mapping[str, str]] | None = None,
                 upload_method: str = "PUT", timeout: float = 60):
        import requests

        self.requests = requests
        self.http = requests.Session()
        self.headers = {host.lower(): dict(values) for host, values in (headers or {}).items()}
        self.upload_method = upload_method.upper()
        if self.upload_method not in ("PUT", "POST"):
            raise StorageError(f"storage.http.upload_method must be PUT or POST, "
                               f"not {upload_method!r}")
        self.timeout = timeout

    def _headers(self, url: str) -> dict[str, str]:
        parsed = urlparse(url)
        host = (parsed.hostname or "").lower()
        return self.headers.get(f"{host}:{parsed.port}" if parsed.port else host) \
            or self.headers.get(host) or {}

    def _failed(self, url: str, exc: Exception) -> StorageError:
        # connection refused/reset, timeouts and truncated bodies: worth another try
        return StorageError(f"{redact(url)}: {exc.__class__.__name__}: "
                            f"{redact_in(url, str(exc))}", transient=True)

    def _status(self, url: str, resp: Any) -> StorageError:
        words = resp.reason or ""
        return StorageError(f"{redact(url)}: HTTP {resp.status_code} {words}".rstrip(),
                            transient=transient_status(resp.status_code))

    def get_file(self, url: str, dest: Path) -> None:
        headers = self._headers(url)
        try:
            with self.http.get(url, stream=True, timeout=self.timeout, headers=headers,
                               allow_redirects=not headers) as resp:
                if resp.status_code != 200:
                    raise self._status(url, resp)
                expected = resp.headers.get("Content-Length")
                written = 0
                with dest.open("wb") as fh:
                    for chunk in resp.iter_content(1 << 20):
                        self.check_stop(url)
                        fh.write(chunk)
                        written += len(chunk)
                if expected is not None and expected.isdigit() and written != int(expected):
                    raise StorageError(f"{redact(url)}: connection closed after {written} of "
                                       f"{expected} bytes", transient=True)
        except self.requests.RequestException as exc:
            raise self._failed(url, exc) from None

    def put_file(self, src: Path, url: str) -> None:
        headers = self._headers(url)
        try:
            with src.open("rb") as fh:
                # an empty file as b"": requests would send an empty stream chunked
                body = fh if os.fstat(fh.fileno()).st_size else b""
                resp = self.http.request(self.upload_method, url, data=body, headers=headers,
                                         timeout=self.timeout, allow_redirects=False)
        except self.requests.RequestException as exc:
            raise self._failed(url, exc) from None
        if resp.status_code not in UPLOAD_OK:
            raise self._status(url, resp)

    def exists(self, url: str) -> bool:
        headers = self._headers(url)
        try:
            return bool(self.http.head(url, timeout=self.timeout, headers=headers,
                                       allow_redirects=not headers).status_code == 200)
        except self.requests.RequestException:
            return False


def make_store(config: WorkerConfig, _scheme: str) -> HttpStore:
    options = config.storage.http
    return HttpStore(options.headers, options.upload_method, options.timeout_seconds)
