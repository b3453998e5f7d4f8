"""Storage: one small interface, one class per URL scheme.

Each store has ``get(url, dest, is_dir)``, ``put(src, url)``, ``list(url)``
(the file URLs under a directory URL) and ``exists(url)``.
``file://`` URLs and plain absolute paths are limited to ``worker.allowed_dirs``
(after resolving symlinks, file by file); local copies are reflinks where the
file system can (btrfs, XFS), hard links when ``worker.link_inputs`` is set and
the file system is the same, plain copies otherwise.
"""

from __future__ import annotations

import fcntl
import os
import posixpath
import shutil
import threading
from pathlib import Path
from urllib.parse import unquote, urlparse

TYPE_CHECKING = False  # not typing's: importing typing costs every worker start
if TYPE_CHECKING:
    from typing import Any, Protocol

    class Store(Protocol):
        def get(self, url: str, dest: Path, is_dir: bool = False) -> None: ...
        def put(self, src: Path, url: str) -> None: ...
        def list(self, url: str) -> list[str]: ...
        def exists(self, url: str) -> bool: ...


class StorageError(RuntimeError):
    """A transfer failed; the message names the URL."""


class Stopped(StorageError):
    """A transfer given up half-way because the task was canceled."""


def join_url(base: str, relative: str) -> str:
    return base.rstrip("/") + "/" + relative.lstrip("/")


class Interruptible:
    """Stores whose transfers go chunk by chunk stop at the next chunk once `stop` is set."""

    stop: threading.Event | None = None

    def check_stop(self, url: str) -> None:
        if self.stop is not None and self.stop.is_set():
            raise Stopped(f"{_redact(url)}: transfer stopped (task canceled)")


def inside(dest: Path, relative: str, url: str) -> Path:
    """dest/relative for a name a remote store listed; refuses names that would climb out."""
    parts = relative.split("/")
    if relative.startswith("/") or ".." in parts or not relative or "\x00" in relative:
        raise StorageError(f"{url}: refusing the listed name {relative!r}")
    return dest / relative


FICLONE = 0x40049409  # ioctl: share the source's blocks copy-on-write (Linux)


def clone_or_copy(src: Path, dest: Path) -> None:
    """Reflink src to dest when the file system supports it, else copy the bytes in the
    kernel (copy_file_range), else through shutil."""
    with src.open("rb") as fin, dest.open("wb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), FICLONE, fin.fileno())
            return
        except OSError:
            pass  # not supported here (ext4, tmpfs, NFS, across file systems)
        try:
            while os.copy_file_range(fin.fileno(), fout.fileno(), 1 << 30):
                pass
            return
        except OSError:
            fout.truncate(0)  # e.g. an old kernel across file systems: start again
    shutil.copyfile(src, dest)


class LocalStore:
    def __init__(self, allowed_dirs: list[str], link: bool = False):
        self.allowed = [os.path.realpath(d) for d in allowed_dirs]
        self.link = link

    def path(self, url: str) -> Path:
        raw = unquote(urlparse(url).path) if url.startswith("file://") else url
        real = os.path.realpath(raw)
        if not any(real == d or real.startswith(d.rstrip("/") + "/") for d in self.allowed):
            raise StorageError(f"{url}: outside the allowed directories "
                               f"({', '.join(self.allowed) or 'none configured: worker.allowed_dirs'})")
        return Path(real)

    def _copy_file(self, src: Path, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if self.link:
            try:
                os.link(src, dest)
                return
            except OSError:
                pass  # other file system: copy
        clone_or_copy(src, dest)

    def get(self, url: str, dest: Path, is_dir: bool = False) -> None:
        src = self.path(url)
        if is_dir:
            if not src.is_dir():
                raise StorageError(f"{url}: not a directory")
            # symlinked sub-directories are not followed; symlinked files are
            # copied only when their target is inside the allowed directories too
            for root, _dirs, files in os.walk(src):
                target_dir = dest / Path(root).relative_to(src)
                target_dir.mkdir(parents=True, exist_ok=True)
                for name in sorted(files):
                    real = self.path(str(Path(root) / name))
                    if real.is_file():  # not a FIFO, socket or device
                        self._copy_file(real, target_dir / name)
            return
        if not src.is_file():
            raise StorageError(f"{url}: no such file")
        self._copy_file(src, dest)

    def put(self, src: Path, url: str) -> None:
        dest = self.path(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        clone_or_copy(src, dest)

    def list(self, url: str) -> list[str]:
        base = self.path(url)
        return sorted("file://" + str(Path(r) / f) for r, _d, fs in os.walk(base) for f in fs)

    def exists(self, url: str) -> bool:
        return self.path(url).exists()


class HttpStore(Interruptible):
    """Download only."""

    def __init__(self, timeout: float = 60):
        import requests

        self.http = requests.Session()
        self.timeout = timeout

    def get(self, url: str, dest: Path, is_dir: bool = False) -> None:
        import requests

        if is_dir:
            raise StorageError(f"{url}: directory inputs are not supported over HTTP")
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self.http.get(url, stream=True, timeout=self.timeout) as resp:
                if resp.status_code != 200:
                    raise StorageError(f"{_redact(url)}: HTTP {resp.status_code}")
                with dest.open("wb") as fh:
                    for chunk in resp.iter_content(1 << 20):
                        self.check_stop(url)
                        fh.write(chunk)
        except requests.RequestException as exc:
            raise StorageError(f"{_redact(url)}: {exc.__class__.__name__}: "
                               f"{_redact_in(url, str(exc))}") from None

    def put(self, src: Path, url: str) -> None:
        raise StorageError(f"{_redact(url)}: uploads over HTTP are not supported")

    def list(self, url: str) -> list[str]:
        raise StorageError(f"{url}: listing over HTTP is not supported")

    def exists(self, url: str) -> bool:
        try:
            return self.http.head(url, timeout=self.timeout, allow_redirects=True).status_code == 200
        except Exception:
            return False


class S3Store(Interruptible):
    def __init__(self, options: dict):
        import boto3
        from botocore.config import Config

        self.client = boto3.client(
            "s3", endpoint_url=options.get("endpoint_url") or None,
            region_name=options.get("region") or None,
            config=Config(retries={"max_attempts": 5, "mode": "standard"}))

    @staticmethod
    def split(url: str) -> tuple[str, str]:
        parsed = urlparse(url)
        return parsed.netloc, parsed.path.lstrip("/")

    def _error(self, url: str, exc: Exception) -> StorageError:
        if self.stop is not None and self.stop.is_set():
            return Stopped(f"{url}: transfer stopped (task canceled)")
        return StorageError(f"{url}: {exc.__class__.__name__}: {exc}")

    def _progress(self, url: str):
        """boto3 transfer callback: raising in it makes the transfer fail."""
        return lambda _bytes: self.check_stop(url)

    def get(self, url: str, dest: Path, is_dir: bool = False) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            if not is_dir:
                bucket, key = self.split(url)
                self.client.download_file(bucket, key, str(dest), Callback=self._progress(url))
                return
            keys = self.list(url)
            dest.mkdir(parents=True, exist_ok=True)
            bucket, prefix = self.split(url)
            prefix = prefix.rstrip("/") + "/" if prefix else ""
            for item in keys:
                _, key = self.split(item)
                target = inside(dest, key[len(prefix):], item)
                target.parent.mkdir(parents=True, exist_ok=True)
                self.client.download_file(bucket, key, str(target),
                                          Callback=self._progress(url))
        except StorageError:
            raise
        except (BotoCoreError, ClientError, OSError) as exc:
            raise self._error(url, exc) from None

    def put(self, src: Path, url: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = self.split(url)
        try:
            self.client.upload_file(str(src), bucket, key, Callback=self._progress(url))
        except StorageError:
            raise
        except (BotoCoreError, ClientError, OSError) as exc:
            raise self._error(url, exc) from None

    def list(self, url: str) -> list[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, prefix = self.split(url)
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        out = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=bucket, Prefix=prefix):
                out += [f"s3://{bucket}/{o['Key']}" for o in page.get("Contents", [])
                        if not o["Key"].endswith("/")]
        except (BotoCoreError, ClientError) as exc:
            raise self._error(url, exc) from None
        if not out:
            raise StorageError(f"{url}: no objects under this prefix")
        return out

    def exists(self, url: str) -> bool:
        bucket, key = self.split(url)
        try:
            self.client.head_object(Bucket=bucket, Key=key)
            return True
        except Exception:
            return False


class FtpStore(Interruptible):
    def __init__(self, timeout: float = 60):
        self.timeout = timeout

    @staticmethod
    def _ftplib():
        import ftplib  # with ssl: only tasks that use ftp:// pay for the import

        return ftplib

    def _connect(self, url: str) -> tuple[Any, str]:
        parsed = urlparse(url)
        ftp = self._ftplib().FTP(timeout=self.timeout)
        ftp.connect(parsed.hostname or "", parsed.port or 21)
        ftp.login(unquote(parsed.username or "anonymous"), unquote(parsed.password or ""))
        return ftp, unquote(parsed.path) or "/"

    def _wrap(self, url: str, fn):
        try:
            return fn()
        except (self._ftplib().Error, OSError, EOFError) as exc:
            raise StorageError(f"{_redact(url)}: {exc.__class__.__name__}: {exc}") from None

    def _download(self, ftp: Any, path: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with dest.open("wb") as fh:
            def write(chunk: bytes) -> None:
                self.check_stop(path)
                fh.write(chunk)
            ftp.retrbinary(f"RETR {path}", write)

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

    def get(self, url: str, dest: Path, is_dir: bool = False) -> None:
        def run():
            ftp, path = self._connect(url)
            with ftp:
                if not is_dir:
                    self._download(ftp, path, dest)
                    return
                dest.mkdir(parents=True, exist_ok=True)
                for file in self._walk(ftp, path):
                    self._download(ftp, file, inside(dest, posixpath.relpath(file, path),
                                                      _redact(url)))
        self._wrap(url, run)

    def put(self, src: Path, url: str) -> None:
        def run():
            ftp, path = self._connect(url)
            with ftp:
                parts = posixpath.dirname(path).strip("/").split("/")
                current = ""
                for part in filter(None, parts):
                    current += "/" + part
                    try:
                        ftp.mkd(current)
                    except self._ftplib().error_perm:
                        pass  # exists
                with src.open("rb") as fh:
                    ftp.storbinary(f"STOR {path}", fh,
                                   callback=lambda _block: self.check_stop(path))
        self._wrap(url, run)

    def list(self, url: str) -> list[str]:
        def run():
            ftp, path = self._connect(url)
            with ftp:
                base = url[: len(url) - len(urlparse(url).path)]
                return [base + f for f in self._walk(ftp, path)]
        return self._wrap(url, run)

    def exists(self, url: str) -> bool:
        try:
            def run():
                ftp, path = self._connect(url)
                with ftp:
                    return ftp.size(path) is not None
            return bool(self._wrap(url, run))
        except StorageError:
            return False


def _redact_in(url: str, text: str) -> str:
    """text (e.g. an exception message quoting url) without url's password."""
    password = urlparse(url).password
    return text.replace(password, "***") if password else text


def _redact(url: str) -> str:
    parsed = urlparse(url)
    if parsed.password:
        return url.replace(f":{parsed.password}@", ":***@")
    return url


class Storage:
    """Picks the store for a URL; refuses schemes not in storage.allowed_schemes."""

    def __init__(self, config: dict, stop: threading.Event | None = None):
        self.config = config
        self.stop = stop  # set: transfers in progress give up at their next chunk
        self.allowed_schemes = set(config["storage"]["allowed_schemes"])
        self._stores: dict[str, Store] = {}

    def scheme(self, url: str) -> str:
        if url.startswith("/"):
            return "file"
        return urlparse(url).scheme.lower()

    def store(self, url: str) -> Store:
        scheme = self.scheme(url)
        if scheme not in self.allowed_schemes:
            raise StorageError(f"{_redact(url)}: URL scheme {scheme or '(none)'!r} is not allowed "
                               f"(storage.allowed_schemes: {', '.join(sorted(self.allowed_schemes))})")
        if scheme not in self._stores:
            storage = self.config["storage"]
            worker = self.config["worker"]
            if scheme == "file":
                self._stores[scheme] = LocalStore(worker["allowed_dirs"], worker["link_inputs"])
            elif scheme in ("http", "https"):
                self._stores[scheme] = HttpStore()
            elif scheme == "s3":
                self._stores[scheme] = S3Store(storage["s3"])
            elif scheme == "ftp":
                self._stores[scheme] = FtpStore()
            else:
                raise StorageError(f"{_redact(url)}: no storage for scheme {scheme!r}")
            if isinstance(self._stores[scheme], Interruptible):
                self._stores[scheme].stop = self.stop  # type: ignore[attr-defined]
        return self._stores[scheme]

    def get(self, url: str, dest: Path, is_dir: bool = False) -> None:
        self.store(url).get(url, dest, is_dir)

    def put(self, src: Path, url: str) -> None:
        self.store(url).put(src, url)
