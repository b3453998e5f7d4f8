"""resources.disk_gb where the worker enforces it: the task's files/ tree (inputs, outputs,
volumes, std streams) and the sandbox's own files on disk (proot's /tmp) measured while its
executors run, and the running one stopped once they hold more.

What counts is the disk the tree uses (allocated blocks, each inode once: hard links and
sparse files are not counted twice or at their apparent size), never following a symlink.
A single file is also bounded at once by RLIMIT_FSIZE (worker/limits.py); the walk catches
many files between two checks. The host's ext4 here has no project quotas enabled (a
per-task quota would need `prjquota` at mount time), so the bound is a measurement.

Cost: one walk of the tree every `worker.disk_check_seconds` (lstat per entry) in one
thread, and one at the end of each executor.
"""

from __future__ import annotations

import os
import stat
import threading

TYPE_CHECKING = False  # not typing's: importing typing costs every worker start
if TYPE_CHECKING:
    from collections.abc import Callable


def usage(roots: list[str]) -> int:
    """Bytes of disk the trees at roots use (st_blocks), each inode once, links not
    followed; entries that vanish while walking are skipped."""
    seen: set[tuple[int, int]] = set()
    total = 0
    pending = list(roots)
    while pending:
        try:
            scan = os.scandir(pending.pop())
        except OSError:
            continue
        with scan:
            for entry in scan:
                try:
                    info = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                key = (info.st_dev, info.st_ino)
                if key in seen:
                    continue
                seen.add(key)
                total += info.st_blocks * 512
                if stat.S_ISDIR(info.st_mode):
                    pending.append(entry.path)
    return total


class DiskWatch:
    """Measures a tree every `interval` seconds in a thread; over `limit` bytes it calls
    on_exceeded once, with the reason for the system logs."""

    def __init__(self, roots: list[str], limit: int, interval: float,
                 on_exceeded: Callable[[str], None]):
        self.roots = roots
        self.limit = limit
        self.interval = interval
        self.on_exceeded = on_exceeded
        self.exceeded: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> str | None:
        """Measure now; the reason when over the limit (reported once)."""
        if self.exceeded is not None:
            return self.exceeded
        used = usage(self.roots)
        if used <= self.limit:
            return None
        self.exceeded = (f"the task's files use {used} bytes of disk, over its limit of "
                         f"{self.limit} bytes (resources.disk_gb): the executor was stopped")
        self.on_exceeded(self.exceeded)
        return self.exceeded

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True, name="disk-watch")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.check() is not None:
                return
