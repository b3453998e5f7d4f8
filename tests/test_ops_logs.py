"""Logs an operator can read: one INFO line per task end (real `funnel reconcile` and a
scheduler that refuses the job) and per requeue (a scheduler that loses the job), Alembic
quiet unless it migrates, and times with their zone in both formats."""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime

from funnel_hpc.backends.base import JobState
from tests.ops_helpers import ReconcileProcess, failing_sbatch
from tests.reconciler_helpers import TRIVIAL, ScriptedBackend, job_of, make
from tests.server_helpers import ServerProcess, free_port
from tests.waiting import wait_for

REFUSING_SBATCH = """#!/bin/sh
cat >/dev/null
echo "sbatch: error: Batch job submission failed: Invalid account or account/partition \
combination specified" >&2
exit 1
"""


def test_one_info_line_when_a_task_ends(databases, tmp_path):
    listen = free_port()
    log_file = tmp_path / "reconcile.jsonl"
    server = ServerProcess(tmp_path / "srv", databases.new("sqlite"), overrides={
        "backend": {"name": "slurm"}, "logging": {"format": "json", "file": str(log_file)},
        "reconciler": {"interval_seconds": 1, "listen": f"127.0.0.1:{listen}"}}).start()
    path = failing_sbatch(tmp_path / "bin")
    (tmp_path / "bin" / "sbatch").write_text(REFUSING_SBATCH)  # not transient: SYSTEM_ERROR
    reconcile = ReconcileProcess(server, path=path, port=listen).start()
    try:
        import requests

        task_id = requests.post(server.api + "/tasks", json=TRIVIAL, timeout=10).json()["id"]

        def ended() -> list[dict]:
            entries = [json.loads(line) for line in log_file.read_text().splitlines()]
            return [e for e in entries if e.get("task_id") == task_id
                    and " ended " in e["message"]]

        lines = wait_for(ended, 60, "the task's end line", detail=reconcile.log)
        assert len(lines) == 1 and lines[0]["level"] == "INFO"
        message = lines[0]["message"]
        assert message.startswith(f"task {task_id} ended SYSTEM_ERROR: owner=")
        for part in ("backend=slurm", "job=-", "queue_wait=", "run_time=", "Invalid account"):
            assert part in message, message
    finally:
        reconcile.stop()
        server.stop()


def test_one_info_line_when_a_lost_job_is_tried_again(tmp_path, caplog):
    backend = ScriptedBackend()
    service, reconciler = make(tmp_path, backend, max_attempts=2)
    task_id = service.create(TRIVIAL)
    reconciler.tick()
    first = job_of(service, task_id)
    backend.end(first, JobState.LOST, "the scheduler forgot the job")
    with caplog.at_level(logging.INFO):
        reconciler.tick()
    requeued = [r.getMessage() for r in caplog.records if "requeued" in r.getMessage()]
    assert len(requeued) == 1, requeued
    assert requeued[0].startswith(f"task {task_id} requeued for attempt 2 of 2: owner=- "
                                  f"backend=scripted job={first} reason="), requeued
    assert "the scheduler forgot the job" in requeued[0]


ZONED = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d")


def test_times_carry_their_zone_and_alembic_is_quiet_after_the_first_start(databases,
                                                                            tmp_path):
    url = databases.new("sqlite")
    for form in ("json", "text"):
        log_file = tmp_path / f"server-{form}.log"
        server = ServerProcess(tmp_path / "srv", url, overrides={
            "logging": {"format": form, "file": str(log_file)}}).start()
        server.stop()
        lines = log_file.read_text().splitlines()
        assert lines
        for line in lines:
            stamp = json.loads(line)["time"] if form == "json" else line.split(" ", 1)[0]
            assert ZONED.fullmatch(stamp), line
            datetime.fromisoformat(stamp)
        alembic = [line for line in lines if "alembic" in line]
        if form == "json":  # the first start migrated: its steps are logged, nothing else
            assert alembic and all("Running upgrade" in line for line in alembic), alembic
        else:  # the second found the schema current: not a word
            assert alembic == [], alembic
