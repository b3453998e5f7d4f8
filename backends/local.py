"""The local backend (embedded default): workers run as processes on the gateway host.

Job id = task id. A queued job lives only in the queue journal
(``<work_dir>/local-queue.jsonl``, backends/local_queue.py): no task dir yet, one line
on disk, a dict entry to poll. When it starts, its task dir ``<work_dir>/<task id>`` is
made (with the files the gateway handed over in ``SubmitRequest.files``) and holds the
job's state from then on, so a restarted gateway finds every job again from the id:

- ``local.job``    written at start: the worker argv, submission and start times
- ``local.pid``    pid and kernel start time of the wrapper (written by it, and by us)
- ``local.exit``   the worker's exit status, written by the wrapper
                   (backends/local_runner.py) when the worker ends
- ``local.cancel`` written by cancel; its mtime starts the SIGKILL grace period
- ``worker.out`` / ``worker.err``  the wrapper's and worker's stdout and stderr

At most ``max_concurrent`` workers run at once; the rest wait in submission
order and are PENDING. Each wrapper leads its own session and process group, so
workers outlive a gateway that is killed. A new gateway replays the journal (what is
queued, what was canceled before it started), and its polls re-adopt live wrappers
(pid AND start time must match, so a reused pid is not mistaken for ours) and read the
exit status of those that ended meanwhile. A started job whose wrapper is gone without
an exit record is LOST. Cost of a poll: a dict look-up per queued job, a few system
calls per started one (the reconciler stops polling a job once its task ended).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from funnel_hpc.backends import files
from funnel_hpc.backends.base import Backend, JobState, JobStatus, SubmitRequest
from funnel_hpc.backends.jsonlines import ChildProcess
from funnel_hpc.backends.local_queue import JobQueue
from funnel_hpc.core.config import LocalOptions

JOB, PID = "local.job", "local.pid"
LEGACY_LAUNCH = "local.launch"  # written before a start by gateways before the journal
EXIT, CANCEL = "local.exit", "local.cancel"
# A start record (local.job) without a pid record older than this: the gateway died
# while starting it.
LAUNCH_WAIT_SECONDS = 10
# the answers for queued jobs, one object each: a poll of 20,000 queued makes none
WAITING = JobStatus(JobState.PENDING, "waiting for a free slot")
CANCELED_WAITING = JobStatus(JobState.CANCELLED, "canceled before it started")


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from field 3 (state) on; None if the process is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else fields


def _start_time(pid: int) -> str | None:
    """The kernel's start time of a live process (field 22 of /proc/<pid>/stat)."""
    fields = _stat_fields(pid)
    return fields[19] if fields else None


def _group_has_members(pgid: int) -> bool:
    """True if a live process is in process group pgid (field 5 of /proc/<pid>/stat)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields and fields[2] == str(pgid):
                return True
    return False


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_pid_record(task_dir: Path, pid: int) -> None:
    write_atomic(task_dir / PID, json.dumps({"pid": pid, "start_time": _start_time(pid)}))


def _exit_reason(code: str) -> str:
    try:
        number = int(code)
    except ValueError:
        return f"unreadable worker exit status {code!r}"
    if number < 0:
        try:
            name = signal.Signals(-number).name
        except ValueError:
            name = "unknown signal"
        return f"worker killed by signal {-number} ({name}), exit code {number}"
    return f"worker exit code {number}"


class LocalBackend(Backend):
    kind = "local"
    # the task dir is made when the job starts (a queued job costs one journal line)
    makes_task_dir = True

    options: LocalOptions

    def __init__(self, options: LocalOptions, work_dir: Path,
                 on_change: Callable[[], None] | None = None, name: str | None = None):
        super().__init__(options, work_dir, on_change, name)
        self.max_concurrent = max(1, options.max_concurrent)
        self.grace = options.cancel_grace_seconds
        self.queue = JobQueue(self.work_dir)                # submitted, not started, FIFO
        self.children: dict[str, tuple[int, str]] = {}      # wrappers this process started
        self.launcher = Launcher(self.work_dir, lambda: self.on_change and self.on_change())
        self.adopted: set[str] = set()                      # live wrappers of earlier gateways
        self.unstartable: dict[str, str] = {}               # no task dir could be made: why
        self.lock = threading.Lock()

    def _dir(self, job_id: str) -> Path:
        return self.work_dir / job_id

    # ---- interface ----

    def submit(self, request: SubmitRequest) -> str:
        job_id = request.task_id
        directory = self._dir(job_id)
        with self.lock:
            # an earlier attempt's dir (never through a link): the new one starts clean
            if directory.is_dir() and not directory.is_symlink():
                for name in (JOB, PID, EXIT, CANCEL):
                    (directory / name).unlink(missing_ok=True)
            self.unstartable.pop(job_id, None)
            self.queue.add(job_id, request.worker_argv, request.files)
            self._launch_ready()
        return job_id

    def withdraw(self, job_id: str) -> None:
        """Take the job out of the queue if it has not started; a started one runs on."""
        with self.lock:
            self.queue.cancel(job_id)

    def cancel(self, job_id: str) -> None:
        with self.lock:
            if self.queue.cancel(job_id):
                return  # never started, and never will
        directory = self._dir(job_id)
        if not (directory / JOB).exists() or (directory / EXIT).exists():
            return  # unknown or already finished: nothing to stop
        with self.lock:
            write_atomic(directory / CANCEL, str(time.time()))
            record = self._live_record(job_id)
        if record is None:
            return
        try:
            os.killpg(record[0], signal.SIGTERM)
        except ProcessLookupError:
            return
        timer = threading.Timer(self.grace, self._kill_hard, args=record)
        timer.daemon = True
        timer.start()

    def poll(self, job_ids: list[str]) -> dict[str, JobStatus]:
        with self.lock:
            self.queue.refresh()
            self._reap()
            queued = self.queue.queued
            legacy: list[tuple[float, str, list[str]]] = []
            for job_id in [job_id for job_id in job_ids if job_id not in queued]:
                if job_id in self.queue.canceled or job_id in self.children:
                    continue
                d = self._dir(job_id)
                if (d / PID).exists():
                    record = None if (d / EXIT).exists() else self._live_record(job_id)
                    if record is not None:
                        # started by an earlier gateway process: counts against the limit
                        self.adopted.add(job_id)
                        self._kill_if_overdue(job_id, record)
                else:
                    self._requeue_legacy(job_id, d, legacy)
            for _submitted, job_id, argv in sorted(legacy):
                self.queue.add(job_id, argv, {})
            self._launch_ready()
            self.queue.sync()
            # a queued job costs a look-up (20,000 queued: a few ms), a started one its files
            answer = dict.fromkeys(job_ids, WAITING)
            queued = self.queue.queued  # (a re-read of the journal makes a new dict)
            for job_id in [job_id for job_id in job_ids if job_id not in queued]:
                answer[job_id] = self._status(job_id)
            return answer

    @staticmethod
    def _requeue_legacy(job_id: str, d: Path, found: list[tuple[float, str, list[str]]]) -> None:
        """A job queued by a gateway from before the journal (its dir holds local.job with
        no start time, no launch, pid, exit or cancel record): queued again, in order."""
        if any((d / name).exists() for name in (LEGACY_LAUNCH, EXIT, CANCEL)):
            return
        try:
            record = json.loads((d / JOB).read_text())
            if "started" in record:
                return
            found.append((float(record.get("submitted", 0)), job_id,
                          [str(word) for word in record["argv"]]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return  # no such job, or not one of ours: poll says so

    def recover(self, task_id: str, task_dir: Path,
                owner: str | None = None) -> str | None:
        with self.lock:
            self.queue.refresh()
            known = task_id in self.queue.queued or task_id in self.queue.canceled
        return task_id if known or (self._dir(task_id) / JOB).exists() else None

    # ---- state ----

    def _status(self, job_id: str) -> JobStatus:
        if job_id in self.queue.queued:
            return WAITING
        if job_id in self.queue.canceled:
            return CANCELED_WAITING
        if job_id in self.unstartable:
            return JobStatus(JobState.FAILED, self.unstartable[job_id])
        d = self._dir(job_id)
        try:
            started_for = time.time() - (d / JOB).stat().st_mtime
        except (FileNotFoundError, NotADirectoryError):
            return JobStatus(JobState.LOST, "no such local job")
        # liveness BEFORE the exit record: the wrapper writes it and only then ends
        alive = (d / PID).exists() and self._live_record(job_id) is not None
        canceled = (d / CANCEL).exists()
        try:
            code: str | None = (d / EXIT).read_text().strip()
        except FileNotFoundError:
            code = None
        if code is not None:
            if canceled:
                return JobStatus(JobState.CANCELLED, f"canceled; {_exit_reason(code)}")
            if code == "0":
                return JobStatus(JobState.COMPLETED, "worker exit code 0")
            return JobStatus(JobState.FAILED, f"{_exit_reason(code)} (see worker.err)")
        if alive:
            return JobStatus(JobState.RUNNING, "worker running")
        if canceled:
            return JobStatus(JobState.CANCELLED, "canceled; worker stopped"
                             if (d / PID).exists() else "canceled before it started")
        if (d / PID).exists():
            return JobStatus(JobState.LOST, "the worker process is gone and left no exit "
                                            "status (killed?); see worker.err")
        if started_for < LAUNCH_WAIT_SECONDS:
            return JobStatus(JobState.PENDING, "starting")
        return JobStatus(JobState.LOST, "the worker was being started when the gateway "
                                        "stopped, and never recorded itself")

    def _live_record(self, job_id: str) -> tuple[int, str] | None:
        """(pid, start time) of the job's wrapper if that very process is alive."""
        try:
            record = json.loads((self._dir(job_id) / PID).read_text())
            pid, start = int(record["pid"]), str(record["start_time"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return (pid, start) if _start_time(pid) == start else None

    # ---- processes ----

    def _running(self) -> int:
        self._reap()
        alive = len(self.children)
        for job_id in list(self.adopted):
            if self._live_record(job_id) is None:
                self.adopted.discard(job_id)
        return alive + len(self.adopted)

    def _launch_ready(self) -> None:
        while self.queue.queued and self._running() < self.max_concurrent:
            job_id = self.queue.next_id()
            assert job_id is not None
            self._launch(job_id)

    def _launch(self, job_id: str) -> None:
        """Make the job's task dir, then take it off the queue (on disk: a restart never
        starts it again, and another process that took it already wins), then start its
        wrapper. In that order, a gateway killed at any point leaves the job queued or
        started, never neither (a queued job whose dir exists is made again)."""
        job = self.queue.queued.get(job_id)
        if job is None:
            return
        d = self._dir(job_id)
        try:
            files.private_dir(d)
            for name, text in job.files.items():
                files.write_private(d, name, text)
            write_atomic(d / JOB, json.dumps({"argv": job.argv, "submitted": job.submitted,
                                              "started": time.time()}))
        except OSError as exc:
            # no dir to start in (disk full, a link planted there: nothing is written
            # through it): this job fails, the others go on
            if self.queue.take(job_id) is not None:
                self.unstartable[job_id] = f"cannot make its task dir: {exc}"
            return
        if self.queue.take(job_id) is None:
            return  # canceled, or another process started it, meanwhile
        try:
            pid = self.launcher.launch(d, job.argv)
        except OSError as exc:
            self._cannot_start(d, exc)
            return
        write_pid_record(d, pid)
        record = self._live_record(job_id)
        if record is not None:
            self.children[job_id] = record
        elif not (d / EXIT).exists():
            self.children[job_id] = (pid, "")  # gone already; _reap forgets it

    @staticmethod
    def _cannot_start(d: Path, exc: OSError) -> None:
        """Record a job that cannot start as a failed run, instead of failing every poll."""
        try:
            with (d / "worker.err").open("a") as err_file:
                err_file.write(f"local backend: cannot start the worker: {exc}\n")
            write_atomic(d / EXIT, "127")
        except OSError:
            pass  # no task dir: poll reports LOST

    def _reap(self) -> None:
        for job_id, (pid, start) in list(self.children.items()):
            if not start or _start_time(pid) != start:
                del self.children[job_id]

    def close(self) -> None:
        self.launcher.close()
        with self.lock:
            self.queue.close()

    def _kill_if_overdue(self, job_id: str, record: tuple[int, str]) -> None:
        """SIGKILL a canceled worker whose grace period ran out (e.g. across a restart)."""
        try:
            canceled_at = (self._dir(job_id) / CANCEL).stat().st_mtime
        except FileNotFoundError:
            return
        if time.time() - canceled_at >= self.grace:
            self._kill_hard(*record)

    @staticmethod
    def _kill_hard(pid: int, start_time: str) -> None:
        """SIGKILL the group of wrapper pid: while the wrapper lives, or while anything it
        left behind (a worker's child that ignored SIGTERM) is still in its group."""
        if _start_time(pid) == start_time or _group_has_members(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class Launcher:
    """The gateway's end of `python -m funnel_hpc.backends.local_runner --serve` (see that
    module): started on first use and again if it died; its exit notices call on_exit."""

    def __init__(self, work_dir: Path, on_exit: Callable[[], Any]):
        self.child = ChildProcess(
            [sys.executable, "-m", "funnel_hpc.backends.local_runner", "--serve"],
            timeout=LAUNCH_WAIT_SECONDS, cwd=work_dir,
            stderr_path=work_dir / "local-launcher.err", on_notice=lambda _notice: on_exit())

    @property
    def proc(self) -> subprocess.Popen[str] | None:
        return self.child.proc

    def launch(self, task_dir: Path, argv: list[str]) -> int:
        """Start the wrapper of one job; its pid. Raises OSError (ChildGone included)."""
        answer = self.child.call({"task_dir": str(task_dir), "argv": argv})
        if not answer.get("ok"):
            raise OSError(answer.get("error") or "the local launcher refused")
        return int(answer["result"])

    def close(self) -> None:
        self.child.close()
