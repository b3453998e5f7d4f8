"""Opening and listing beneath an allowed root, never through a symbolic link.

One ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`` call where the kernel has it (Linux
5.6+), else a walk opening each component with O_NOFOLLOW from the root's descriptor;
bytes copied between descriptors (reflink, else copy_file_range). ``Opener`` does it with
this process's rights; owner_access.py's opener does it as a task's owner. A leaf of the
storage package: the file store (local.py) and owner_access.py both build on it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

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


def open_in(root: str, parts: list[str], flags: int, create_dirs: bool = False,
            readable: bool = False) -> int:
    """open_beneath from the allowed directory root (which the admin may have made a link).
    readable: an O_PATH open whose file or directory this process may also read."""
    try:
        rootfd = os.open(root, DIR_FLAGS & ~os.O_NOFOLLOW)
    except OSError as exc:
        raise RootUnusable(exc.errno, exc.strerror, root) from None
    try:
        fd = open_beneath(rootfd, parts, flags, create_dirs=create_dirs)
    finally:
        os.close(rootfd)
    if readable:
        try:
            check_readable(fd)
        except OSError:
            os.close(fd)
            raise
    return fd


def check_readable(fd: int) -> None:
    """Raise EACCES unless this process may read the regular file or directory fd is
    (O_PATH checked only the way there): a reopen of that very inode through
    /proc/self/fd, never a path walk. Other types are left to the caller to refuse."""
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        extra = os.O_DIRECTORY if stat.S_ISDIR(mode) else os.O_NONBLOCK
        os.close(os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC | extra))


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

    def open(self, root: str, parts: list[str], flags: int, create_dirs: bool = False,
             readable: bool = False) -> int:
        return open_in(root, parts, flags, create_dirs, readable)

    def list(self, root: str, parts: list[str]) -> tuple[list[str], str | None]:
        return list_in(root, parts)
