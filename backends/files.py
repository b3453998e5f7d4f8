"""Files the gateway writes into task directories, safely against what a task or user planted.

A task directory may belong to the task's owner (``submit_as_owner``), who may have put a
symlink where the gateway is about to write. So every write here:

- opens the directory itself with ``O_NOFOLLOW`` and works relative to that descriptor;
- creates a fresh temporary file with ``O_CREAT|O_EXCL|O_NOFOLLOW``, sets its mode with
  ``fchmod`` (the umask does not matter) and renames it over the name (a planted symlink
  there is replaced, never followed);
- when the directory belongs to someone else, takes it back (``fchown`` of the open
  descriptor, mode 700) first: the gateway never writes as root into a directory a user
  owns. ``give_to`` hands the directory and the files the gateway wrote over again (by
  name, each a regular file of ours with one link: never a link a user planted, hard or
  symbolic, nor a root file moved in).

Reads (``open_owned``, ``read_tail``) trust no shape either: the file is looked up
relative to the task directory's descriptor (itself opened ``O_NOFOLLOW`` from the work
dir's), must be a regular file owned by the uid the caller expects (the job's), and is
opened ``O_NOFOLLOW|O_NONBLOCK`` only after an lstat said so (a FIFO or device is never
opened), then checked again with ``fstat``. Costs: a handful of system calls per file.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600
_TMP_SUFFIX = ".tmp"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_NEW_FILE_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                   | getattr(os, "O_CLOEXEC", 0))


def private_dir(path: Path) -> None:
    """Make path (and missing parents) a directory, mode 700 and ours, whatever the umask.
    Raises OSError when path is a symlink or not a directory."""
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        pass
    except FileNotFoundError:  # a missing parent: made first (the usual case costs one call)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(path, DIR_MODE)
        except FileExistsError:
            pass
    fd = os.open(path, _DIR_FLAGS)
    try:
        _take_back(fd)
    finally:
        os.close(fd)


def _check_name(name: str) -> None:
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"not a file name: {name!r}")


def _write_all(fd: int, raw: bytes) -> None:
    view = memoryview(raw)
    while view:
        view = view[os.write(fd, view):]


def new_private_dir(path: Path, texts: dict[str, str]) -> bool:
    """Make path a new directory (mode 700, ours) holding these files (name -> text, mode
    600), as private_dir and write_private would. False, with nothing written, when path
    is there already (or a parent is missing): the caller takes the careful way. A
    directory this call made is empty and can be nobody else's (its parent is the
    gateway's), so its files are created in place, O_EXCL and following no link, through
    its descriptor: a quarter of the system calls of the careful way."""
    try:
        os.mkdir(path, DIR_MODE)
    except (FileExistsError, FileNotFoundError):
        return False
    dir_fd = os.open(path, _DIR_FLAGS)
    try:
        os.fchmod(dir_fd, DIR_MODE)  # whatever the umask
        for name, text in texts.items():
            _check_name(name)
            fd = os.open(name, _NEW_FILE_FLAGS, FILE_MODE, dir_fd=dir_fd)
            try:
                os.fchmod(fd, FILE_MODE)
                _write_all(fd, text.encode())
            finally:
                os.close(fd)
    finally:
        os.close(dir_fd)
    return True


def _take_back(fd: int, private: bool = True) -> None:
    """The open directory made ours (and 700) if someone else owns it; with private,
    700 even when it is ours already."""
    info = os.fstat(fd)
    if not stat.S_ISDIR(info.st_mode):
        raise NotADirectoryError(fd)
    theirs = info.st_uid != os.geteuid()
    if theirs:
        os.fchown(fd, os.geteuid(), os.getegid())
    if theirs or (private and stat.S_IMODE(info.st_mode) != DIR_MODE):
        os.fchmod(fd, DIR_MODE)


def write_private(directory: Path, name: str, data: str | bytes, mode: int = FILE_MODE) -> Path:
    """Write directory/name atomically with `mode` (600 by default), following no symlink;
    a directory someone else owns is taken back first (see the module's docstring), one
    of ours keeps its mode (the work dir may need o+x for owners' workers)."""
    _check_name(name)
    raw = data.encode() if isinstance(data, str) else data
    try:
        dir_fd = os.open(directory, _DIR_FLAGS)
    except FileNotFoundError:
        directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        dir_fd = os.open(directory, _DIR_FLAGS)
    try:
        _take_back(dir_fd, private=False)
        tmp = f".{name}{_TMP_SUFFIX}"
        try:
            os.unlink(tmp, dir_fd=dir_fd)  # a leftover (or planted) temp name
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode,
                     dir_fd=dir_fd)
        try:
            os.fchmod(fd, mode)
            _write_all(fd, raw)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    return directory / name


def give_to(directory: Path, uid: int, gid: int, names: Iterable[str]) -> None:
    """Hand directory to uid:gid (mode 700) with the files named that the gateway wrote in
    it, each only if it is a regular file of ours with a single link (as write_private
    makes them). Nothing else is re-owned: not a link a user planted under such a name
    (symbolic: never followed; hard: a root file linked there has two links), not a file
    of another account, not a root file a user moved in under another name. The
    directory is ours (taken back) while we look, so its entries cannot change under us;
    each file is re-owned through a descriptor opened O_NOFOLLOW and checked to be the
    entry looked at."""
    dir_fd = os.open(directory, _DIR_FLAGS)
    try:
        _take_back(dir_fd)
        ours = os.geteuid()
        for name in names:
            _check_name(name)
            try:
                info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(info.st_mode) and info.st_uid == ours and info.st_nlink == 1:
                _give_file(dir_fd, name, info, uid, gid)
        os.fchown(dir_fd, uid, gid)
    finally:
        os.close(dir_fd)


def _give_file(dir_fd: int, name: str, seen: os.stat_result, uid: int, gid: int) -> None:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0),
                 dir_fd=dir_fd)
    try:
        info = os.fstat(fd)
        if (info.st_dev, info.st_ino) == (seen.st_dev, seen.st_ino) and info.st_nlink == 1:
            os.fchown(fd, uid, gid)
    finally:
        os.close(fd)


class Refused(OSError):
    """A file of a task directory the gateway will not read; str() says what it is."""


_WORK_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)
_READ_FLAGS = (os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
               | getattr(os, "O_CLOEXEC", 0))
_APPEND_FLAGS = (os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                 | getattr(os, "O_CLOEXEC", 0))


def open_work_dir(work_dir: str | Path) -> int:
    """The work dir opened as a directory (the admin's path: links in it are followed)."""
    return os.open(work_dir, _WORK_DIR_FLAGS)


def open_subdir(dir_fd: int, name: str) -> int:
    """dir_fd/name opened as a directory, never through a link at name (OSError: ELOOP or
    ENOTDIR when it is a link or not a directory, FileNotFoundError when missing)."""
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"not a directory name: {name!r}")
    return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


def make_subdir(dir_fd: int, name: str) -> int:
    """dir_fd/name made (mode 700) when missing and opened as open_subdir does."""
    try:
        os.mkdir(name, DIR_MODE, dir_fd=dir_fd)
    except FileExistsError:
        pass
    return open_subdir(dir_fd, name)


def entry_problem(info: os.stat_result, uid: int) -> str | None:
    """Why a file with this (l)stat is not one to read as uid's, or None."""
    mode = info.st_mode
    if not stat.S_ISREG(mode):
        kinds = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                 (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                 (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))
        return next((kind for test, kind in kinds if test(mode)), "not a regular file")
    if info.st_uid != uid:
        return f"owned by uid {info.st_uid}, not {uid}"
    return None


def open_append(dir_fd: int, name: str, uid: int) -> int:
    """dir_fd/name opened for appending (made FILE_MODE when missing), never through a
    link at name nor waiting on a FIFO; Refused saying what it is unless it is a regular
    file of uid. The caller closes the descriptor."""
    fd = os.open(name, _APPEND_FLAGS, FILE_MODE, dir_fd=dir_fd)
    problem = entry_problem(os.fstat(fd), uid)
    if problem:
        os.close(fd)
        raise Refused(f"{name} is {problem}")
    return fd


def open_owned(dir_fd: int, name: str, uid: int,
               larger_than: int = -1) -> tuple[int, os.stat_result] | None:
    """dir_fd/name opened for reading when it is a regular file owned by uid: (fd, its
    fstat). None when it is missing or not larger than `larger_than` bytes (nothing new:
    not opened at all). Raises Refused saying what it is otherwise."""
    try:
        before = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    problem = entry_problem(before, uid)
    if problem:
        raise Refused(f"{name} is {problem}")
    if before.st_size <= larger_than:
        return None
    try:
        fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # swapped for a link since the lstat
            raise Refused(f"{name} is a symbolic link") from None
        raise
    info = os.fstat(fd)  # the file opened, whatever the name points at now
    problem = entry_problem(info, uid)
    if problem:
        os.close(fd)
        raise Refused(f"{name} is {problem}")
    return fd, info


def read_tail(directory: Path, name: str, uid: int, limit: int = 4096) -> str | None:
    """The last `limit` bytes of directory/name as text, or None when it is missing or not
    a regular file of uid's (a user could point it at a secret, or make it a FIFO).
    directory is a task dir: <work dir>/<task id>."""
    try:
        work_fd = open_work_dir(directory.parent)
        try:
            dir_fd = open_subdir(work_fd, directory.name)
        finally:
            os.close(work_fd)
        try:
            opened = open_owned(dir_fd, name, uid)
        finally:
            os.close(dir_fd)
    except OSError:  # Refused too: the caller leaves the file out
        return None
    if opened is None:
        return None
    fd, info = opened
    try:
        return os.pread(fd, limit, max(0, info.st_size - limit)).decode(errors="replace")
    finally:
        os.close(fd)
