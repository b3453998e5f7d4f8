"""worker.scratch_dir: node-local scratch for what a task's executors read and write.

With it set, the task's files/ tree (inputs, outputs, volumes, std streams: every bound
directory, so an executor workdir among them too) and the sandbox's own files (proot's
/tmp, ch-run's roots) live in a private directory made under it, not in the task
directory on the shared work dir. Inputs are staged there and outputs uploaded from
there; it is removed when the task ends, whatever the outcome. What worker.keep_workdir
keeps is first copied back to the task directory's files/.

``$VAR`` and ``${VAR}`` are the worker's own environment variables (``$TMPDIR``, set per
job by many schedulers); nothing else is expanded (no ``~``, no commands). A variable
that is unset or empty leaves the task in the work dir (said in its system logs).

Nothing in scratch can be redirected: the base and every directory above it must be real
directories (no symlinks: each is opened O_NOFOLLOW from the one above) owned by root or
the worker's user and not writable by group or others unless sticky (/tmp), so nobody
else can rename or replace what the worker makes there. The task's directory is made
relative to the base's descriptor under a random name, opened O_NOFOLLOW and fstat'ed
(ours, 0700) before use, and removed relative to the base's descriptor, never through a
link. Cost: one open per path component, one mkdir per task, one tree removal at its end
(and a copy when kept).
"""

from __future__ import annotations

import errno
import os
import posixpath
import re
import shutil
import stat
from pathlib import Path

from funnel_hpc.worker.failures import SystemFailure

TYPE_CHECKING = False  # not typing's: importing typing costs every worker start
if TYPE_CHECKING:
    from collections.abc import Mapping

VARIABLE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
FILES = "files"  # the task's container paths, as in the task directory (worker/paths.py)


class ScratchError(SystemFailure):
    """worker.scratch_dir cannot be used as set: the task ends SYSTEM_ERROR."""


class Unset(Exception):
    """A variable worker.scratch_dir names is not set here (the task stays in the work dir)."""


def expand(setting: str, environ: Mapping[str, str]) -> str:
    """The directory worker.scratch_dir names here: variables replaced, absolute, no '..'.
    Raises Unset for a variable unset or empty, ScratchError for a malformed setting."""
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        found = environ.get(name, "")
        if not found:
            raise Unset(f"worker.scratch_dir {setting!r}: ${name} is not set on this node")
        return found

    if "$" in VARIABLE.sub("", setting):
        raise ScratchError(f"worker.scratch_dir {setting!r}: '$' must start $NAME or ${{NAME}}")
    path = VARIABLE.sub(value, setting)
    if any(ord(char) < 32 for char in path):
        raise ScratchError(f"worker.scratch_dir {setting!r} has control characters")
    if not path.startswith("/"):
        raise ScratchError(f"worker.scratch_dir {setting!r} is not an absolute path here "
                           f"({path!r})")
    if ".." in path.split("/"):
        raise ScratchError(f"worker.scratch_dir {setting!r} must not contain '..' ({path!r})")
    return "/" + posixpath.normpath(path).lstrip("/")


class Scratch:
    """One task's private directory in scratch: made 0700 under a name nobody could have
    planted (scratch dirs such as /tmp are shared), removed by remove()."""

    def __init__(self, root: Path, base_fd: int, name: str, identity: tuple[int, int]):
        self.root = root
        self.files = root / FILES
        self.base_fd = base_fd  # the checked base, held open: removal is relative to it
        self.name = name
        self.identity = identity  # (st_dev, st_ino) of the task's directory

    @classmethod
    def make(cls, setting: str, task_id: str, environ: Mapping[str, str]) -> Scratch:
        base = expand(setting, environ)
        base_fd = open_base(base)
        try:
            name, identity = _make_private(base_fd, f"funnel-{task_id}-")
        except OSError as exc:
            os.close(base_fd)
            raise ScratchError(f"worker.scratch_dir {base}: cannot make the task's "
                               f"directory: {exc.strerror or exc}") from None
        return cls(Path(base) / name, base_fd, name, identity)

    def copy_back(self, task_dir: Path) -> list[str]:
        """Copy files/ into task_dir/files (symlinks as symlinks); what could not be."""
        if not self.files.is_dir():
            return []
        try:
            shutil.copytree(self.files, task_dir / FILES, symlinks=True, dirs_exist_ok=True)
        except shutil.Error as exc:  # one entry per file that failed, the copy went on
            return [f"{entry[0]}: {entry[2]}" for entry in exc.args[0]]
        except OSError as exc:
            return [f"{exc.filename}: {exc.strerror or exc}"]
        return []

    def remove(self) -> list[str]:
        """Remove the task's directory (relative to the base's descriptor, never following
        a link); what could not be removed."""
        try:
            return self._remove()
        finally:
            os.close(self.base_fd)

    def _remove(self) -> list[str]:
        try:
            info = os.lstat(self.name, dir_fd=self.base_fd)
        except FileNotFoundError:
            return []
        if (info.st_dev, info.st_ino) != self.identity:  # cannot happen in a checked base
            return [f"{self.root}: no longer the task's directory: left alone"]
        try:
            shutil.rmtree(self.name, dir_fd=self.base_fd)
            return []
        except FileNotFoundError:
            return []
        except OSError:  # e.g. a directory an executor made unwritable (chmod 0)
            _make_ours(self.root)
        problems: list[str] = []

        def failed(_function: object, path: str, info: tuple[object, BaseException, object]
                   ) -> None:
            problems.append(f"{path}: {getattr(info[1], 'strerror', None) or info[1]}")

        shutil.rmtree(self.name, onerror=failed, dir_fd=self.base_fd)
        return problems


def open_base(base: str) -> int:
    """A descriptor of the scratch base, made (0700) where missing, each component opened
    O_NOFOLLOW from the one above and checked: see the module's docstring."""
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    walked = ""
    try:
        _check_directory(fd, "/", base)
        for part in [p for p in base.split("/") if p]:
            walked += "/" + part
            try:
                os.mkdir(part, 0o700, dir_fd=fd)
            except FileExistsError:
                pass
            try:
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                dir_fd=fd)
            except OSError as exc:
                kind = "a symlink" if exc.errno == errno.ELOOP else "not usable"
                if exc.errno == errno.ENOTDIR:
                    kind = "a symlink or not a directory"
                raise ScratchError(f"worker.scratch_dir {base}: {walked} is {kind} "
                                   f"({exc.strerror}); scratch must be a real directory") \
                    from None
            os.close(fd)
            fd = child
            _check_directory(fd, walked, base)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_directory(fd: int, path: str, base: str) -> None:
    """Owned by root or the worker's user, not writable by group/others unless sticky."""
    info = os.fstat(fd)
    if info.st_uid not in (0, os.geteuid()):
        raise ScratchError(f"worker.scratch_dir {base}: {path} is owned by uid {info.st_uid}, "
                           "not root or the worker's user: its owner could redirect the "
                           "worker's writes")
    if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
        raise ScratchError(f"worker.scratch_dir {base}: {path} is writable by group or "
                           f"others (mode {stat.S_IMODE(info.st_mode):o}) and not sticky")


def _make_private(base_fd: int, prefix: str) -> tuple[str, tuple[int, int]]:
    """mkdir prefix+random (0700) relative to base_fd; its name and (st_dev, st_ino)."""
    for _attempt in range(100):
        name = prefix + os.urandom(6).hex()
        try:
            os.mkdir(name, 0o700, dir_fd=base_fd)
        except FileExistsError:  # planted, or a rare collision: another name
            continue
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=base_fd)
        try:
            info = os.fstat(fd)
        finally:
            os.close(fd)
        if info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) & 0o077:
            raise OSError(errno.EPERM, f"{name} is not the worker's private directory")
        return name, (info.st_dev, info.st_ino)
    raise OSError(errno.EEXIST, "100 names taken")


def _make_ours(root: Path) -> None:
    """Give every directory under root (never through a symlink) rwx for its owner, so
    that a worker that is not root can empty what its executors locked."""
    for dirpath, dirnames, _files in os.walk(root):
        for name in dirnames:
            path = os.path.join(dirpath, name)
            try:
                if stat.S_ISDIR(os.lstat(path).st_mode):
                    os.chmod(path, 0o700)
            except OSError:
                continue  # rmtree names it
