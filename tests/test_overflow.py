"""Overflow (issue #28, item 3): a QUEUED task leaves its instance for the next one its rule
names when its job waited too long or its instance's scheduler keeps failing, only once the
scheduler confirmed the job gone, never back, and never run twice.

In process, one tick at a time, with the reconciler tests' scheduler double: what is and
is not confirmation. With real components: a Slurm job held in its queue overflows to the
local backend, and an unreachable Slurm login node's tasks overflow to Grid Engine."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from funnel_hpc.backends.base import JobState
from funnel_hpc.backends.slurm import SlurmBackend
from funnel_hpc.core.routing import ROUTE_TAG
from funnel_hpc.gateway.store import db
from tests.backend_helpers import backend_options
from tests.components import (
    BWRAP,
    BWRAP_REASON,
    GRIDENGINE,
    GRIDENGINE_REASON,
    SLURM,
    SLURM_REASON,
    bwrap_ready,
    gridengine_ready,
    need,
    slurm_answers,
)
from tests.instances_helpers import (
    closed_port,
    create_on,
    gateway,
    gateway_lines,
    get_task,
    row_of,
    rule,
    slurm_state,
    submit,
    two_instances,
    wait_done,
    worker_starts,
)
from tests.reconciler_helpers import write_events
from tests.waiting import wait_for


def withdrawn(tmp_path: Path):
    """A task on a whose job 100 waited past max_queue_wait (10 ms) and was withdrawn."""
    service, backends, reconcilers = two_instances(tmp_path)
    task_id = create_on(service, "a")
    reconcilers["a"].tick()  # submits job 100
    reconcilers["a"].tick()  # sees it PENDING
    time.sleep(0.02)  # past max_queue_wait: the next tick withdraws it
    reconcilers["a"].tick()
    assert backends["a"].canceled == ["100"]
    return service, backends, reconcilers, task_id


def test_a_confirmed_withdrawal_moves_the_task_once(tmp_path):
    service, backends, reconcilers, task_id = withdrawn(tmp_path)
    backends["a"].end("100", JobState.CANCELLED, "scancel")
    reconcilers["b"].tick()  # nothing for b yet
    assert backends["b"].jobs == {}
    reconcilers["a"].tick()  # the poll confirms: moved to b, no job
    row = row_of(service, task_id)
    assert (row.backend, row.job_id, row.state) == ("b", None, "QUEUED")
    # the route tag follows the task: in its document and in the tag table a filter reads
    assert row.spec["tags"][ROUTE_TAG] == "b"
    with db.reading(service.engine) as conn:
        assert conn.execute(select(db.task_tags.c.value).where(
            db.task_tags.c.key == ROUTE_TAG)).scalars().all() == ["b"]
    assert any("withdrawn from a after 0s queued; scheduler: CANCELLED scancel; submitted "
               "to b (attempt 2 of the route)" in line
               for line in gateway_lines(service, task_id))
    reconcilers["a"].tick()
    assert task_id not in reconcilers["a"].index.rows  # a never sees it again
    reconcilers["b"].tick()  # b submits it
    assert list(backends["b"].jobs.values()) == [task_id]
    for _ in range(3):  # b is the last of the route: it stays there, however long it waits
        reconcilers["b"].tick()
        reconcilers["a"].tick()
    row = row_of(service, task_id)
    assert (row.backend, row.job_id) == ("b", "100")
    assert backends["b"].canceled == [] and len(backends["a"].jobs) == 1
    assert [entry["metadata"]["backend"] for entry in row.logs] == ["a", "b"]


def test_an_unreachable_scheduler_confirms_nothing(tmp_path):
    service, backends, reconcilers, task_id = withdrawn(tmp_path)
    backends["a"].end("100", JobState.UNKNOWN, "squeue: Unable to contact slurm controller")
    for _ in range(5):
        reconcilers["a"].tick()
        reconcilers["b"].tick()
    row = row_of(service, task_id)
    assert (row.backend, row.job_id, row.state) == ("a", "100", "QUEUED")
    assert backends["b"].jobs == {}


def test_a_job_that_started_anyway_keeps_its_task(tmp_path):
    service, backends, reconcilers, task_id = withdrawn(tmp_path)
    backends["a"].end("100", JobState.RUNNING)
    for _ in range(3):
        reconcilers["a"].tick()
        reconcilers["b"].tick()
    row = row_of(service, task_id)
    assert (row.backend, row.job_id, row.state) == ("a", "100", "INITIALIZING")
    assert backends["b"].jobs == {}


def test_a_job_that_ended_completed_ran_and_keeps_its_task(tmp_path):
    service, backends, reconcilers, task_id = withdrawn(tmp_path)
    backends["a"].end("100", JobState.COMPLETED)  # it started and ended between two polls
    for _ in range(3):
        reconcilers["a"].tick()
        reconcilers["b"].tick()
    row = row_of(service, task_id)
    assert row.backend == "a" and row.job_id == "100"
    assert backends["b"].jobs == {}


def test_a_worker_that_started_anyway_keeps_its_task(tmp_path):
    service, backends, reconcilers, task_id = withdrawn(tmp_path)
    # the job ended CANCELLED, but its worker had begun: the task is not moved
    write_events(Path(reconcilers["a"].config.work_dir) / task_id, "INITIALIZING")
    backends["a"].end("100", JobState.CANCELLED)
    for _ in range(3):
        reconcilers["a"].tick()
        reconcilers["b"].tick()
    row = row_of(service, task_id)
    assert row.backend == "a" and row.job_id == "100"
    assert backends["b"].jobs == {}


def test_an_instance_failing_moves_tasks_that_never_got_a_job(tmp_path):
    service, backends, reconcilers = two_instances(tmp_path, max_queue_wait="1h",
                                                   unreachable=True,
                                                   overflow_after_failed_polls=3)
    task_id = create_on(service, "a")
    for ticks in range(1, 4):
        reconcilers["a"].tick()
        assert row_of(service, task_id).backend == ("a" if ticks < 3 else "b")
    assert any("withdrawn from a after its scheduler failing for 3 ticks; submitted to b"
               in line for line in gateway_lines(service, task_id))
    reconcilers["b"].tick()
    assert list(backends["b"].jobs.values()) == [task_id]


# ---- real components ----

@pytest.mark.slurm
def test_slurm_withdraw_cancels_only_a_pending_job(tmp_path):
    """scancel --state=PENDING: a held job is canceled, a running one runs on."""
    need(SLURM, slurm_answers(), SLURM_REASON)
    backend = SlurmBackend(backend_options("slurm", partition="debug"), tmp_path)
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/sh\nsleep 60\n")
    held, running = (subprocess.run(["sbatch", "--parsable", *extra, "-p", "debug",
                                     "-o", "/dev/null", str(script)], check=True,
                                    capture_output=True, text=True).stdout.strip()
                     for extra in (["--hold"], []))
    try:
        wait_for(lambda: backend.poll([running])[running].state == JobState.RUNNING, 120,
                 "the second job to run")
        backend.withdraw(held)
        backend.withdraw(running)
        wait_for(lambda: slurm_state(held) == "CANCELLED", 60, "the held job canceled")
        assert backend.poll([running])[running].state == JobState.RUNNING
    finally:
        subprocess.run(["scancel", held, running], capture_output=True)


@pytest.fixture
def slurm_and_bwrap() -> None:
    need(BWRAP, bwrap_ready(), BWRAP_REASON)
    need(SLURM, slurm_answers(), SLURM_REASON)


@pytest.mark.slurm
def test_a_held_slurm_job_overflows_to_the_local_backend(slurm_and_bwrap, databases,
                                                          tmp_path):
    """`held` submits every job with --hold: it waits PENDING (JobHeldUser) forever. After
    max_queue_wait the reconciler withdraws it (scancel --state=PENDING), Slurm shows it
    CANCELLED, the task moves to `here` and completes there: one worker start."""
    backends = {"held": {"kind": "slurm", "partition": "debug",
                         "site": {"extra_directives": ["--hold"]}},
                "here": {"kind": "local"}}
    routing = [rule("long", "held", overflow=["here"], max_queue_wait="3s"),
               {"backend": "here"}]
    server = gateway(tmp_path / "srv", databases.new("sqlite"), backends, routing).start()
    try:
        task_id = submit(server, "long", "echo overflowed", list(backends), "held")
        task = wait_done(server, task_id)
        assert task["state"] == "COMPLETE", task
        first, last = task["logs"][0], task["logs"][-1]
        assert first["metadata"]["backend"] == "held"
        assert last["metadata"]["backend"] == "here"
        assert last["logs"][0]["stdout"] == "overflowed\n"
        assert slurm_state(first["metadata"]["job_id"]) == "CANCELLED"
        lines = [line for entry in task["logs"] for line in entry["system_logs"]]
        assert any("withdrawn from held after" in line and "submitted to here (attempt 2 of "
                   "the route)" in line for line in lines), lines
        assert worker_starts(server.work_dir, task_id) == 1
    finally:
        server.stop()


@pytest.mark.slurm
@pytest.mark.gridengine
def test_an_unreachable_slurm_overflows_to_gridengine(slurm_and_bwrap, databases, tmp_path):
    """`down` is a Slurm instance whose login node refuses connections (a stopped
    slurmctld would stop the other tests' Slurm: this one fails the same way for this
    instance only). Its submissions fail as unreachable; after
    reconciler.overflow_after_failed_polls ticks its task, which never got a job, moves to
    Grid Engine and completes there."""
    need(GRIDENGINE, gridengine_ready(), GRIDENGINE_REASON)
    backends = {"down": {"kind": "slurm", "command_timeout": 5,
                         "ssh": {"host": "127.0.0.1", "port": closed_port()}},
                "ge": {"kind": "gridengine", "mode": "cli"}}
    routing = [rule("down", "down", overflow=["ge"]), {"backend": "ge"}]
    server = gateway(tmp_path / "srv", databases.new("sqlite"), backends, routing).start()
    try:
        task_id = submit(server, "down", "echo via-gridengine", list(backends), "down")
        task = wait_done(server, task_id)
        assert task["state"] == "COMPLETE", task
        assert task["logs"][-1]["metadata"]["backend"] == "ge"
        assert task["logs"][-1]["logs"][0]["stdout"] == "via-gridengine\n"
        lines = [line for entry in task["logs"] for line in entry["system_logs"]]
        assert any("withdrawn from down after its scheduler failing for 3 ticks; submitted "
                   "to ge (attempt 2 of the route)" in line for line in lines), lines
        assert worker_starts(server.work_dir, task_id) == 1
        assert get_task(server, task_id)["state"] == "COMPLETE"
    finally:
        server.stop()
