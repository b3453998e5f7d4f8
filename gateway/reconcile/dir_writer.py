"""New task dirs of a tick's submission, written by a helper process beside the reconciler.

A burst of 10,000 first attempts is 10,000 task dirs, each a mkdir and a task.json: about
half of the tick on a local disk, and more on a network file system. Threads cannot write
them while the reconciler goes on (each system call hands the GIL back to a thread running
Python), so a helper process (`python -m funnel_hpc.gateway.reconcile.dir_writer`, the
gateway's own user) writes them, chunk by chunk, while the reconciler claims, renders and
submits; when the helper is behind, the reconciler writes the next chunk itself. Both run
the same `files.new_private_dir`: a dir there already (a planted one, an earlier attempt's)
comes back as THERE, for the caller's careful way.

The helper reads chunks (lists of (dir, {name: text})) from one pipe and answers each with
one list of results on another: None (written), THERE, or (errno, message). It ends when
its pipe closes (the reconciler stopped or died). If it dies, its chunks in flight come
back as THERE (what it wrote is taken back by the careful way) and the tick goes on
without it; the next tick that needs one starts another.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path

from funnel_hpc.backends import files

# the reconciler's logger (gateway/reconcile/core.py's LOGGER_NAME: not imported, so the
# helper starts with no more than backends/files.py)
log = logging.getLogger("funnel_hpc.gateway.reconcile.reconciler")

THERE = "there"   # the dir was there already: the caller takes the careful way
CHUNK = 200       # dirs a chunk (trivial tasks: about 70 KB of task.json)
IN_FLIGHT = 8     # chunks handed to the helper and not answered yet (the pipe's buffer)
WRITER_MIN = 400  # fewer new dirs in a tick: written by the reconciler alone
PIPE_BYTES = 1 << 20

Result = None | str | tuple[int, str]


def write_new(items: Sequence[tuple[str, dict[str, str]]]) -> list[Result]:
    """Each (dir, texts) written as files.new_private_dir does: None, THERE or (errno,
    message) of the OSError."""
    results: list[Result] = []
    for path, texts in items:
        try:
            results.append(None if files.new_private_dir(Path(path), texts) else THERE)
        except OSError as exc:
            results.append((exc.errno or 0, exc.strerror or str(exc)))
    return results


class DirWriter:
    """The helper process: started on first use, ended by close()."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._to: Connection | None = None
        self._from: Connection | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> bool:
        """Start the helper (a no-op when it runs); False when it cannot start."""
        if self._proc is not None and self._proc.poll() is not None:
            self._gone(ChildProcessError(f"exit status {self._proc.returncode}"))
        if self._proc is not None:
            return True
        child_in, parent_out = os.pipe()  # (read end, write end)
        parent_in, child_out = os.pipe()
        for fd in (parent_out, child_out):
            with contextlib.suppress(OSError):  # a bigger buffer: a chunk never waits
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", __name__, str(child_in), str(child_out)],
                pass_fds=(child_in, child_out), stdin=subprocess.DEVNULL, cwd="/")
        except OSError as exc:
            log.warning("task dir writer not started (dirs written in the reconciler): %s",
                        exc)
            for fd in (child_in, parent_out, parent_in, child_out):
                os.close(fd)
            return False
        os.close(child_in)
        os.close(child_out)
        self._to = Connection(parent_out, readable=False)
        self._from = Connection(parent_in, writable=False)
        return True

    def send(self, items: list[tuple[str, dict[str, str]]]) -> bool:
        """Hand a chunk over; False (and the helper ended) when it is gone."""
        if self._to is None:
            return False
        try:
            self._to.send(items)
            return True
        except OSError as exc:
            self._gone(exc)
            return False

    def ready(self) -> bool:
        """An answer waits to be received."""
        try:
            return self._from is not None and self._from.poll()
        except OSError:
            return True  # receive() sees the end

    def receive(self) -> list[Result] | None:
        """The answer to the oldest chunk in flight; None when the helper is gone."""
        if self._from is None:
            return None
        try:
            results = self._from.recv()
        except (EOFError, OSError) as exc:
            self._gone(exc)
            return None
        return results

    def _gone(self, exc: BaseException) -> None:
        log.warning("task dir writer ended (dirs written in the reconciler): %r", exc)
        self.close()

    def close(self) -> None:
        for conn in (self._to, self._from):
            if conn is not None:
                conn.close()
        self._to = self._from = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None


class TickDirs:
    """The new dirs of one tick, by index, added as the tick claims them (add): handed to
    the helper IN_FLIGHT chunks at a time; the caller waits for the dirs of each unit
    before submitting it, and writes a chunk itself whenever it would otherwise wait."""

    def __init__(self, directory: Callable[[int], Path],
                 texts: Callable[[int], dict[str, str]], writer: DirWriter | None,
                 indexes: Sequence[int] = ()):
        self._directory = directory
        self._texts = texts
        self._chunks: deque[list[int]] = deque()
        self._in_flight: deque[list[int]] = deque()
        self._results: dict[int, Result] = {}
        self._writer = writer if writer is not None and writer.running else None
        self._planned: set[int] = set()
        self.helper_chunks = 0  # chunks the helper wrote, and the reconciler
        self.own_chunks = 0
        self.add(indexes)

    def add(self, indexes: Sequence[int]) -> None:
        """More new dirs (claimed, their directory and texts known from now on)."""
        self._planned.update(indexes)
        self._chunks.extend(list(indexes[at:at + CHUNK]) for at in range(0, len(indexes), CHUNK))
        self.pump()

    def pump(self) -> None:
        """The helper's answers taken in and more chunks handed over, without waiting:
        the tick calls this between its steps, so the helper is never idle for want of
        chunks while the reconciler claims and renders."""
        while self._writer is not None and self._in_flight and self._writer.ready():
            self._absorb()
        self._feed()

    def result(self, index: int) -> Result:
        """What became of the dir (once waited for); THERE for one not among the new."""
        return self._results.get(index, THERE)

    def wait_for(self, indexes: Sequence[int]) -> None:
        """Until every one of these dirs (of this tick's) is written, came back THERE or
        failed."""
        while any(i in self._planned and i not in self._results for i in indexes):
            if self._writer is not None and self._in_flight and self._writer.ready():
                self._absorb()
            elif self._chunks:  # the helper is busy: the next chunk is written here
                self._write_here(self._chunks.popleft())
            else:
                self._absorb()
            self._feed()

    def finish(self) -> None:
        """Every dir of the tick's written (dirs no unit waited for too, e.g. a refused
        task's): nothing of this tick stays in flight for the next."""
        self.wait_for(list(self._planned))

    def _items(self, chunk: list[int]) -> list[tuple[str, dict[str, str]]]:
        return [(str(self._directory(i)), self._texts(i)) for i in chunk]

    def _feed(self) -> None:
        """Hand chunks over, IN_FLIGHT at most, and never more than are left here: the
        reconciler writes the rest from the front whenever it would wait (a tick of a few
        chunks is written by both)."""
        while (self._writer is not None and len(self._in_flight) < IN_FLIGHT
               and len(self._chunks) > len(self._in_flight)):
            chunk = self._chunks.popleft()
            if not self._writer.send(self._items(chunk)):
                self._chunks.appendleft(chunk)
                self._lost()
                return
            self._in_flight.append(chunk)

    def _absorb(self) -> None:
        if self._writer is None or not self._in_flight:
            return
        results = self._writer.receive()
        chunk = self._in_flight.popleft()
        if results is None or len(results) != len(chunk):
            self._in_flight.appendleft(chunk)
            self._lost()
            return
        self._results.update(zip(chunk, results, strict=True))
        self.helper_chunks += 1

    def _lost(self) -> None:
        """The helper is gone: what it had in flight may be half written (THERE: taken
        back the careful way); the rest is written here."""
        for chunk in self._in_flight:
            self._results.update((i, THERE) for i in chunk)
        self._in_flight.clear()
        if self._writer is not None:
            self._writer.close()
        self._writer = None

    def _write_here(self, chunk: list[int]) -> None:
        self._results.update(zip(chunk, write_new(self._items(chunk)), strict=True))
        self.own_chunks += 1


def error_of(result: tuple[int, str], path: Path) -> OSError:
    return OSError(result[0], result[1], str(path))


def main(argv: list[str]) -> int:
    """The helper: chunks in on fd argv[1], answers out on fd argv[2], until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the gateway's Ctrl-C ends it by EOF
    inbox = Connection(int(argv[1]), writable=False)
    outbox = Connection(int(argv[2]), readable=False)
    while True:
        try:
            items = inbox.recv()
        except EOFError:
            return 0
        try:
            outbox.send(write_new(items))
        except OSError:
            return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
