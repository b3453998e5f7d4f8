"""Helpers for replica tests: several servers on one work dir, the lease row, a counting
scheduler double that two reconcilers can share."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine

from funnel_hpc.backends.base import Backend, JobState, JobStatus, SubmitRequest
from funnel_hpc.gateway.store import db
from funnel_hpc.gateway.store.leases import DatabaseLease, reconciler_leases
from tests.backend_helpers import NO_WORK_DIR, double_options
from tests.server_helpers import ServerProcess, free_port


@dataclass
class ReplicaProcess(ServerProcess):
    """A `funnel server run` sharing its work dir with other replicas: its own config
    and log file in that dir."""

    name: str = "replica"

    @property
    def config_path(self):
        return self.work_dir / f"{self.name}.yaml"

    @property
    def log_path(self):
        return self.work_dir / f"{self.name}.log"

    def start(self, timeout: float = 30) -> ReplicaProcess:
        """Start; on a port taken between free_port() and the bind (other test sessions on
        the machine), again on fresh ports, up to three times."""
        for attempt in range(3):
            try:
                super().start(timeout)
                return self
            except RuntimeError as error:
                if "Address already in use" not in str(error) or attempt == 2:
                    raise
                self.port, self.grpc_port = free_port(), free_port()
        return self


class Unelected(DatabaseLease):
    """A PostgreSQL lease that always says held: two reconcilers at once, on purpose."""

    def held(self) -> bool:
        return True


class CountingBackend(Backend):
    """Counts every submit call per task (thread-safe); jobs stay PENDING."""

    name = "counting"
    parallel_submit = True

    def __init__(self) -> None:
        super().__init__(double_options(), NO_WORK_DIR)
        self.lock = threading.Lock()
        self.calls: list[str] = []

    def submit(self, request: SubmitRequest) -> str:
        time.sleep(0.005)  # a scheduler round trip: lets the two reconcilers interleave
        with self.lock:
            self.calls.append(request.task_id)
            return str(1000 + len(self.calls))

    def cancel(self, job_id: str) -> None:
        pass

    def poll(self, job_ids: list[str]) -> dict[str, JobStatus]:
        return {job_id: JobStatus(JobState.PENDING) for job_id in job_ids}


def lease_row(engine: Engine, backend: str) -> Any:
    with db.reading(engine) as conn:
        return conn.execute(select(reconciler_leases)
                            .where(reconciler_leases.c.backend == backend)).first()


def holder_pid(row: Any) -> int:
    """The process id in a lease holder name (host:pid:random)."""
    return int(row.holder.split(":")[1])
