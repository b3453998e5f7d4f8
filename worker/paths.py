"""Where a task's container paths live on the host, and the checks that keep them there.

Container path ``/data/in.txt`` of task T is ``<workdir>/T/files/data/in.txt`` on
the host (``<scratch>/files/data/in.txt`` with worker.scratch_dir: worker/scratch.py).
The directories a container sees (``mounts``) are the smallest set of
container directories covering every input, output, volume and std stream path;
each is bound from its host twin.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import re
from pathlib import Path

TYPE_CHECKING = False  # not typing's: importing typing costs every worker start
if TYPE_CHECKING:
    from typing import Any

WILDCARD = re.compile(r"[*?\[]")


class PathError(ValueError):
    """A path that is not absolute, climbs out with `..`, or leaves the task dir."""


def check_container_path(path: str) -> str:
    if not isinstance(path, str) or not path.startswith("/"):
        raise PathError(f"container path must be absolute: {path!r}")
    if "\x00" in path or any(ord(c) < 32 for c in path):
        raise PathError(f"container path has control characters: {path!r}")
    if ".." in path.split("/"):
        raise PathError(f"container path must not contain '..': {path!r}")
    return "/" + posixpath.normpath(path).lstrip("/")  # normpath keeps a leading "//"


class TaskPaths:
    """A task's container paths on the host, under `files` (default: task_dir/files)."""

    def __init__(self, task_dir: Path, files: Path | None = None):
        self.task_dir = task_dir
        self.files = files if files is not None else task_dir / "files"

    def host(self, container_path: str) -> Path:
        """Host twin of a container path; refuses anything that would leave files/."""
        clean = check_container_path(container_path)
        host = self.files / clean.lstrip("/")
        self.ensure_inside(host)
        return host

    def ensure_inside(self, host: Path) -> None:
        """Resolve symlinks of the existing part of `host`; it must stay under files/."""
        root = os.path.realpath(self.files)
        real = os.path.realpath(host)
        if real != root and not real.startswith(root + os.sep):
            raise PathError(f"{host} resolves outside the task directory")

    def mounts(self, task: dict[str, Any]) -> list[str]:
        """Container paths to bind, none nested in another: the directories holding the
        task's inputs, outputs, volumes and streams, except that a file directly under
        `/` is bound itself (see top_level). The root itself is never bound."""
        paths: set[str] = set()
        for item in task.get("inputs") or []:
            paths.add(_bind_path(check_container_path(item["path"]),
                                 item.get("type") == "DIRECTORY"))
        for item in task.get("outputs") or []:
            path = check_container_path(item["path"])
            if WILDCARD.search(path):
                paths.add(check_container_path(item.get("path_prefix") or "/").rstrip("/")
                          or "/")
            else:
                paths.add(_bind_path(path, item.get("type") == "DIRECTORY"))
        for volume in task.get("volumes") or []:
            paths.add(check_container_path(volume))
        for executor in task.get("executors") or []:
            for key in ("stdin", "stdout", "stderr"):
                if executor.get(key):
                    paths.add(_bind_path(check_container_path(executor[key]), False))
        if "/" in paths:
            raise PathError("a task may not bind the container's root directory (a volume "
                            "or directory at /, or a wildcard output with path_prefix /)")
        kept: list[str] = []
        for path in sorted(paths):
            if not any(path == k or path.startswith(k + "/") for k in kept):
                kept.append(path)
        return kept

    @staticmethod
    def top_level(task: dict[str, Any]) -> dict[str, str]:
        """Files directly under `/` (bound one by one: see mounts) -> "input" (an input or
        stdin: staged there) or "output" (an output or stdout/stderr: made empty before the
        executors start, so that there is something to bind). Volumes are not files."""
        roles: dict[str, str] = {}
        outputs = [item["path"] for item in task.get("outputs") or []
                   if item.get("type") != "DIRECTORY" and not WILDCARD.search(item["path"])]
        inputs = [item["path"] for item in task.get("inputs") or []
                  if item.get("type") != "DIRECTORY"]
        for executor in task.get("executors") or []:
            outputs += [executor[key] for key in ("stdout", "stderr") if executor.get(key)]
            inputs += [executor["stdin"]] if executor.get("stdin") else []
        for role, paths in (("output", outputs), ("input", inputs)):  # input wins
            for path in paths:
                clean = check_container_path(path)
                if posixpath.dirname(clean) == "/":
                    roles[clean] = role
        for volume in task.get("volumes") or []:
            roles.pop(check_container_path(volume), None)
        return roles

    def glob(self, pattern: str) -> list[tuple[str, Path]]:
        """(container path, host path) of files matching a POSIX wildcard pattern."""
        pattern = check_container_path(pattern)
        fixed = []
        for part in pattern.split("/")[1:]:
            if WILDCARD.search(part):
                break
            fixed.append(part)
        base = "/" + "/".join(fixed)
        host_base = self.host(base)
        matches: list[tuple[str, Path]] = []
        if not host_base.is_dir():
            return matches
        for dirpath, _dirnames, filenames in os.walk(host_base):
            for name in filenames:
                host = Path(dirpath) / name
                container = "/" + str(host.relative_to(self.files))
                if fnmatch.fnmatchcase(container, pattern) and _same_depth(container, pattern):
                    matches.append((container, host))
        return sorted(matches)


def _bind_path(path: str, is_dir: bool) -> str:
    """What to bind for an item at `path`: itself if a directory, else its directory,
    unless that is `/` (which is never bound): then the file itself."""
    if is_dir:
        return path
    parent = posixpath.dirname(path)
    return path if parent == "/" else parent


def _same_depth(path: str, pattern: str) -> bool:
    """POSIX globbing: `*` does not cross `/`, so depth must match."""
    return path.count("/") == pattern.count("/")


KEEP_WORKDIR = ("never", "on_failure", "always")


def remove_task_files(task_dir: Path, names: tuple[str, ...], prefixes: tuple[str, ...] = ()
                      ) -> list[str]:
    """Remove what the worker made in an ended task's directory: the entries `names` and
    those starting with one of `prefixes` (never following a symlink). The event log,
    task.json, the token and the backend's files stay. Returns what could not be removed."""
    import shutil

    problems: list[str] = []

    def failed(_function: object, path: str, info: tuple[object, BaseException, object]) -> None:
        problems.append(f"{path}: {getattr(info[1], 'strerror', None) or info[1]}")

    for entry in sorted(os.listdir(task_dir)):
        if entry in names or any(entry.startswith(p) for p in prefixes):
            path = task_dir / entry
            if path.is_symlink() or not path.is_dir():
                path.unlink()
            else:
                shutil.rmtree(path, onerror=failed)
    return problems
