"""Slurm job arrays in the tests: requests of tasks that share an array, waiting on many
elements with one poll each time, and what squeue says of an array."""

from __future__ import annotations

import subprocess
from pathlib import Path

import requests
from werkzeug.security import generate_password_hash

from funnel_hpc.backends import arrays
from funnel_hpc.backends.base import JobState, JobStatus, SubmitRequest
from funnel_hpc.backends.commands import Result
from funnel_hpc.backends.slurm import SlurmBackend
from funnel_hpc.core.events import iter_events
from tests.backend_helpers import FakeRunner, make_request
from tests.server_helpers import ServerProcess
from tests.waiting import wait_for

# each element writes its task id (the last part of its dir) to <task dir>/out
WRITE_OWN_ID = ["/bin/sh", "-c", 'basename "$(dirname "$1")" > "$1"', "sh"]


def requests_writing_ids(work: Path, prefix: str, count: int,
                         task: dict | None = None) -> list[SubmitRequest]:
    """`count` tasks <prefix><i> whose worker writes its own id to <task dir>/out."""
    return [make_request(work, {**(task or {}), "id": f"{prefix}{i}"},
                         [*WRITE_OWN_ID, str(work / f"{prefix}{i}" / "out")])
            for i in range(count)]


def wait_all(backend: SlurmBackend, job_ids: list[str], states: set[JobState],
             timeout: float = 300.0) -> dict[str, JobStatus]:
    """Poll (one call for all) until every job is in one of `states`."""
    last: dict[str, JobStatus] = {}

    def reached() -> dict[str, JobStatus] | None:
        last.clear()
        last.update(backend.poll(job_ids))
        return dict(last) if all(s.state in states for s in last.values()) else None

    def shown() -> str:
        off = {j: s for j, s in last.items() if s.state not in states}
        return f"{len(off)} not there yet, e.g. {list(off.items())[:3]}"

    return wait_for(reached, timeout, f"{len(job_ids)} jobs to reach {states}", interval=1.0,
                    detail=shown)


def squeue_elements(job: str) -> list[str]:
    """The element ids squeue -r lists for array job `job` (any state)."""
    done = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", job, "-O", "JobArrayID"],
                          capture_output=True, text=True, timeout=60)
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


def array_jobs_named(prefix: str) -> list[str]:
    """Array job ids (%F) of the jobs whose names start with prefix, once each."""
    done = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%F|%j"], capture_output=True,
                          text=True, timeout=60, check=True)
    return sorted({line.split("|", 1)[0] for line in done.stdout.splitlines()
                   if line.split("|", 1)[-1].startswith(prefix)})


class ScriptRunner(FakeRunner):
    """A FakeRunner that also keeps what each command read on standard input."""

    def __init__(self, answers: dict[tuple[str, ...], Result]):
        super().__init__(answers)
        self.inputs: list[str | None] = []

    def run(self, argv: list[str], input: str | None = None) -> Result:
        self.inputs.append(input)
        return super().run(argv, input)


def node_name() -> str:
    return subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True,
                          check=True).stdout.split()[0]


def node_up() -> bool:
    """The one node takes jobs (idle, mixed or allocated)."""
    states = set(subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True,
                                text=True).stdout.split())  # a line per partition
    return bool(states) and states <= {"idle", "mixed", "allocated"}


ARRAY_USER = ("arrayuser", "array-pw")


def arrays_server(work: Path, db_url: str, reconcile: bool = True,
                  **slurm: object) -> ServerProcess:
    """A real server with auth on (HTTP Basic) over real Slurm's bench partition, arrays
    at their default array_max (backend.slurm keys replaced by `slurm`)."""
    return ServerProcess(work, db_url, reconcile=reconcile, overrides={
        "auth": {"mode": "basic", "admins": [],
                 "users": {ARRAY_USER[0]: generate_password_hash(ARRAY_USER[1])}},
        "backend": {"name": "slurm", "slurm": {"partition": "bench", **slurm}},
        "reconciler": {"interval_seconds": 0.5},
        "worker": {"container_driver": "bwrap", "poll_server_seconds": 1}})


def post(server: ServerProcess, script: str, **fields: object) -> str:
    """A task of ARRAY_USER's running `sh -c script` in busybox; its id."""
    resp = requests.post(server.api + "/tasks", auth=ARRAY_USER, timeout=30, json={
        "executors": [{"image": "busybox", "command": ["sh", "-c", script]}], **fields})
    assert resp.status_code == 200, resp.text
    return str(resp.json()["id"])


def task_of(server: ServerProcess, task_id: str) -> dict:
    resp = requests.get(f"{server.api}/tasks/{task_id}", params={"view": "FULL"},
                        auth=ARRAY_USER, timeout=30)
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def array_list_names(work: Path) -> list[str]:
    """The task lists the gateway wrote in its work dir."""
    where = work / arrays.DIR_NAME
    return sorted(p.name for p in where.iterdir()) if where.is_dir() else []


def worker_ended(work: Path, task_id: str) -> bool:
    """The task's worker wrote its end (a final state) to its event log."""
    return any(event.get("type") == "state" and event.get("state") in
               ("COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR")
               for event in iter_events(work / task_id / "events.jsonl"))
