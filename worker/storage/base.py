"""What every store shares: the Store interface, URL helpers, directory markers, and
sources opened once without following a final symlink."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path
from urllib.parse import urlparse

from funnel_hpc.worker.storage.errors import Stopped, StorageError

TYPE_CHECKING = False  # not typing's: importing typing costs every worker start
if TYPE_CHECKING:
    from collections.abc import Sequence


def join_url(base: str, relative: str) -> str:
    return base.rstrip("/") + "/" + relative.lstrip("/")


def redact(url: str) -> str:
    """url without its password (user:***@host)."""
    parsed = urlparse(url)
    if parsed.password:
        return url.replace(f":{parsed.password}@", ":***@")
    return url


def redact_in(url: str, text: str) -> str:
    """text (e.g. an exception message quoting url) without url's password."""
    password = urlparse(url).password
    return text.replace(password, "***") if password else text


def is_marker(name: str) -> bool:
    """A listed name that is an empty directory ("a/b/"), not a file."""
    return name.endswith("/")


def make_dirs(dest: Path, markers: Sequence[str], url: str) -> None:
    """The empty directories a listing of url named, under dest (a fresh download
    directory: nothing in it is a task's)."""
    dest.mkdir(parents=True, exist_ok=True)
    for marker in markers:
        target = inside(dest, marker.rstrip("/"), url)
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # e.g. a file listed under the same name
            raise StorageError(f"{redact(url)}: cannot make the directory {marker!r}: "
                               f"{exc.strerror or exc}") from None


def directory_names(names: list[str]) -> list[str]:
    """Object names under a prefix as Store.list gives them: files, and the markers
    ("a/b/") of directories that hold nothing else; the prefix's own marker ("") and
    markers of directories that hold objects are dropped (S3 and GCS alike)."""
    files = [name for name in names if name and not name.endswith("/")]
    holding = {parent for name in names for parent in _parents(name)}
    markers = [name for name in names if name.endswith("/") and name != "/"
               and name not in holding]
    return sorted(files + markers)


def _parents(name: str) -> list[str]:
    """"a/b/c" -> ["a/", "a/b/"]; "a/b/" -> ["a/"]."""
    parts = name.rstrip("/").split("/")
    return ["/".join(parts[:i]) + "/" for i in range(1, len(parts))]


def inside(dest: Path, relative: str, url: str) -> Path:
    """dest/relative for a name a store listed; refuses names that would climb out."""
    parts = relative.split("/")
    if relative.startswith("/") or ".." in parts or not relative or "\x00" in relative:
        raise StorageError(f"{redact(url)}: refusing the listed name {relative!r}")
    return dest / relative


class Store:
    """One URL scheme: single-object transfers that stop at the next chunk once `stop` is set."""

    stop: threading.Event | None = None
    owner: str | None = None  # the task's owner (auth on), whose rights file:// access gets

    def check_stop(self, url: str) -> None:
        if self.stop is not None and self.stop.is_set():
            raise Stopped(f"{redact(url)}: transfer stopped (task canceled)")

    def get_file(self, url: str, dest: Path) -> None:
        raise NotImplementedError

    def put_file(self, src: Path, url: str) -> None:
        raise NotImplementedError

    def list(self, url: str) -> list[str]:
        raise StorageError(f"{redact(url)}: directories are not supported for this scheme")

    def make_dir(self, url: str) -> bool:
        """Make an empty directory at url (and the directories above it); False when this
        scheme keeps no empty directories."""
        return False

    def child(self, url: str, name: str) -> str:
        """The URL of a name list(url) gave, as this store parses URLs (percent-encoded)."""
        from urllib.parse import quote

        return join_url(url, quote(name, safe="/"))

    def exists(self, url: str) -> bool:
        raise NotImplementedError

    # one-shot conveniences (no retries, one at a time): benchmarks and scripts
    def get(self, url: str, dest: Path, is_dir: bool = False) -> None:
        names = self.list(url) if is_dir else [""]
        if is_dir:
            make_dirs(dest, [name for name in names if is_marker(name)], url)
        for name in names:
            if is_marker(name):
                continue
            target = inside(dest, name, url) if name else dest
            target.parent.mkdir(parents=True, exist_ok=True)
            self.get_file(self.child(url, name) if name else url, target)

    def put(self, src: Path, url: str) -> None:
        with open_source(src) as (path, _size):
            self.put_file(path, url)


class open_source:
    """A local file to upload, opened once: not through a final symlink, and only a
    regular file. Yields (path stores may open, size)."""

    def __init__(self, src: Path):
        self.src = src
        self.fd = -1

    def __enter__(self) -> tuple[Path, int]:
        try:
            self.fd = os.open(self.src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                              | os.O_CLOEXEC)
        except OSError as exc:
            raise StorageError(f"{self.src}: cannot open: {exc.strerror}") from None
        info = os.fstat(self.fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(self.fd)
            raise StorageError(f"{self.src}: not a regular file")
        proc = Path(f"/proc/self/fd/{self.fd}")
        return (proc if proc.exists() else self.src), info.st_size

    def __exit__(self, *_exc: object) -> None:
        os.close(self.fd)
