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

from funnel_hpc.core.events import iter_events, now_rfc3339
from funnel_hpc.gateway.store import db
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
        with db.writing(engine) as conn:
            conn.execute(update(db.tasks).where(db.tasks.c.id == task_id,
                                                db.tasks.c.backend.not_in(instances))
                         .values(backend=instance, updated_at=now_rfc3339()))
    finally:
        engine.dispose()
    assert stored_instance(server, task_id) == instance
    return task_id


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
