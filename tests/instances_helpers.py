"""Helpers for the several-backends tests (tests/test_instances.py, tests/test_overflow.py):
a gateway with several backend instances and auth on, tasks routed by tag, where each
task ran, and how many times its worker started."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, update
from werkzeug.security import generate_password_hash

from funnel_hpc.backends.base import BackendError, SubmitRequest
from funnel_hpc.core import config as config_mod
from funnel_hpc.core.events import iter_events, now_rfc3339
from funnel_hpc.gateway.reconcile.reconciler import Reconciler
from funnel_hpc.gateway.store import db
from funnel_hpc.gateway.web.app import make_service
from tests.reconciler_helpers import TRIVIAL, ScriptedBackend
from tests.server_helpers import ServerProcess
from tests.waiting import wait_for, wait_for_state

USER = ("alice", "alice-pw")
TICK = 0.5
TERMINAL = {"COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR", "CANCELED", "PREEMPTED"}
SITE_TAG = "site"


def rule(site: str, backend: str, **more: Any) -> dict:
    """A routing rule sending tasks tagged site=<site> to `backend`."""
    return {"when": {"tags": {SITE_TAG: site}}, "backend": backend, **more}


def gateway(work: Path, db_url: str, backends: dict, routing: list,
            **reconciler: Any) -> ServerProcess:
    """A real server (auth on, reconcilers on) over these instances and rules. backend.name
    names no instance: a task is only ever driven as routed."""
    return ServerProcess(work, db_url, reconcile=True, overrides={
        "auth": {"mode": "basic", "users": {USER[0]: generate_password_hash(USER[1])},
                 "admins": []},
        "backend": {"name": "local"},
        "backends": backends,
        "routing": routing,
        "reconciler": {"interval_seconds": TICK, **reconciler},
        "worker": {"container_driver": "bwrap", "poll_server_seconds": 1}})


def submit(server: ServerProcess, site: str, script: str, instances: list[str],
           instance: str) -> str:
    """POST a task tagged site=<site> (alice's); its `backend` column then holds
    `instance`. Routing at POST sets it (the routing branch); until then this places it,
    with one compare-and-set that changes only a task no instance holds."""
    resp = requests.post(server.api + "/tasks", auth=USER, timeout=10, json={
        "tags": {SITE_TAG: site},
        "executors": [{"image": "busybox", "command": ["sh", "-c", script]}]})
    assert resp.status_code == 200, resp.text
    task_id = resp.json()["id"]
    engine = db.make_engine(server.db_url)
    try:
        place(engine, task_id, instance, instances)
    finally:
        engine.dispose()
    assert stored_instance(server, task_id) == instance
    return task_id


def place(engine: Any, task_id: str, instance: str, instances: list[str]) -> None:
    """Put a task that no instance holds (not routed at POST yet) on `instance`."""
    with db.writing(engine) as conn:
        conn.execute(update(db.tasks).where(db.tasks.c.id == task_id,
                                            db.tasks.c.backend.not_in(instances))
                     .values(backend=instance, updated_at=now_rfc3339()))


def stored_instance(server: ServerProcess, task_id: str) -> str | None:
    engine = db.make_engine(server.db_url)
    try:
        with db.reading(engine) as conn:
            return conn.execute(select(db.tasks.c.backend)
                                .where(db.tasks.c.id == task_id)).scalar()
    finally:
        engine.dispose()


def wait_done(server: ServerProcess, task_id: str, timeout: float = 180.0) -> dict:
    return wait_for_state(server.api, task_id, TERMINAL, timeout, auth=USER,
                          detail=lambda: server.log()[-4000:])


def get_task(server: ServerProcess, task_id: str) -> dict:
    resp = requests.get(f"{server.api}/tasks/{task_id}", params={"view": "FULL"},
                        auth=USER, timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()


def metric(server: ServerProcess, name: str, **labels: str) -> float | None:
    """A sample of /metrics (signed in), or None."""
    resp = requests.get(server.url + "/metrics", auth=USER, timeout=10)
    assert resp.status_code == 200, resp.text
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                return sample.value
    return None


def slurm_partition(job_id: str) -> str:
    """The partition of a Slurm job (scontrol keeps finished jobs for MinJobAge)."""
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True,
                         text=True, timeout=30).stdout
    for word in out.split():
        if word.startswith("Partition="):
            return word.split("=", 1)[1]
    raise AssertionError(f"no partition for job {job_id}: {out!r}")


def slurm_state(job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True,
                         text=True, timeout=30).stdout
    for word in out.split():
        if word.startswith("JobState="):
            return word.split("=", 1)[1]
    return ""


def worker_starts(work_dir: Path, task_id: str) -> int:
    """How many times a worker of the task started: its INITIALIZING state events, in the
    event logs of every attempt (events.jsonl, events.jsonl.attempt<N>)."""
    starts = 0
    for path in sorted((work_dir / task_id).glob("events.jsonl*")):
        starts += sum(1 for event in iter_events(path)
                      if event.get("type") == "state" and event.get("state") == "INITIALIZING")
    return starts


class InstanceDouble(ScriptedBackend):
    """The reconciler tests' scheduler double, as backend instance `name`; `unreachable`:
    every submission finds its scheduler unreachable."""

    def __init__(self, name: str, unreachable: bool = False):
        super().__init__()
        self.name = name
        self.unreachable = unreachable

    def submit(self, request: SubmitRequest) -> str:
        if self.unreachable:
            raise BackendError("sbatch failed (1): Unable to contact slurm controller",
                               transient=True)
        return super().submit(request)


def two_instances(tmp_path: Path, max_queue_wait: str = "0.01s", unreachable: bool = False,
                  **reconciler: Any):
    """(service, {name: backend double}, {name: reconciler}) of instances a and b in one
    process, SQLite; one rule: every task to a, overflowing to b after max_queue_wait;
    `unreachable`: a's scheduler cannot be reached."""
    config = config_mod.load(environ={}, overrides={
        "work_dir": str(tmp_path / "work"), "backend": {"name": "local"},
        "backends": {"a": {"kind": "local"}, "b": {"kind": "local"}},
        "routing": [{"backend": "a", "overflow": ["b"], "max_queue_wait": max_queue_wait}],
        "reconciler": {"submit_threads": 1, **reconciler}})
    service = make_service(config)
    backends = {"a": InstanceDouble("a", unreachable), "b": InstanceDouble("b")}
    reconcilers = {name: Reconciler(service, backend, config,
                                    queries=service.reconciler_queries.for_instance(name))
                   for name, backend in backends.items()}
    return service, backends, reconcilers


def create_on(service: Any, instance: str) -> str:
    task_id = service.create(TRIVIAL)
    place(service.engine, task_id, instance, ["a", "b"])
    return task_id


def row_of(service: Any, task_id: str) -> Any:
    with db.reading(service.engine) as conn:
        return conn.execute(select(db.tasks).where(db.tasks.c.id == task_id)).one()


def gateway_lines(service: Any, task_id: str) -> list[str]:
    """Every gateway log line of the task, all attempts."""
    return [line for entry in row_of(service, task_id).logs
            for line in (entry.get("gateway_logs") or entry.get("system_logs") or [])]


class SilentListener:
    """A TCP port that accepts connections and never says a word: an SSH login node that
    hangs (each command waits out its timeout)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


def closed_port() -> int:
    """A port nothing listens on (connections refused): an unreachable login node."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Any, timeout: float, what: str, server: ServerProcess) -> Any:
    return wait_for(predicate, timeout, what, detail=lambda: server.log()[-4000:])
