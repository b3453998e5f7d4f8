"""The local backend (embedded default): workers run as processes on the gateway host.

Job id = task id. The task dir ``<work_dir>/<task id>`` holds the job's state,
so a restarted gateway finds every job again from the id alone:

- ``local.job``    written at submit: the worker argv and the submission time
- ``local.launch`` written just before the wrapper is started
- ``local.pid``    pid and kernel start time of the wrapper (written by it, and by us)
- ``local.exit``   the worker's exit status, written by the wrapper
                   (backends/local_runner.py) when the worker ends
- ``local.cancel`` written by cancel; its mtime starts the SIGKILL grace period
- ``worker.out`` / ``worker.err``  the wrapper's and worker's stdout and stderr

At most ``max_concurrent`` workers run at once; the rest wait in submission
order and are PENDING. Each wrapper leads its own session and process group, so
workers outlive a gateway that is killed. A new gateway's first poll re-adopts
live wrappers (pid AND start time must match, so a reused pid is not mistaken
for ours), reads the exit status of those that ended meanwhile, and queues again
the jobs that were submitted but never launched. A launched job whose wrapper is
gone without an exit record is LOST.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from funnel_hpc.backends.base import Backend, JobState, JobStatus, SubmitRequest
from funnel_hpc.backends.jsonlines import ChildProcess

JOB, LAUNCH, PID = "local.job", "local.launch", "local.pid"
EXIT, CANCEL = "local.exit", "local.cancel"
# A launch record without a pid record older than this: the gateway died while starting it.
LAUNCH_WAIT_SECONDS = 10


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
    name = "local"

    def __init__(self, options: dict[str, Any], config: dict[str, Any]):
        super().__init__(options, config)
        self.work_dir = Path(config["work_dir"])
        self.max_concurrent = max(1, int(options.get("max_concurrent", 2)))
        self.grace = float(options.get("cancel_grace_seconds", 10))
        self.queue: deque[str] = deque()                    # submitted, not launched, FIFO
        self.children: dict[str, tuple[int, str]] = {}      # wrappers this process started
        self.launcher = Launcher(self.work_dir, lambda: self.on_change and self.on_change())
        self.adopted: set[str] = set()                      # live wrappers of earlier gateways
        self.lock = threading.Lock()

    def _dir(self, job_id: str) -> Path:
        return self.work_dir / job_id

    # ---- interface ----

    def submit(self, request: SubmitRequest) -> str:
        job_id = request.task_id
        directory = self._dir(job_id)
        with self.lock:
            for name in (LAUNCH, PID, EXIT, CANCEL):  # a new attempt starts clean
                (directory / name).unlink(missing_ok=True)
            write_atomic(directory / JOB, json.dumps(
                {"argv": list(request.worker_argv), "submitted": time.time()}))
            if job_id not in self.queue:
                self.queue.append(job_id)
            self._launch_ready()
        return job_id

    def cancel(self, job_id: str) -> None:
        directory = self._dir(job_id)
        if not (directory / JOB).exists() or (directory / EXIT).exists():
            return  # unknown or already finished: nothing to stop
        with self.lock:
            write_atomic(directory / CANCEL, str(time.time()))
            if job_id in self.queue:
                self.queue.remove(job_id)
                return
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
            self._reap()
            found: list[tuple[float, str]] = []
            for job_id in job_ids:
                d = self._dir(job_id)
                if not (d / JOB).exists() or job_id in self.children or (d / EXIT).exists():
                    continue
                if (d / PID).exists():
                    record = self._live_record(job_id)
                    if record is not None:
                        # started by an earlier gateway process: counts against the limit
                        self.adopted.add(job_id)
                        self._kill_if_overdue(job_id, record)
                elif (not (d / LAUNCH).exists() and not (d / CANCEL).exists()
                      and job_id not in self.queue):
                    found.append((self._submitted_at(job_id), job_id))  # never launched
            self.queue.extend(job_id for _, job_id in sorted(found))
            self._launch_ready()
            return {job_id: self._status(job_id) for job_id in job_ids}

    def recover(self, task_id: str, task_dir: Path,
                owner: str | None = None) -> str | None:
        return task_id if (self._dir(task_id) / JOB).exists() else None

    # ---- state ----

    def _status(self, job_id: str) -> JobStatus:
        d = self._dir(job_id)
        if not (d / JOB).exists():
            return JobStatus(JobState.LOST, "no such local job")
        if job_id in self.queue:
            return JobStatus(JobState.PENDING, "waiting for a free slot")
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
        try:
            launched_for = time.time() - (d / LAUNCH).stat().st_mtime
        except FileNotFoundError:
            # submitted before a restart, not polled by this process yet: queued by poll
            return JobStatus(JobState.PENDING, "waiting for a free slot")
        if launched_for < LAUNCH_WAIT_SECONDS:
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

    def _submitted_at(self, job_id: str) -> float:
        try:
            return float(json.loads((self._dir(job_id) / JOB).read_text()).get("submitted", 0))
        except (OSError, ValueError, TypeError, AttributeError):
            return 0.0

    # ---- processes ----

    def _running(self) -> int:
        self._reap()
        alive = len(self.children)
        for job_id in list(self.adopted):
            if self._live_record(job_id) is None:
                self.adopted.discard(job_id)
        return alive + len(self.adopted)

    def _launch_ready(self) -> None:
        while self.queue and self._running() < self.max_concurrent:
            self._launch(self.queue.popleft())

    def _launch(self, job_id: str) -> None:
        d = self._dir(job_id)
        try:
            argv = [str(word) for word in json.loads((d / JOB).read_text())["argv"]]
            (d / LAUNCH).touch()
            pid = self.launcher.launch(d, argv)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # the job cannot start: record it as a failed run instead of failing every poll
            try:
                with (d / "worker.err").open("a") as err_file:
                    err_file.write(f"local backend: cannot start the worker: {exc}\n")
                write_atomic(d / EXIT, "127")
            except OSError:
                pass  # the task dir is gone: poll reports LOST
            return
        write_pid_record(d, pid)
        record = self._live_record(job_id)
        if record is not None:
            self.children[job_id] = record
        elif not (d / EXIT).exists():
            self.children[job_id] = (pid, "")  # gone already; _reap forgets it

    def _reap(self) -> None:
        for job_id, (pid, start) in list(self.children.items()):
            if not start or _start_time(pid) != start:
                del self.children[job_id]

    def close(self) -> None:
        self.launcher.close()

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
