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
Cost: one mkdtemp per task, one tree removal at its end (and a copy when kept).
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import stat
import tempfile
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

    def __init__(self, root: Path):
        self.root = root
        self.files = root / FILES

    @classmethod
    def make(cls, setting: str, task_id: str, environ: Mapping[str, str]) -> Scratch:
        base = expand(setting, environ)
        try:
            os.makedirs(base, mode=0o700, exist_ok=True)
            root = Path(tempfile.mkdtemp(prefix=f"funnel-{task_id}-", dir=base))
        except OSError as exc:
            raise ScratchError(f"worker.scratch_dir {base}: cannot make the task's "
                               f"directory: {exc.strerror or exc}") from None
        return cls(root)

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
        """Remove the task's directory; what could not be removed."""
        try:
            shutil.rmtree(self.root)
            return []
        except FileNotFoundError:
            return []
        except OSError:  # e.g. a directory an executor made unwritable (chmod 0)
            _make_ours(self.root)
        problems: list[str] = []

        def failed(_function: object, path: str, info: tuple[object, BaseException, object]
                   ) -> None:
            problems.append(f"{path}: {getattr(info[1], 'strerror', None) or info[1]}")

        shutil.rmtree(self.root, onerror=failed)
        return problems


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
