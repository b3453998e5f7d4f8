"""A fake Docker Engine for moto's AWS Batch: the "compute environment" of the end-to-end tests.

moto's real Batch (``moto_server``, not the simple one) walks each job through
SUBMITTED, PENDING, RUNNABLE, STARTING and RUNNING, runs it as a container
through the Docker SDK (``docker.from_env()``), watches the container, kills
it on ``terminate_job`` and ends the job SUCCEEDED or FAILED (exit code,
reason). These machines have no Docker engine, so the tests start
``moto_server`` with ``DOCKER_HOST`` pointing at this HTTP server, which
answers the few Docker Engine API calls moto makes and runs each "container"'s
command as a plain local process (no image, no isolation: the command is the
funnel worker, which runs the executors in bwrap itself). Everything else -
the job states the gateway polls with describe_jobs, terminate_job, exit codes,
reasons - is moto's own behaviour.

Capacity: a real compute environment has a fixed number of vCPUs; moto has no
such limit. This engine runs at most ``slots`` containers; while they are all
busy it holds new jobs in SUBMITTED with moto's documented state manager (a
global 'manual' transition). moto ignores terminate_job for a held job (its
job thread only waits for the transition), so when a held job carries a
terminate reason the hold is lifted; the job then reaches this engine, which
gives it a container that has already exited with 137 (what AWS does: a
terminated RUNNABLE job never starts) and moto records it FAILED with the
reason. Lifting the hold lets other held jobs through too: the limit is soft.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tests.backend_helpers import QUEUE, MotoServer
from tests.waiting import wait_for

API_VERSION = "1.45"
# moto names a Batch container "<job name>-<job id>"; job ids are UUIDs
JOB_ID = re.compile(r"([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$")


@dataclass
class Container:
    id: str
    name: str
    command: list[str]
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    exit_code: int | None = None   # set when it never started (terminated before it ran)
    output: list[str] = field(default_factory=list)

    @property
    def job_id(self) -> str:
        found = JOB_ID.search(self.name)
        return found.group(1) if found else ""

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the container's process group if it is running."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)

    def code(self) -> int:
        if self.proc is None:
            return self.exit_code if self.exit_code is not None else 0
        code = self.proc.poll()
        if code is None:
            return 0
        return 128 - code if code < 0 else code  # killed by signal N: 128 + N, like Docker

    def inspect(self) -> dict[str, Any]:
        status = "running" if self.running() else ("created" if self.proc is None
                                                    and self.exit_code is None else "exited")
        return {"Id": self.id, "Name": "/" + self.name,
                "State": {"Status": status, "Running": status == "running",
                          "ExitCode": self.code()},
                "Config": {"Tty": True, "Cmd": self.command, "Image": "funnel-worker"},
                "NetworkSettings": {"Networks": {}, "IPAddress": ""}}


class FakeDockerEngine:
    """HTTP server answering moto's Docker SDK calls; "containers" are local processes."""

    def __init__(self, work_dir: Path, slots: int = 2):
        self.work_dir = work_dir
        self.slots = slots
        self.containers: dict[str, Container] = {}
        self.lock = threading.Lock()
        self.moto: MotoServer | None = None
        self.held = False
        self._stop = threading.Event()
        engine = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                engine.handle(self, "GET")

            def do_POST(self) -> None:
                engine.handle(self, "POST")

            def do_DELETE(self) -> None:
                engine.handle(self, "DELETE")

        class Server(ThreadingHTTPServer):
            # moto's job threads connect at once when a batch of jobs starts; the default
            # listen backlog of 5 overflows and a refused connection fails a job
            request_queue_size = 128

        self.http = Server(("127.0.0.1", 0), Handler)
        self.url = f"tcp://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    # ---- the compute environment's capacity, through moto's state manager ----

    def attach(self, moto: MotoServer) -> None:
        """Start holding jobs in SUBMITTED while all slots are busy (see module docstring)."""
        self.moto = moto
        threading.Thread(target=self._capacity_loop, args=(moto,), daemon=True).start()

    def _capacity_loop(self, moto: MotoServer) -> None:
        batch = moto.client("batch")
        while not self._stop.wait(0.2):
            try:
                waiting = batch.list_jobs(jobQueue=QUEUE, jobStatus="SUBMITTED")["jobSummaryList"]
            except Exception:  # noqa: BLE001 - moto restarting or gone: try again
                continue
            with self.lock:
                busy = sum(1 for c in self.containers.values() if c.running())
            terminated = any(job.get("statusReason") for job in waiting)
            hold = busy >= self.slots and not terminated
            if hold != self.held:
                moto.hold_jobs(hold)
                self.held = hold

    def close(self) -> None:
        self._stop.set()
        self.http.shutdown()
        with self.lock:
            for container in self.containers.values():
                container.kill()

    # ---- the Docker Engine API (the calls docker-py makes for moto) ----

    def handle(self, request: BaseHTTPRequestHandler, method: str) -> None:
        url = urlparse(request.path)
        path = re.sub(r"^/v[0-9.]+", "", url.path)
        length = int(request.headers.get("Content-Length") or 0)
        body = json.loads(request.rfile.read(length) or b"null") if length else None
        status, answer = self.route(method, path, body)
        data = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/octet-stream"
                            if isinstance(answer, bytes) else "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)

    def route(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if path in ("/version", "/_ping"):
            return 200, {"ApiVersion": API_VERSION, "Version": "fake", "MinAPIVersion": "1.24"}
        if method == "POST" and path == "/containers/create":
            return 201, {"Id": self.create(body), "Warnings": []}
        found = re.fullmatch(r"/containers/([^/]+)(/[a-z]+)?", path)
        container = self.containers.get(found.group(1)) if found else None
        if found is None or container is None:
            return 404, {"message": f"no such container: {path}"}
        action = found.group(2) or ""
        if method == "POST" and action == "/start":
            self.start(container)
            return 204, b""
        if method == "GET" and action == "/json":
            return 200, container.inspect()
        if method == "GET" and action == "/logs":
            return 200, self.logs(container)
        if method == "POST" and action == "/kill":
            container.kill()
            return 204, b""
        if method == "POST" and action == "/wait":
            if container.proc is not None:
                container.proc.wait()
            return 200, {"StatusCode": container.code()}
        if method == "DELETE" and action == "":
            with self.lock:
                self.containers.pop(container.id, None)
            return 204, b""
        return 404, {"message": f"not faked: {method} {path}"}

    def create(self, body: dict) -> str:
        name = str(body.get("name") or body.get("Name") or "")
        container = Container(id=os.urandom(16).hex(), name=name,
                              command=[str(a) for a in body.get("Cmd") or []],
                              env=dict(e.split("=", 1) for e in body.get("Env") or []))
        with self.lock:
            self.containers[container.id] = container
        return container.id

    def start(self, container: Container) -> None:
        if self._terminated(container.job_id):
            container.exit_code = 137  # terminated before it ran: never started
            return
        log = self.work_dir / f"container-{container.id}.log"
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/root",
               **container.env}
        with log.open("w") as out:
            container.proc = subprocess.Popen(container.command, env=env, cwd=self.work_dir,
                                              stdout=out, stderr=subprocess.STDOUT,
                                              start_new_session=True)

    def _terminated(self, job_id: str) -> bool:
        if self.moto is None or not job_id:
            return False
        jobs = self.moto.client("batch").describe_jobs(jobs=[job_id])["jobs"]
        return bool(jobs and jobs[0].get("statusReason"))

    def logs(self, container: Container) -> bytes:
        """Tty-style log: each line of the process's output after a timestamp (moto parses it)."""
        log = self.work_dir / f"container-{container.id}.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        lines = [line for line in text.splitlines() if line.strip()] or ["(no output)"]
        return "".join(f"{stamp} {line}\n" for line in lines).encode()

    def wait_idle(self, timeout: float = 30) -> None:
        def idle() -> bool:
            with self.lock:
                return not any(c.running() for c in self.containers.values())

        wait_for(idle, timeout, "every fake container to stop")
