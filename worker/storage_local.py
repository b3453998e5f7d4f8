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

from funnel_hpc.worker.storage import StorageError, Store, join_url

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from funnel_hpc.core.config import WorkerConfig

FICLONE = 0x40049409  # ioctl: share the source's blocks copy-on-write (Linux)
SYS_OPENAT2 = 437  # the same number on every Linux architecture
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
AT_FDCWD, AT_EMPTY_PATH = -100, 0x1000
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # a FIFO never blocks
WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC

USER = "{user}"  # in an allowed_dirs entry: the task owner's local account name
NO_LINKS = ("refused: file:// paths are opened without following symlinks, which could lead "
            "outside the allowed directories")
# None: not probed yet; False: this kernel (or seccomp policy) has no openat2
_openat2_works: list[bool | None] = [None]


_libc: list[Any] = []


def libc() -> Any:
    """This process's C library (ctypes), loaded once."""
    if not _libc:
        import ctypes

        handle = ctypes.CDLL(None, use_errno=True)
        handle.syscall.restype = ctypes.c_long
        _libc.append(handle)
    return _libc[0]


def _openat2(dirfd: int, relative: str, flags: int, mode: int = 0) -> int | None:
    """openat2 beneath dirfd without symlinks; None when the kernel lacks it."""
    if _openat2_works[0] is False:
        return None
    import ctypes

    class OpenHow(ctypes.Structure):
        _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                    ("resolve", ctypes.c_uint64)]

    how = OpenHow(flags, mode, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)
    syscall = libc().syscall
    for _ in range(8):  # EAGAIN: a rename raced the lookup; the kernel asks us to retry
        fd = syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(dirfd),
                          ctypes.c_char_p(os.fsencode(relative)), ctypes.byref(how),
                          ctypes.c_size_t(ctypes.sizeof(how)))
        if fd >= 0:
            _openat2_works[0] = True
            return int(fd)
        code = ctypes.get_errno()
        if code in (errno.ENOSYS, errno.EPERM) and _openat2_works[0] is None:
            _openat2_works[0] = False  # EPERM: a seccomp filter refusing unknown syscalls
            return None
        if code != errno.EAGAIN:
            raise OSError(code, os.strerror(code), relative)
    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN), relative)


def open_beneath(rootfd: int, parts: list[str], flags: int, mode: int = 0o666,
                 create_dirs: bool = False) -> int:
    """Open root/parts[0]/.../parts[-1] with no symlink anywhere on the way."""
    if not parts:
        return os.open(".", flags & ~(os.O_CREAT | os.O_TRUNC | os.O_WRONLY), dir_fd=rootfd)
    if not create_dirs:
        fd = _openat2(rootfd, "/".join(parts), flags, mode if flags & os.O_CREAT else 0)
        if fd is not None:
            return fd
    dirfd = os.dup(rootfd)
    try:
        for part in parts[:-1]:
            if create_dirs:
                try:
                    os.mkdir(part, 0o777, dir_fd=dirfd)
                except FileExistsError:
                    pass
            child = _open_nofollow(part, DIR_FLAGS, 0, dirfd)
            os.close(dirfd)
            dirfd = child
        return _open_nofollow(parts[-1], flags | os.O_NOFOLLOW, mode, dirfd)
    finally:
        os.close(dirfd)


def _open_nofollow(name: str, flags: int, mode: int, dirfd: int) -> int:
    """os.open relative to dirfd; a symlink is ELOOP whatever the flags (O_DIRECTORY
    makes it ENOTDIR)."""
    try:
        return os.open(name, flags, mode, dir_fd=dirfd)
    except NotADirectoryError:
        if stat.S_ISLNK(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode):
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), name) from None
        raise


def copy_fd(src: int, dest: int) -> None:
    """Reflink src into dest when the file system can, else copy in the kernel."""
    try:
        fcntl.ioctl(dest, FICLONE, src)
        return
    except OSError:
        pass  # not supported here (ext4, tmpfs, NFS, across file systems)
    try:
        while os.copy_file_range(src, dest, 1 << 30):
            pass
        return
    except OSError:
        os.ftruncate(dest, 0)  # e.g. an old kernel across file systems: start again
        os.lseek(src, 0, os.SEEK_SET)
        os.lseek(dest, 0, os.SEEK_SET)
    while chunk := os.read(src, 1 << 20):
        os.write(dest, chunk)


def link_fd(fd: int, dest: Path) -> bool:
    """Hard-link the open file fd (not whatever its name holds now) as dest; False when
    this system will not (linkat AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH before Linux
    6.10; protected_hardlinks; another mount of the same file system)."""
    if libc().linkat(fd, b"", AT_FDCWD, os.fsencode(dest), AT_EMPTY_PATH) == 0:
        return True
    try:
        os.link(f"/proc/self/fd/{fd}", dest, follow_symlinks=True)
        return True
    except OSError:
        return False


def clone_or_copy(src: Path, dest: Path) -> None:
    """Reflink or copy one file by path (both trusted: the task's own directory)."""
    with src.open("rb") as fin, dest.open("wb") as fout:
        copy_fd(fin.fileno(), fout.fileno())


class RootUnusable(OSError):
    """The allowed directory itself could not be opened."""


def open_in(root: str, parts: list[str], flags: int, create_dirs: bool = False) -> int:
    """open_beneath from the allowed directory root (which the admin may have made a link)."""
    try:
        rootfd = os.open(root, DIR_FLAGS & ~os.O_NOFOLLOW)
    except OSError as exc:
        raise RootUnusable(exc.errno, exc.strerror, root) from None
    try:
        return open_beneath(rootfd, parts, flags, create_dirs=create_dirs)
    finally:
        os.close(rootfd)


def list_in(root: str, parts: list[str]) -> tuple[list[str], str | None]:
    """(regular files under root/parts, and "name/" for each empty directory there,
    relative and sorted; the first symlink met or None)."""
    top = open_in(root, parts, DIR_FLAGS)
    names = []
    try:
        # fwalk opens each directory with O_NOFOLLOW relative to its parent's descriptor
        # (a symlink is never in dirs: it is listed with the files, and refused below)
        for dirpath, dirs, files, dirfd in os.fwalk(".", dir_fd=top):
            if not dirs and not files and dirpath != ".":
                names.append(os.path.normpath(dirpath) + "/")
            for name in files:
                try:
                    mode = os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode
                except OSError:
                    continue
                name = os.path.normpath(os.path.join(dirpath, name))
                if stat.S_ISLNK(mode):
                    return [], name
                if stat.S_ISREG(mode):  # not FIFOs, sockets or devices
                    names.append(name)
    finally:
        os.close(top)
    return sorted(names), None


class Opener:
    """Opens and lists beneath allowed roots with this process's own rights."""

    as_whom = ""  # said after a refusal: whose rights were checked

    def open(self, root: str, parts: list[str], flags: int, create_dirs: bool = False) -> int:
        return open_in(root, parts, flags, create_dirs)

    def list(self, root: str, parts: list[str]) -> tuple[list[str], str | None]:
        return list_in(root, parts)


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
                    from funnel_hpc.worker.owner_access import access_for

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

    def _open(self, url: str, flags: int, create_dirs: bool = False) -> int:
        root, parts = self.locate(url)
        opener = self.access()[1]
        try:
            return opener.open(root, parts, flags, create_dirs)
        except RootUnusable as exc:
            raise StorageError(f"{url}: allowed directory {root}: {exc.strerror}"
                               f"{opener.as_whom}") from None
        except OSError as exc:
            raise _words(url, exc, opener.as_whom) from None

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
