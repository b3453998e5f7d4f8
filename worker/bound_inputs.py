"""worker.bind_inputs: file:// inputs bound read-only by descriptor instead of copied.

An input is bound when the driver is bwrap, its URL is file:// (or a path) with no
`content`, and its path neither holds nor lies in another input, an output, a volume or an
executor's stream (those are copied as before, so outputs and stdin see real bytes). It is
opened as staging opens it (beneath its allowed root, no symlink in any component, as the
task's owner: worker/storage/local.py) with O_PATH|O_NOFOLLOW, checked on that descriptor
(a regular file or a directory; the owner may read it: a reopen of that inode in the same
step) and handed to bwrap, which mounts it read-only with ``--ro-bind-fd`` after the
task's directory binds and checks that what it mounted is that descriptor's inode. The
executor runs as an unprivileged uid, not the owner, and bwrap resolves the descriptor's
path as that uid: so only what every user may read is bound (S_IROTH on a file,
S_IROTH|S_IXOTH on a directory, S_IXOTH on every directory above it); anything else is
copied, with a system log line saying why. The host twin of a bound input is an empty
placeholder (file or directory) for the mount point.

Cost: one open and one reopen per input (in one fork for a root worker with an owner) and
a stat of each directory above it; no byte is copied.
"""

from __future__ import annotations

import os
import posixpath
import stat

from funnel_hpc.worker.failures import SystemFailure
from funnel_hpc.worker.paths import WILDCARD, check_container_path
from funnel_hpc.worker.storage import StorageError
from funnel_hpc.worker.storage.beneath import NO_LINKS

TYPE_CHECKING = False  # not typing's: importing typing costs every worker start
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

    from funnel_hpc.worker.events import EventLog
    from funnel_hpc.worker.storage import Storage

SETTING = "worker.bind_inputs"
BIND_DRIVERS = ("bwrap",)  # the drivers that can mount by descriptor
PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


class NotBindable(Exception):
    """This input is copied instead; the message says why."""


def _overlaps(path: str, other: str) -> bool:
    return path == other or path.startswith(other.rstrip("/") + "/") \
        or other.startswith(path.rstrip("/") + "/")


def _other_paths(task: dict[str, Any]) -> list[str]:
    """Container paths an input must not overlap to be bound: outputs (a wildcard's prefix),
    volumes and executors' streams."""
    paths = []
    for item in task.get("outputs") or []:
        path = item["path"]
        paths.append(item.get("path_prefix") or "/" if WILDCARD.search(path) else path)
    paths += list(task.get("volumes") or [])
    for executor in task.get("executors") or []:
        paths += [executor[key] for key in ("stdin", "stdout", "stderr") if executor.get(key)]
    return [check_container_path(path) for path in paths]


def is_file_url(url: str) -> bool:
    return url.startswith(("file://", "/"))


class Binder:
    """A task's bound inputs: chooses them, opens and checks them, holds their descriptors
    until close() (at the task's end)."""

    def __init__(self, task: dict[str, Any], storage: Storage, events: EventLog):
        self.storage = storage
        self.events = events
        self.bound: list[tuple[int, str]] = []  # (O_PATH descriptor, container path)
        inputs = [check_container_path(item["path"]) for item in task.get("inputs") or []]
        others = _other_paths(task)
        self.why_not: dict[int, str] = {}  # input index -> why it is copied
        for index, (item, path) in enumerate(zip(task.get("inputs") or [], inputs,
                                                 strict=True)):
            if item.get("content") is not None or not is_file_url(item.get("url") or ""):
                self.why_not[index] = ""  # not a file:// input: nothing to say
            elif path == "/" or any(_overlaps(path, other) for other in others) or any(
                    _overlaps(path, other) for at, other in enumerate(inputs) if at != index):
                self.why_not[index] = ("its path holds or lies in another input, an output, a "
                                       "volume or a stream")

    def bind(self, index: int, item: dict[str, Any], dest: Path) -> bool | None:
        """Bind input `index` at `dest`'s container path: its type (True: a directory), or
        None when it is to be copied (a system log line says why, where there is a why).
        A path staging would refuse (a symlink, outside allowed_dirs) is refused here."""
        if index in self.why_not:
            self._copied(item, self.why_not[index])
            return None
        url = str(item["url"])
        try:
            fd, is_dir = self._open(url)
            declared = item.get("type")
            if declared in ("FILE", "DIRECTORY") and (declared == "DIRECTORY") != is_dir:
                os.close(fd)  # as a copy refuses it
                raise StorageError(f"{url}: {'is' if is_dir else 'not'} a directory "
                                   f"(the input's type is {declared})")
        except StorageError as exc:
            raise SystemFailure(f"input {item['path']} from {exc}") from None
        except NotBindable as reason:
            self._copied(item, str(reason))
            return None
        try:
            _placeholder(dest, is_dir)
        except OSError as exc:
            os.close(fd)
            raise SystemFailure(f"input {item['path']}: cannot make its mount point {dest}: "
                                f"{exc.strerror or exc}") from None
        self.bound.append((fd, check_container_path(item["path"])))
        return is_dir

    def _copied(self, item: dict[str, Any], why: str) -> None:
        if why:
            self.events.system_log(f"input {item['path']}: copied, not bound ({SETTING}): "
                                   f"{why}")

    def _open(self, url: str) -> tuple[int, bool]:
        """The input's O_PATH descriptor, checked; NotBindable says why it is copied."""
        from funnel_hpc.worker.storage.local import LocalStore

        store = self.storage.store(url)
        if not isinstance(store, LocalStore):
            raise NotBindable("not a local file")
        fd = store.open_path(url, PATH_FLAGS)  # the owner may read it: checked there
        try:
            info = os.fstat(fd)
            if stat.S_ISLNK(info.st_mode):  # O_PATH|O_NOFOLLOW opens a final link itself
                raise StorageError(f"{url}: a path component is a symbolic link ({NO_LINKS})")
            if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
                raise StorageError(f"{url}: not a regular file or a directory")
            is_dir = stat.S_ISDIR(info.st_mode)
            _check_everyone_reads(fd, info, is_dir)
        except BaseException:
            os.close(fd)
            raise
        return fd, is_dir

    def close(self) -> None:
        for fd, _container in self.bound:
            os.close(fd)
        self.bound = []


def _check_everyone_reads(fd: int, info: os.stat_result, is_dir: bool) -> None:
    """The rule: the executor's uid (not the owner) reads a bound input, and bwrap resolves
    its path as that uid, so everyone must be able to read it and reach it."""
    need = stat.S_IROTH | (stat.S_IXOTH if is_dir else 0)
    if info.st_mode & need != need:
        raise NotBindable(f"not readable by every user (mode {stat.filemode(info.st_mode)}), "
                          "and the task runs as an unprivileged uid, not its owner")
    where = os.readlink(f"/proc/self/fd/{fd}")
    if not where.startswith("/"):
        raise NotBindable(f"its path is not reachable from here ({where})")
    parent = posixpath.dirname(where)
    while True:
        mode = os.stat(parent).st_mode
        if not mode & stat.S_IXOTH:
            raise NotBindable(f"{parent} above it is not searchable by every user")
        if parent == "/":
            return
        parent = posixpath.dirname(parent)


def _placeholder(dest: Path, is_dir: bool) -> None:
    """The empty mount point in the task's files/ tree (never through a symlink: its parent
    was made by the worker; a leftover of an earlier attempt is replaced)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        dest.unlink()
    if is_dir:
        dest.mkdir(exist_ok=True)
        if any(dest.iterdir()):
            raise OSError(0, "an earlier attempt left files there")
    else:
        if dest.is_dir():
            dest.rmdir()
        os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o444))
