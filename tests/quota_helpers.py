"""Helpers of tests/test_quotas.py: a gated worker command (each job's real worker starts
only once the test opens its task's gate, and the order jobs started in is logged), what
the database says an owner has in flight (read with plain SQL, not the code under test),
and a sampler of it while tasks run."""

from __future__ import annotations

import sqlite3
import sys
import threading
from pathlib import Path

GATE_SCRIPT = """#!/bin/sh
# a test's gate in front of the real worker: log the start, wait for the task's gate file
gates={gates}
for arg in "$@"; do
  if [ "$previous" = --task-file ]; then task_file=$arg; fi
  previous=$arg
done
id=$(basename "$(dirname "$task_file")")
echo "$id" >> "$gates/started"
while [ ! -e "$gates/$id" ] && [ ! -e "$gates/all" ]; do sleep 0.1; done
exec {python} -m funnel_hpc.worker run "$@"
"""


class Gates:
    """The gate directory of one server's jobs."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.script = directory / "gated-worker.sh"
        self.script.write_text(GATE_SCRIPT.format(gates=directory, python=sys.executable))
        self.script.chmod(0o755)

    def command(self) -> list[str]:
        """worker.command: the gate, then the real worker."""
        return ["/bin/sh", str(self.script)]

    def open(self, task_id: str = "all") -> None:
        (self.directory / task_id).touch()

    def started(self) -> list[str]:
        """Task ids whose job started, in the order they started."""
        log = self.directory / "started"
        return log.read_text().split() if log.exists() else []


ACTIVE = ("QUEUED", "INITIALIZING", "RUNNING", "PAUSED", "CANCELING")


def jobs_in_flight(db_file: Path, owner: str) -> int:
    """The owner's tasks that are not ended and hold a job (or a claim on one)."""
    with sqlite3.connect(f"file:{db_file}?mode=ro", uri=True, timeout=30) as conn:
        marks = ",".join("?" * len(ACTIVE))
        return conn.execute(f"SELECT count(*) FROM tasks WHERE owner = ? AND state IN ({marks})"
                            " AND job_id IS NOT NULL", (owner, *ACTIVE)).fetchone()[0]


class Sampler:
    """The most an owner had in flight, read from the database every 50 ms in a thread
    until stopped."""

    def __init__(self, db_file: Path, owner: str):
        self.db_file = db_file
        self.owner = owner
        self.most = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.most = max(self.most, jobs_in_flight(self.db_file, self.owner))
                self.samples += 1
            except sqlite3.OperationalError:  # locked for a moment: the next sample reads
                pass
            self._stop.wait(0.05)


def waiting_lines(task: dict) -> list[str]:
    """The task's system log lines that say why it waits for its owner's limits."""
    return [line for entry in task.get("logs") or [] for line in entry.get("system_logs") or []
            if " waiting: " in line]
