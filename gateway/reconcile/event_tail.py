"""Incremental reading of a task attempt's worker event logs, for the reconciler.

Two logs per attempt: the worker's own ``events.jsonl`` in the task dir (which, with
``submit_as_owner``, the task's owner holds and may have reshaped) and the copy the event
intake received over HTTP, ``events.received.jsonl`` in ``<work_dir>/.gateway/<task id>/``
(700, the gateway's: no user can write there; gateway/web/events_routes.py appends to it).

Nothing a user holds is trusted: the task dir is opened ``O_NOFOLLOW`` from the work
dir's descriptor, and a log is read only when it is a regular file of the job's uid
(``Backend.job_uid``: the owner's with ``submit_as_owner``, else the gateway's), never
through a link, never a FIFO (backends/files.py ``open_owned``); a refusal is a note on
the task (``notes``), once per change. Reads are bounded: whole lines only, ``CHUNK``
bytes at a time and ``PASS_BYTES`` per file per call (``behind`` says more is waiting); a
line longer than the longest event is skipped (holes of a sparse file are seeked over)
with a note, and never read again. Events naming another task are dropped with a note.
Every line is untrusted (``core.events.parse_line`` and ``EventFold`` skip and count what
is not a well-formed event, and de-duplicate by ``seq``).

A received file an older gateway left in the task dir (a task in flight across the
upgrade) is read too when it is there at the tail's first read, as a file of the
gateway's uid. Cost per call: one lstat per log by path (1,000 unchanged tails: 5.4 ms,
4.4 ms before these checks); for a log that grew or changed shape, the directory opens,
an lstat, an open and an fstat; nothing per line but parsing.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from funnel_hpc.backends import files
from funnel_hpc.core.events import MAX_EVENT_BYTES, EventFold, parse_line
from funnel_hpc.gateway.store.task_dirs import (
    ATTEMPT_SUFFIX,
    EVENT_FILES,
    GATEWAY_DIR,
    RECEIVED_EVENTS,
    WORKER_EVENTS,
    gateway_dir,
)

LINE_BYTES = MAX_EVENT_BYTES + 1  # the longest line there is to read: one event + newline
CHUNK = LINE_BYTES                # read at a time: always room for one whole event
# per log per read_new; the rest waits for the next tick (the reconciler looks again).
# Parsed, 4 MiB of the smallest events are ~50 MB of Python objects (16 MiB: ~200 MB)
PASS_BYTES = CHUNK
SKIP_BYTES = 64 << 20             # of an over-long line per log per read_new (not kept)
MAX_NOTES = 100                   # per tail; later ones are only logged

log = logging.getLogger("funnel_hpc.gateway.reconcile.reconciler")


@dataclass
class LogFile:
    """One event log of an attempt, and how far it was read."""

    name: str
    gateway: bool          # in the gateway's dir (else the task dir)
    path: str              # for the quick look (a plain string: 1,000 lstats a tick)
    offset: int = 0
    skipping: bool = False  # inside an over-long line, looking for its end
    problem: str | None = None  # the refusal last noted


@dataclass
class EventTail:
    """Incremental reader of one task attempt's event logs."""

    directory: Path  # the task dir, <work_dir>/<task id>
    executors: int | None = None  # the task's executor count: events beyond it are bad
    # the uid the task dir's logs must belong to (Backend.job_uid); None: none is trusted
    job_uid: int | None = field(default_factory=os.geteuid)
    fold: EventFold = field(init=False)
    logs: list[LogFile] = field(init=False)
    # events applied since the reconciler last stored the fold: it hands them to the
    # event outbox with the change they make (gateway/store/outbox.py), then clears this
    fresh: list[dict] = field(default_factory=list)
    # what the task's system logs should say about its logs (refusals, skipped lines,
    # another task's events); the reconciler stores them, then clears this
    notes: list[str] = field(default_factory=list)
    behind: bool = False  # the last read_new stopped at PASS_BYTES: more is waiting
    _noted: int = field(default=0, init=False)  # notes made (at most MAX_NOTES kept)
    _first: bool = field(default=True, init=False)

    def __post_init__(self) -> None:
        self.fold = EventFold(executors=self.executors)
        # gateway_dir(work_dir, task_id) / RECEIVED_EVENTS, in strings (a tail a task)
        task_dir = str(self.directory)
        work_dir, self.task_id = os.path.split(task_dir)
        received = os.path.join(work_dir, GATEWAY_DIR, self.task_id, RECEIVED_EVENTS)
        self.logs = [LogFile(WORKER_EVENTS, False, os.path.join(task_dir, WORKER_EVENTS)),
                     LogFile(RECEIVED_EVENTS, True, received)]

    def new_attempt(self) -> None:
        """The tail of an attempt whose job was just submitted by this gateway: no log of
        an older gateway to adopt, and the first read waits, as every later one, until
        a log is there (the previous attempt's were archived before submission)."""
        self._first = False

    def read_new(self) -> bool:
        """Apply events appended since the last call; True if any was new."""
        before = self.fold.last_seq
        self.behind = False
        looks = [self._worth_reading(entry) for entry in self.logs]
        if not (self._first or any(looks)):
            return False
        try:
            work_fd = files.open_work_dir(self.directory.parent)
        except FileNotFoundError:
            return False
        try:
            if self._first or any(look for entry, look in zip(self.logs, looks, strict=True)
                                  if not entry.gateway):
                self._read_task_dir(work_fd)
            if any(look for entry, look in zip(self.logs, looks, strict=True) if entry.gateway):
                self._read_gateway_dir(work_fd)
        finally:
            os.close(work_fd)
        return self.fold.last_seq > before

    @staticmethod
    def _worth_reading(entry: LogFile) -> bool:
        """A quick lstat by path: True unless the log is missing or a regular file with
        nothing new. Only a hint: what is read is opened and checked as _read_log says."""
        try:
            info = os.lstat(entry.path)
        except OSError:
            return False
        return not stat.S_ISREG(info.st_mode) or info.st_size > entry.offset

    def _read_task_dir(self, work_fd: int) -> None:
        try:
            dir_fd = files.open_subdir(work_fd, self.task_id)
        except FileNotFoundError:
            return
        except OSError as exc:  # a link or not a directory: not the work dir's own
            self._note(f"the task directory was not read: {exc.strerror}")
            return
        try:
            if self._first:
                self._first = False
                self._adopt_legacy(dir_fd, str(self.directory / RECEIVED_EVENTS))
            for entry in self.logs:
                if not entry.gateway:
                    uid = (self.job_uid if entry.name == WORKER_EVENTS else os.geteuid())
                    self._read_log(dir_fd, entry, uid)
        finally:
            os.close(dir_fd)

    def _adopt_legacy(self, dir_fd: int, path: str) -> None:
        """A received file an older gateway wrote into the task dir, read as the gateway's."""
        try:
            os.stat(RECEIVED_EVENTS, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        self.logs.append(LogFile(RECEIVED_EVENTS, False, path))

    def _read_gateway_dir(self, work_fd: int) -> None:
        try:
            dir_fd = os.open(os.path.join(GATEWAY_DIR, self.task_id),
                             os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                             dir_fd=work_fd)
        except FileNotFoundError:
            return
        try:
            uid = os.fstat(dir_fd).st_uid  # the gateway account that made it
            for entry in self.logs:
                if entry.gateway:
                    self._read_log(dir_fd, entry, uid)
        finally:
            os.close(dir_fd)

    def _read_log(self, dir_fd: int, entry: LogFile, uid: int | None) -> None:
        where = entry.name if entry.gateway or entry.name == WORKER_EVENTS else \
            f"{entry.name} (in the task dir)"
        try:
            if uid is None:
                raise files.Refused(f"{entry.name} is not trusted: the job's user is unknown")
            opened = files.open_owned(dir_fd, entry.name, uid, larger_than=entry.offset)
        except files.Refused as exc:
            if str(exc) != entry.problem:
                entry.problem = str(exc)
                self._note(f"{exc}: not read")
            return
        if opened is None:
            return
        entry.problem = None
        fd, info = opened
        try:
            self._consume(fd, entry, info.st_size, where)
        finally:
            os.close(fd)

    def _consume(self, fd: int, entry: LogFile, size: int, where: str) -> None:
        """Whole lines from entry.offset: at most PASS_BYTES parsed and SKIP_BYTES of an
        over-long line passed over, a CHUNK in memory at a time."""
        parsed = skipped = 0  # a chunk starts only when it fits in what is left
        while entry.offset < size and parsed + CHUNK <= PASS_BYTES and \
                skipped + CHUNK <= SKIP_BYTES:
            if entry.skipping:
                skipped += _skip(fd, entry, size)
                continue
            chunk = os.pread(fd, min(CHUNK, size - entry.offset), entry.offset)
            if not chunk:
                break  # truncated meanwhile
            end = chunk.rfind(b"\n") + 1
            if end == 0:
                if len(chunk) < LINE_BYTES:
                    break  # a torn tail: the rest of the line comes later
                self._note(f"{where}: a line longer than {MAX_EVENT_BYTES} bytes at byte "
                           f"{entry.offset} was skipped")
                entry.offset += len(chunk)
                entry.skipping = True
                skipped += len(chunk)
                continue
            self._apply_lines(chunk[:end], where)
            entry.offset += end
            parsed += end
        if entry.offset < size and (parsed + CHUNK > PASS_BYTES or
                                    skipped + CHUNK > SKIP_BYTES):
            self.behind = True

    def _apply_lines(self, data: bytes, where: str) -> None:
        foreign = 0
        # untrusted lines: parse_line and the fold skip (and count) what is not a
        # well-formed event of this task; repeats (by seq) are ignored by the fold
        for line in data.splitlines():
            event = parse_line(line)
            if event is None:
                self.fold.skipped += 1
                continue
            if event.get("task_id", self.task_id) != self.task_id:
                foreign += 1  # another task's events (a copied or linked log)
                continue
            seq = self.fold.last_seq
            self.fold.apply(event)
            if self.fold.last_seq > seq:  # new (a repeat by seq is ignored)
                self.fresh.append(event)
        if foreign:
            self._note(f"{where}: {foreign} event(s) of another task dropped")

    def _note(self, text: str) -> None:
        log.warning("task %s: %s", self.task_id, text)
        if self._noted < MAX_NOTES:
            self._noted += 1
            self.notes.append(text)


def _skip(fd: int, entry: LogFile, size: int) -> int:
    """One step through an over-long line (entry.skipping): to the byte after its end
    when this chunk holds it, else past the chunk. Returns the bytes it read (1 at least)."""
    start = _next_data(fd, entry.offset, size)
    chunk = os.pread(fd, min(CHUNK, size - start), start) if start < size else b""
    if not chunk:  # only holes left (or truncated): wait at the end for more
        entry.offset = max(entry.offset, min(start, size))
        return 1
    newline = chunk.find(b"\n")
    if newline < 0:
        entry.offset = start + len(chunk)
    else:
        entry.offset, entry.skipping = start + newline + 1, False
    return len(chunk)


def _next_data(fd: int, offset: int, size: int) -> int:
    """The first offset at or after `offset` that is not in a hole (holes read as zeros:
    no line ends there), or size when only holes are left."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as exc:
        return size if exc.errno == errno.ENXIO else offset  # ENXIO: holes up to the end


def archive_events(directory: Path, previous_attempt: int) -> None:
    """The previous attempt's event logs (the task dir's and the gateway's), renamed out of
    the new attempt's way, following no link. The task dir is the gateway's again here
    (files.private_dir took it back)."""
    if previous_attempt < 1:
        return
    suffix = ATTEMPT_SUFFIX.format(previous_attempt)
    places = ((directory, EVENT_FILES), (gateway_dir(directory.parent, directory.name),
                                         (RECEIVED_EVENTS,)))
    for place, names in places:
        try:
            dir_fd = os.open(place, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            for name in names:
                try:
                    os.rename(name, name + suffix, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                except FileNotFoundError:
                    pass
        finally:
            os.close(dir_fd)
