"""Helpers for the task-limit tests: real local users, the host's view of a task's processes
and cgroups, the host's shared memory, and whether this machine has the cgroup features a
test needs (missing under CI fails, elsewhere skips with the reason)."""

from __future__ import annotations

import glob
import os
import secrets
import subprocess

from funnel_hpc.worker import cgroups
from tests.components import need


def make_user(prefix: str) -> str:
    name = f"fh{prefix}{secrets.token_hex(3)}"
    subprocess.run(["useradd", "-M", "-U", "-s", "/usr/sbin/nologin", name], check=True)
    return name


def remove_user(name: str) -> None:
    subprocess.run(["userdel", name], check=True)


def processes_with(marker: str) -> list[int]:
    """Host pids whose command line holds marker (a task's unique sleep argument)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                words = fh.read().split(b"\0")
        except OSError:
            continue
        if marker.encode() in words:
            found.append(int(entry))
    return found


def task_groups(task_id: str, parent: str = "funnel-hpc") -> list[str]:
    """The task's cgroup directories, in every hierarchy of the host."""
    return [path for hierarchy in cgroups.discover()
            for path in glob.glob(os.path.join(hierarchy.mount, parent, f"{task_id}@*"))]


def group_pids(task_id: str) -> set[int]:
    pids: set[int] = set()
    for path in task_groups(task_id):
        try:
            with open(os.path.join(path, "cgroup.procs")) as fh:
                pids.update(int(word) for word in fh.read().split())
        except OSError:
            pass
    return pids


def shmem_bytes() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no Shmem line in /proc/meminfo")


def need_cgroups(*controllers: str) -> None:
    """Root and the cgroup controllers named (v2 or v1); CI fails where they are missing."""
    reason = None
    if os.geteuid() != 0:
        reason = "the worker must be root to make cgroups"
    else:
        _unified, where = cgroups.plan_hierarchies(cgroups.discover())
        missing = [c for c in controllers if c not in where]
        if missing:
            reason = f"no cgroup controller {', '.join(missing)} mounted on this host"
    if reason:
        need("cgroups", False, reason)


class Peak:
    """The largest value measure() returned while the block ran, sampled in a thread every
    `interval` seconds (`with Peak(f) as peak: ...; peak.value`)."""

    def __init__(self, measure, interval: float = 0.05):
        import threading

        self.measure = measure
        self.interval = interval
        self.value = measure()
        self.samples = 1
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            self.value = max(self.value, self.measure())
            self.samples += 1

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._done.set()
        self._thread.join()
