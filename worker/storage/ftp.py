"""ftp://user:password@host/path: files, directory trees (MLSD), uploads (STOR).

4xx replies and dropped connections are transient; 5xx replies (no such file, login
incorrect) are not. The password never appears in messages.
"""

from __future__ import annotations

import posixpath
from pathlib import Path
from urllib.parse import unquote, urlparse

from funnel_hpc.worker.storage.base import Store, redact, redact_in
from funnel_hpc.worker.storage.errors import StorageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeVar

    T = TypeVar("T")

    from funnel_hpc.core.config import WorkerConfig


class FtpStore(Store):
    """One FTP connection per transfer."""

    def __init__(self, timeout: float = 60):
        import ftplib  # with ssl: only tasks that use ftp:// pay for the import

        self.ftplib = ftplib
        self.timeout = timeout

    def _connect(self, url: str) -> tuple[Any, str]:
        parsed = urlparse(url)
        ftp = self.ftplib.FTP(timeout=self.timeout)
        ftp.connect(parsed.hostname or "", parsed.port or 21)
        ftp.login(unquote(parsed.username or "anonymous"), unquote(parsed.password or ""))
        return ftp, unquote(parsed.path) or "/"

    def _wrap(self, url: str, work: Callable[[Any, str], T]) -> T:
        try:
            ftp, path = self._connect(url)
            with ftp:
                return work(ftp, path)
        except self.ftplib.error_perm as exc:
            raise StorageError(f"{redact(url)}: {redact_in(url, str(exc))}") from None
        except (self.ftplib.Error, OSError, EOFError) as exc:
            raise StorageError(f"{redact(url)}: {exc.__class__.__name__}: "
                               f"{redact_in(url, str(exc))}", transient=True) from None

    def _walk(self, ftp: Any, path: str) -> list[str]:
        files = []
        for name, facts in ftp.mlsd(path):
            if name in (".", ".."):
                continue
            child = posixpath.join(path, name)
            if facts.get("type") == "dir":
                files += self._walk(ftp, child)
            elif facts.get("type") == "file":
                files.append(child)
        return files

    def get_file(self, url: str, dest: Path) -> None:
        def download(ftp: Any, path: str) -> None:
            with dest.open("wb") as fh:
                def write(chunk: bytes) -> None:
                    self.check_stop(url)
                    fh.write(chunk)
                ftp.retrbinary(f"RETR {path}", write)
        self._wrap(url, download)

    def put_file(self, src: Path, url: str) -> None:
        def upload(ftp: Any, path: str) -> None:
            current = ""
            for part in filter(None, posixpath.dirname(path).split("/")):
                current += "/" + part
                try:
                    ftp.mkd(current)
                except self.ftplib.error_perm:
                    pass  # exists
            with src.open("rb") as fh:
                ftp.storbinary(f"STOR {path}", fh, callback=lambda _block: self.check_stop(url))
        self._wrap(url, upload)

    def list(self, url: str) -> list[str]:
        def walk(ftp: Any, path: str) -> list[str]:
            return sorted(posixpath.relpath(file, path) for file in self._walk(ftp, path))
        return self._wrap(url, walk)

    def exists(self, url: str) -> bool:
        try:
            return self._wrap(url, lambda ftp, path: ftp.size(path) is not None)
        except StorageError:
            return False


def make_store(_config: WorkerConfig, _scheme: str) -> FtpStore:
    return FtpStore()
