"""Where a task's container paths live on the host, and the checks that keep them there.

Container path ``/data/in.txt`` of task T is ``<workdir>/T/files/data/in.txt`` on
the host. The directories a container sees (``mounts``) are the smallest set of
container directories covering every input, output, volume and std stream path;
each is bound from its host twin.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import re
from pathlib import Path

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
    return posixpath.normpath(path)


class TaskPaths:
    def __init__(self, task_dir: Path):
        self.task_dir = task_dir
        self.files = task_dir / "files"

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

    def mounts(self, task: dict) -> list[str]:
        """Container directories to bind, none nested in another."""
        dirs: set[str] = set()
        for item in task.get("inputs") or []:
            path = check_container_path(item["path"])
            dirs.add(path if item.get("type") == "DIRECTORY" else posixpath.dirname(path))
        for item in task.get("outputs") or []:
            path = check_container_path(item["path"])
            if WILDCARD.search(path):
                dirs.add(check_container_path(item.get("path_prefix") or "/").rstrip("/") or "/")
            else:
                dirs.add(path if item.get("type") == "DIRECTORY" else posixpath.dirname(path))
        for volume in task.get("volumes") or []:
            dirs.add(check_container_path(volume))
        for executor in task.get("executors") or []:
            for key in ("stdin", "stdout", "stderr"):
                if executor.get(key):
                    dirs.add(posixpath.dirname(check_container_path(executor[key])))
        if "/" in dirs:
            raise PathError("a task may not bind the container's root directory")
        kept: list[str] = []
        for d in sorted(dirs):
            if not any(d == k or d.startswith(k + "/") for k in kept):
                kept.append(d)
        return kept

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
        matches = []
        if not host_base.is_dir():
            return matches
        for dirpath, _dirnames, filenames in os.walk(host_base):
            for name in filenames:
                host = Path(dirpath) / name
                container = "/" + str(host.relative_to(self.files))
                if fnmatch.fnmatchcase(container, pattern) and _same_depth(container, pattern):
                    matches.append((container, host))
        return sorted(matches)


def _same_depth(path: str, pattern: str) -> bool:
    """POSIX globbing: `*` does not cross `/`, so depth must match."""
    return path.count("/") == pattern.count("/")
