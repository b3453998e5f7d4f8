"""The local backend's queue: jobs submitted and not started yet, in one journal file.

``<work_dir>/local-queue.jsonl`` (600, opened without following a link), one JSON line
per change:

- ``{"op": "submit", "id", "argv", "t", "files": {name: text}}``  queued; files: what the
  gateway writes in the task dir, written there when the job starts (a queued job has no
  directory)
- ``{"op": "start", "id"}``   left the queue; its task dir holds its state from now on
- ``{"op": "cancel", "id", "t"}``  canceled while queued: it never starts

Replayed once when the backend is made, then kept in memory: a queued job costs a dict
entry to poll and one line on disk. Each change is written at once (a killed gateway
loses nothing); a start is fsync'd before its worker runs, the rest once per poll (a
power cut loses at most the last tick's submissions, then LOST). The file is rewritten
with only the live lines when the dead ones outnumber them (and at load).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

QUEUE_FILE = "local-queue.jsonl"
LOCK_FILE = "local-queue.lock"
SUBMIT, START, CANCEL = "submit", "start", "cancel"
# a cancel is remembered this long (the reconciler reads it within a tick or two)
CANCEL_MEMORY_SECONDS = 86400.0
COMPACT_AT_LEAST = 1000  # dead lines before a rewrite is worth it
_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class QueuedJob:
    """One submitted job that has not started."""

    argv: list[str]
    submitted: float
    files: dict[str, str] = field(default_factory=dict)


class JobQueue:
    """The FIFO of queued jobs and the cancels of never-started ones, journaled.

    Every change holds an flock on ``local-queue.lock`` and first re-reads the file if
    another process changed it (its inode or size is not what this one left): a second
    gateway process on the same work dir (a replica taking the lease over, or a stalled
    one coming back) never acts on a stale queue, and a rewrite loses no one's line."""

    def __init__(self, work_dir: Path):
        self.path = work_dir / QUEUE_FILE
        self.queued: dict[str, QueuedJob] = {}   # insertion order is submission order
        self.canceled: dict[str, float] = {}     # job id -> time of the cancel
        self.dead = 0                            # lines of the file no longer live
        self.dirty = False                       # written since the last fsync
        self.fd = -1
        self.seen = (0, -1)                      # (inode, size) as this process left it
        work_dir.mkdir(parents=True, exist_ok=True)
        self.lock_fd = os.open(work_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
                               | os.O_CLOEXEC, 0o600)
        with self._locked():
            self._reload()
            self._rewrite()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.flock(self.lock_fd, fcntl.LOCK_EX)
        try:
            if self._changed_elsewhere():
                self._reload()
            yield
        finally:
            fcntl.flock(self.lock_fd, fcntl.LOCK_UN)

    # ---- changes ----

    def refresh(self) -> None:
        """Catch up with what another process wrote (a stat when nothing changed)."""
        with self._locked():
            pass

    def add(self, job_id: str, argv: list[str], files: dict[str, str]) -> None:
        """Queue job_id (at the end; a job queued again loses its old place)."""
        job = QueuedJob(list(argv), time.time(), dict(files))
        with self._locked():
            self._append({"op": SUBMIT, "id": job_id, "argv": job.argv, "t": job.submitted,
                          "files": job.files})
            self.dead += self._drop(job_id)
            self.queued[job_id] = job

    def next_id(self) -> str | None:
        return next(iter(self.queued), None)

    def take(self, job_id: str) -> QueuedJob | None:
        """The job leaves the queue to start: recorded on disk (fsync'd) before it runs.
        None if it is no longer queued (another process started or canceled it)."""
        with self._locked():
            if job_id not in self.queued:
                return None
            self._append({"op": START, "id": job_id})
            self.sync()
            job = self.queued.pop(job_id)
            self.dead += 2  # its submit line and this one
            self._compact_if_worth_it()
        return job

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued job: True if it was queued (it will never start)."""
        with self._locked():
            if job_id not in self.queued:
                return False
            now = time.time()
            self._append({"op": CANCEL, "id": job_id, "t": now})
            del self.queued[job_id]
            self.dead += 1
            self.canceled[job_id] = now
            self._compact_if_worth_it()
        return True

    def sync(self) -> None:
        if self.dirty:
            os.fsync(self.fd)
            self.dirty = False

    def close(self) -> None:
        self.sync()
        os.close(self.fd)
        os.close(self.lock_fd)

    # ---- the file ----

    def _append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        view = memoryview(line)
        while view:
            view = view[os.write(self.fd, view):]
        self.dirty = True
        self.seen = (self.seen[0], self.seen[1] + len(line))

    def _changed_elsewhere(self) -> bool:
        try:
            info = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return True
        return (info.st_ino, info.st_size) != self.seen

    def _reload(self) -> None:
        """Forget what this process knew; replay the file and append to it from now."""
        if self.fd >= 0:
            os.close(self.fd)
        self.queued, self.canceled, self.dead = {}, {}, 0
        self._load()
        self._open()

    def _open(self) -> None:
        self.fd = os.open(self.path, _FLAGS, 0o600)
        info = os.fstat(self.fd)
        self.seen = (info.st_ino, info.st_size)

    def _drop(self, job_id: str) -> int:
        """Forget what is known of job_id; the number of live lines that died."""
        dropped = int(self.queued.pop(job_id, None) is not None)
        return dropped + int(self.canceled.pop(job_id, None) is not None)

    def _load(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        with os.fdopen(fd, "rb") as handle:
            for raw in handle:
                try:
                    record = json.loads(raw)
                    self._replay(record)
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by a crash in the middle of a write

    def _replay(self, record: dict[str, Any]) -> None:
        job_id, op = str(record["id"]), record["op"]
        if op == SUBMIT:
            self._drop(job_id)
            self.queued[job_id] = QueuedJob([str(word) for word in record["argv"]],
                                            float(record["t"]),
                                            {str(k): str(v) for k, v in
                                             dict(record.get("files") or {}).items()})
        elif op == START:
            self._drop(job_id)
        elif op == CANCEL:
            self._drop(job_id)
            self.canceled[job_id] = float(record["t"])

    def _compact_if_worth_it(self) -> None:
        if self.dead >= max(COMPACT_AT_LEAST, len(self.queued) + len(self.canceled)):
            self.sync()
            self._rewrite()

    def _rewrite(self) -> None:
        """The file again with only the live lines, replaced atomically (fsync'd)."""
        old = time.time() - CANCEL_MEMORY_SECONDS
        self.canceled = {job_id: at for job_id, at in self.canceled.items() if at > old}
        tmp = self.path.with_name(f".{QUEUE_FILE}.tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with os.fdopen(fd, "wb") as handle:
            for job_id, job in self.queued.items():
                handle.write((json.dumps({"op": SUBMIT, "id": job_id, "argv": job.argv,
                                          "t": job.submitted, "files": job.files},
                                         separators=(",", ":")) + "\n").encode())
            for job_id, at in self.canceled.items():
                handle.write((json.dumps({"op": CANCEL, "id": job_id, "t": at},
                                         separators=(",", ":")) + "\n").encode())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
        self.dead = 0
        self.dirty = False
        if self.fd >= 0:
            os.close(self.fd)
        self._open()
