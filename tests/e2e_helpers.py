"""The end-to-end suite's shared pieces (tests/test_e2e.py and the tests that reuse its
servers): a backend as the suite runs it, the local and Slurm harnesses, a server with its
reconciler on a backend, and short task helpers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from funnel_hpc.core.events import iter_events
from tests.components import SLURM, SLURM_REASON, need, slurm_answers
from tests.server_helpers import ServerProcess
from tests.waiting import wait_for, wait_for_state

TICK = 0.5
TERMINAL = {"COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR", "CANCELED", "PREEMPTED"}


@dataclass
class E2EBackend:
    """One backend as the suite runs it: its config and how to kill a job behind the
    gateway's back."""

    id: str                                   # the parametrisation id
    name: str                                 # backend.name (task metadata)
    config: Callable[[Path], dict]            # work dir -> backend.<section> overrides
    kill_outside: Callable[[dict, Path], object]  # (task, work dir) -> ignored
    close: Callable[[], None] = field(default=lambda: None)


def _kill_local(task: dict, work_dir: Path) -> None:
    pid = json.loads((work_dir / task["id"] / "local.pid").read_text())["pid"]
    os.killpg(pid, signal.SIGKILL)


def job_id(task: dict) -> str:
    return task["logs"][0]["metadata"]["job_id"]


def fixed(section: dict) -> Callable[[Path], dict]:
    return lambda _work: section


def start_local() -> E2EBackend:
    return E2EBackend("local", "local", fixed({"local": {"max_concurrent": 2}}), _kill_local)


def start_slurm() -> E2EBackend:
    need(SLURM, slurm_answers(), SLURM_REASON)
    return E2EBackend("slurm", "slurm", fixed({}), lambda task, _w: subprocess.run(
        ["scancel", job_id(task)], check=True))


def make_server(backend: str | E2EBackend, work: Path, db_url: str,
                same_address_as: ServerProcess | None = None) -> ServerProcess:
    """A server with the reconciler on, on backend (an E2EBackend, or local/slurm by name);
    same_address_as: listen where that (stopped) server did, as a restarted gateway does."""
    if isinstance(backend, str):
        backend = {"local": start_local, "slurm": start_slurm}[backend]()
    overrides = {"backend": {"name": backend.name, **backend.config(work)},
                 "reconciler": {"interval_seconds": TICK},
                 "worker": {"container_driver": "bwrap", "poll_server_seconds": 1}}
    if same_address_as is None:
        return ServerProcess(work, db_url, overrides=overrides, reconcile=True)
    return ServerProcess(work, db_url, overrides=overrides, reconcile=True,
                         port=same_address_as.port, grpc_port=same_address_as.grpc_port)


def create(server, executors, **fields) -> str:
    resp = requests.post(server.api + "/tasks", json={"executors": executors, **fields},
                         timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()["id"]


def get(server, task_id, view="FULL") -> dict:
    return requests.get(f"{server.api}/tasks/{task_id}", params={"view": view}, timeout=10).json()


def wait_state(server, task_id, states, timeout=90.0) -> dict:
    """The task (FULL) once in one of states; on timeout the error shows the server's log."""
    return wait_for_state(server.api, task_id, states, timeout,
                          detail=lambda: server.log()[-3000:])


def sh(script: str, **fields) -> dict:
    return {"image": "busybox", "command": ["sh", "-c", script], **fields}


def executor_started(server: ServerProcess, task_id: str) -> bool:
    """Whether the task's worker has recorded its first executor_start (the executor's
    process runs), read from the task's event log in the shared work dir."""
    return any(event["type"] == "executor_start"
               for event in iter_events(Path(server.work_dir) / task_id / "events.jsonl"))


def wait_executor_started(server: ServerProcess, task_id: str, timeout: float = 90.0) -> None:
    wait_for(lambda: executor_started(server, task_id), timeout,
             f"task {task_id}'s executor to start", detail=lambda: server.log()[-3000:])


def reconciler_ticks(server: ServerProcess) -> float:
    """How many ticks the server's reconciler has run (funnel_reconciler_tick_seconds)."""
    resp = requests.get(server.url + "/metrics", timeout=10)
    assert resp.status_code == 200, resp.text
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            if sample.name == "funnel_reconciler_tick_seconds_count":
                return sample.value
    return 0.0


def wait_ticks(server: ServerProcess, count: int, timeout: float = 90.0) -> None:
    """Return once the reconciler has run count more ticks than when called."""
    target = reconciler_ticks(server) + count
    wait_for(lambda: reconciler_ticks(server) >= target, timeout,
             f"{count} reconciler ticks", detail=lambda: server.log()[-3000:])


def port_closed(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:port any more (a killed server's socket)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0
