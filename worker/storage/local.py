"""file:// URLs and absolute paths, limited to ``worker.allowed_dirs`` without a race.

A path is opened beneath the allowed directory it names, never through a symlink: one
``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`` call where the kernel has it (Linux
5.6+), else a walk opening each component with O_NOFOLLOW from the allowed root's
descriptor. The bytes are then copied between descriptors, so a directory swapped for a
symlink between a check and the copy cannot redirect it: such a path fails. Copies are
reflinks where the file system can (btrfs, XFS: cheap and private), hard links for inputs
when ``worker.link_inputs`` is set and the file system is the same (the task then shares
the original: read-only data only), else in-kernel copies (copy_file_range).

Whose rights: a task with an owner gets the ``{user}`` entries of ``allowed_dirs`` made its
own, and a root worker opens and lists as that owner (owner_access.py); otherwise opens
happen here, with the worker's own rights.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import threading
from pathlib import Path
from urllib.parse import unquote

from funnel_hpc.worker.storage.base import Store, join_url
from funnel_hpc.worker.storage.beneath import (
    DIR_FLAGS,
    NO_LINKS,
    READ_FLAGS,
    USER,
    WRITE_FLAGS,
    Opener,
    RootUnusable,
    copy_fd,
    link_fd,
)
from funnel_hpc.worker.storage.errors import StorageError

TYPE_CHECKING = False
if TYPE_CHECKING:

    from funnel_hpc.core.config import WorkerConfig


def _words(url: str, exc: OSError, as_whom: str = "") -> StorageError:
    reasons = {errno.ENOENT: "no such file or directory",
               errno.ELOOP: f"a path component is a symbolic link ({NO_LINKS})",
               errno.EXDEV: "leaves the allowed directory",
               errno.ENOTDIR: "a path component is not a directory",
               errno.EISDIR: "is a directory"}
    return StorageError(f"{url}: {reasons.get(exc.errno or 0, exc.strerror)}{as_whom}")


class LocalStore(Store):
    """Files under worker.allowed_dirs, opened with the task owner's rights where known."""

    def __init__(self, allowed_dirs: list[str], link: bool = False):
        self.allowed_dirs = list(allowed_dirs)
        self.link = link
        self._access: tuple[list[tuple[str, str]], Opener] | None = None
        self._access_lock = threading.Lock()

    def access(self) -> tuple[list[tuple[str, str]], Opener]:
        """(roots as (configured, resolved), opener) for self.owner, made on first use
        (Storage sets owner after making the store)."""
        with self._access_lock:
            if self._access is None:
                dirs, opener = list(self.allowed_dirs), Opener()
                if self.owner is not None or any(USER in entry for entry in dirs):
                    from funnel_hpc.worker.storage.owner_access import access_for

                    dirs, opener = access_for(dirs, self.owner)
                # (as configured, resolved): a URL may name either spelling of an allowed dir
                roots = [(os.path.normpath(entry), os.path.realpath(entry))
                         for entry in dirs]
                self._access = (roots, opener)
            return self._access

    @property
    def allowed(self) -> list[str]:
        return [real for _given, real in self.access()[0]]

    def locate(self, url: str) -> tuple[str, list[str]]:
        """(resolved allowed root, path components below it) of a file URL or path."""
        raw = url
        if url.startswith("file://"):  # literally: '?' and '#' are part of a file name
            host, slash, path = url[len("file://"):].partition("/")
            if host not in ("", "localhost"):
                raise StorageError(f"{url}: file URLs name this host only ({host!r} given)")
            raw = unquote(slash + path)
        parts = [p for p in raw.split("/") if p not in ("", ".")]
        if ".." in parts or "\x00" in raw:
            raise StorageError(f"{url}: '..' and NUL are not allowed in file paths")
        best: tuple[str, list[str]] | None = None
        for given, real in self.access()[0]:
            for spelling in {given, real}:
                prefix = [p for p in spelling.split("/") if p]
                if parts[:len(prefix)] == prefix and (best is None
                                                      or len(parts) - len(prefix) < len(best[1])):
                    best = (real, parts[len(prefix):])
        if best is None:
            allowed = ", ".join(self.allowed) or "none configured: worker.allowed_dirs"
            raise StorageError(f"{url}: outside the allowed directories ({allowed})")
        return best

    def _open(self, url: str, flags: int, create_dirs: bool = False,
              readable: bool = False) -> int:
        root, parts = self.locate(url)
        opener = self.access()[1]
        try:
            return opener.open(root, parts, flags, create_dirs, readable)
        except RootUnusable as exc:
            raise StorageError(f"{url}: allowed directory {root}: {exc.strerror}"
                               f"{opener.as_whom}") from None
        except OSError as exc:
            raise _words(url, exc, opener.as_whom) from None

    def open_path(self, url: str, flags: int) -> int:
        """An O_PATH descriptor of url opened as a copy would open it (beneath its allowed
        root, no symlink, as the owner), whose file or directory the owner may also read
        (checked in the same step): worker.bind_inputs' opens."""
        return self._open(url, flags, readable=True)

    def child(self, url: str, name: str) -> str:
        return join_url(url, name) if url.startswith("/") else super().child(url, name)

    def get_file(self, url: str, dest: Path) -> None:
        src = self._open(url, READ_FLAGS)
        try:
            info = os.fstat(src)
            if not stat.S_ISREG(info.st_mode):
                raise StorageError(f"{url}: not a regular file")
            fcntl.fcntl(src, fcntl.F_SETFL, fcntl.fcntl(src, fcntl.F_GETFL) & ~os.O_NONBLOCK)
            if dest.is_symlink() or dest.exists():
                dest.unlink()
            if self.link and info.st_dev == os.stat(dest.parent).st_dev and link_fd(src, dest):
                return
            out = os.open(dest, WRITE_FLAGS | os.O_EXCL, 0o644)
            try:
                copy_fd(src, out)
            finally:
                os.close(out)
        finally:
            os.close(src)

    def put_file(self, src: Path, url: str) -> None:
        with src.open("rb") as fin:
            out = self._open(url, WRITE_FLAGS, create_dirs=True)
            try:
                if not stat.S_ISREG(os.fstat(out).st_mode):
                    raise StorageError(f"{url}: not a regular file")
                copy_fd(fin.fileno(), out)
            finally:
                os.close(out)

    def list(self, url: str) -> list[str]:
        root, parts = self.locate(url)
        opener = self.access()[1]
        try:
            names, link = opener.list(root, parts)
        except RootUnusable as exc:
            raise StorageError(f"{url}: allowed directory {root}: {exc.strerror}"
                               f"{opener.as_whom}") from None
        except OSError as exc:
            raise _words(url, exc, opener.as_whom) from None
        if link is not None:
            raise StorageError(f"{url}: {link} is a symbolic link ({NO_LINKS})")
        return names

    def make_dir(self, url: str) -> bool:
        """mkdir -p beneath the allowed directory, never through a symlink."""
        root, parts = self.locate(url)
        opener = self.access()[1]
        try:  # "." last: every part is made, then the last one opened as a directory
            os.close(opener.open(root, [*parts, "."], DIR_FLAGS, create_dirs=True))
        except RootUnusable as exc:
            raise StorageError(f"{url}: allowed directory {root}: {exc.strerror}"
                               f"{opener.as_whom}") from None
        except OSError as exc:
            raise _words(url, exc, opener.as_whom) from None
        return True

    def exists(self, url: str) -> bool:
        try:
            os.close(self._open(url, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))
            return True
        except StorageError:
            return False


def make_store(config: WorkerConfig, _scheme: str) -> LocalStore:
    return LocalStore(list(config.worker.allowed_dirs), config.worker.link_inputs)
