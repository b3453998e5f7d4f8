"""Shared pieces of the Grid Engine backend tests (tests/backends_ge/): the test
backend_parameters and polling a job until a condition holds."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from funnel_hpc.backends.base import JobState, JobStatus
from funnel_hpc.backends.gridengine import GridEngineBackend

# a backend_parameters key the tests may use to submit held jobs (-h: user hold)
TEST_PARAMETERS = {"hold": "-h", "project": "-P", "priority": "-p"}


def wait_for(backend: GridEngineBackend, job_id: str, done: Callable[[JobStatus], bool],
             timeout: float = 60) -> JobStatus:
    """Poll until done(status) holds; fail with the last status after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        status = backend.poll([job_id])[job_id]
        if done(status):
            return status
        if time.monotonic() > deadline:
            pytest.fail(f"job {job_id} still {status} after {timeout}s")
        time.sleep(0.5)


def finished(status: JobStatus) -> bool:
    return status.state.finished


def running(status: JobStatus) -> bool:
    return status.state == JobState.RUNNING
