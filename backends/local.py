"""The local backend (embedded default): workers run as processes on the gateway host.

Job id = task id; the task dir ``<work_dir>/<task id>`` holds the job's state,
so a restarted gateway finds every job again:

- ``local.job``    written at submit: the worker argv (the job exists)
- ``local.launch`` written just before the wrapper is started
- ``local.pid``    pid and kernel start time of the wrapper (written by it, and by us)
- ``local.exit``   written by the wrapper (backends/local_runner.py) when the worker ends
- ``local.cancel`` written by cancel

At most ``max_concurrent`` workers run at once; the rest wait in submission
order and are PENDING. Workers run in their own session, so they outlive a
gateway that is killed; a job submitted but not launched before a restart is
launched by the new gateway. A launched job whose process is gone without an
exit record is LOST.
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
from pathlib import Path

from backends.base import Backend, JobState, JobStatus, SubmitRequest

JOB, PID, EXIT, CANCEL = "local.job", "local.pid", "local.exit", "local.cancel"
LAUNCH = "local.launch"  # written just before starting the wrapper
LAUNCH_WAIT_SECONDS = 10


def _start_time(pid: int) -> str | None:
    """The kernel's start time of a process (field 22 of /proc/pid/stat), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":  # zombie: it has ended
        return None
    return fields[19]


class LocalBackend(Backend):
    name = "local"

    def __init__(self, options: dict, config: dict):
        super().__init__(options, config)
        self.work_dir = Path(config["work_dir"])
        self.max_concurrent = max(1, int(options.get("max_concurrent", 2)))
        self.grace = float(options.get("cancel_grace_seconds", 10))
        self.supported_parameters = frozenset(
            k.lower() for k in (options.get("backend_parameters") or {}))
        self.queue: deque[str] = deque()
        self.children: dict[str, subprocess.Popen] = {}
        self.adopted: set[str] = set()
        self.lock = threading.Lock()

    def _dir(self, job_id: str) -> Path:
        return self.work_dir / job_id

    # ---- interface ----

    def submit(self, request: SubmitRequest) -> str:
        job_id = request.task_id
        directory = self._dir(job_id)
        for name in (PID, EXIT, CANCEL, LAUNCH):  # a new attempt starts clean
            (directory / name).unlink(missing_ok=True)
        tmp = directory / (JOB + ".tmp")
        tmp.write_text(json.dumps({"argv": request.worker_argv}))
        os.replace(tmp, directory / JOB)
        with self.lock:
            if job_id not in self.queue:
                self.queue.append(job_id)
            self._launch_ready()
        return job_id

    def cancel(self, job_id: str) -> None:
        directory = self._dir(job_id)
        if not directory.is_dir():
            return
        (directory / CANCEL).touch()
        with self.lock:
            if job_id in self.queue:
                self.queue.remove(job_id)
                return
        pid = self._live_pid(job_id)
        if pid is None:
            return
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        timer = threading.Timer(self.grace, self._kill_hard, args=(job_id, pid))
        timer.daemon = True
        timer.start()

    def poll(self, job_ids: list[str]) -> dict[str, JobStatus]:
        with self.lock:
            self._reap()
            for job_id in job_ids:
                d = self._dir(job_id)
                # workers started by an earlier gateway process count against the limit
                if (job_id not in self.children and (d / PID).exists()
                        and not (d / EXIT).exists() and self._live_pid(job_id) is not None):
                    self.adopted.add(job_id)
                # jobs submitted before a restart and never launched
                if ((d / JOB).exists() and not (d / PID).exists() and not (d / LAUNCH).exists()
                        and not (d / CANCEL).exists() and job_id not in self.queue):
                    self.queue.append(job_id)
            self._launch_ready()
            return {job_id: self._status(job_id) for job_id in job_ids}

    def recover(self, task_id: str, task_dir: Path) -> str | None:
        return task_id if (self._dir(task_id) / JOB).exists() else None

    # ---- internals ----

    def _status(self, job_id: str) -> JobStatus:
        d = self._dir(job_id)
        canceled = (d / CANCEL).exists()
        exit_file = d / EXIT
        if exit_file.exists():
            code = exit_file.read_text().strip()
            if canceled:
                return JobStatus(JobState.CANCELLED, f"canceled; worker exit code {code}")
            if code == "0":
                return JobStatus(JobState.COMPLETED, "worker exit code 0")
            return JobStatus(JobState.FAILED, f"worker exit code {code}")
        if job_id in self.queue:
            return JobStatus(JobState.PENDING, "waiting for a free slot")
        if (d / PID).exists():
            if self._live_pid(job_id) is not None:
                return JobStatus(JobState.RUNNING, "worker running")
            if canceled:
                return JobStatus(JobState.CANCELLED, "canceled; worker killed")
            return JobStatus(JobState.LOST, "the worker process is gone and left no exit status")
        if canceled:
            return JobStatus(JobState.CANCELLED, "canceled before it started")
        launch = d / LAUNCH
        if launch.exists():
            if time.time() - launch.stat().st_mtime < LAUNCH_WAIT_SECONDS:
                return JobStatus(JobState.PENDING, "starting")
            return JobStatus(JobState.LOST, "the worker was being started when the gateway "
                                            "stopped, and never recorded itself")
        return JobStatus(JobState.LOST, "no such local job")

    def _live_pid(self, job_id: str) -> int | None:
        try:
            record = json.loads((self._dir(job_id) / PID).read_text())
        except (OSError, ValueError):
            return None
        pid = int(record["pid"])
        return pid if _start_time(pid) == record["start_time"] else None

    def _running(self) -> int:
        alive = sum(1 for proc in self.children.values() if proc.poll() is None)
        for job_id in list(self.adopted):
            if self._live_pid(job_id) is None:
                self.adopted.discard(job_id)
        return alive + len(self.adopted)

    def _launch_ready(self) -> None:
        while self.queue and self._running() < self.max_concurrent:
            self._launch(self.queue.popleft())

    def _launch(self, job_id: str) -> None:
        d = self._dir(job_id)
        argv = json.loads((d / JOB).read_text())["argv"]
        (d / LAUNCH).touch()
        with (d / "worker.out").open("ab") as out, (d / "worker.err").open("ab") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "backends.local_runner", str(d), "--", *argv],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True,
                cwd=str(d), env={**os.environ, "PYTHONPATH": _repo_path()})
        self.children[job_id] = proc
        write_pid_record(d, proc.pid)

    def _reap(self) -> None:
        for job_id, proc in list(self.children.items()):
            if proc.poll() is not None:
                del self.children[job_id]

    def _kill_hard(self, job_id: str, pid: int) -> None:
        if self._live_pid(job_id) == pid:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def write_pid_record(task_dir: Path, pid: int) -> None:
    record = {"pid": pid, "start_time": _start_time(pid)}
    tmp = task_dir / f"{PID}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, task_dir / PID)


def _repo_path() -> str:
    """Make `python -m backends.local_runner` importable whatever the cwd."""
    repo = str(Path(__file__).resolve().parent.parent)
    existing = os.environ.get("PYTHONPATH", "")
    return f"{repo}:{existing}" if existing else repo
