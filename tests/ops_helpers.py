"""Helpers for the operations tests: a real `funnel reconcile` process beside a server,
a failing `sbatch` on PATH, and a scrape parsed into samples."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import requests

from tests.metrics_helpers import samples
from tests.server_helpers import ServerProcess, clean_env, free_port, funnel_argv
from tests.waiting import wait_for

# what sbatch says when slurmctld is down: the Slurm backend counts it as a transient
# failure, so the reconciler tries (and fails) again every tick
UNREACHABLE_SBATCH = """#!/bin/sh
cat >/dev/null
echo "sbatch: error: Batch job submission failed: Unable to contact slurm controller \
(connect failure)" >&2
exit 1
"""


def failing_sbatch(directory: Path) -> str:
    """A directory holding an sbatch that always fails; returns a PATH starting with it."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "sbatch"
    script.write_text(UNREACHABLE_SBATCH)
    script.chmod(0o755)
    return f"{directory}:{os.environ.get('PATH', '/usr/bin:/bin')}"




def scrape(url: str) -> dict[tuple[str, tuple], float]:
    resp = requests.get(url + "/metrics", timeout=10)
    assert resp.status_code == 200, resp.text
    return samples(resp.text)


@dataclass
class ReconcileProcess:
    """`funnel reconcile` on a server's config, serving its metrics on reconciler.listen."""

    server: ServerProcess
    path: str = field(default_factory=lambda: os.environ.get("PATH", ""))
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.server.work_dir / "reconcile.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 60) -> ReconcileProcess:
        """Start it (the server's config must set reconciler.listen to this port)."""
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [*self.server.funnel, "reconcile", "--config", str(self.server.config_path)],
            cwd=self.server.cwd, env=clean_env(PATH=self.path), stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)
        proc = self.proc

        def answering() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"reconcile exited {proc.returncode}:\n{self.log()}")
            try:
                return requests.get(self.url + "/healthz", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        wait_for(answering, timeout, "funnel reconcile to serve /healthz", detail=self.log)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def run_funnel(*args: str, env: dict[str, str] | None = None,
               timeout: float = 120) -> subprocess.CompletedProcess:
    """`funnel ARGS...` to completion, text output captured."""
    return subprocess.run(funnel_argv(*args), env=env or clean_env(), capture_output=True,
                          text=True, timeout=timeout)


class HangUpServer:
    """A TCP listener that reads each request and closes the connection without an
    answer (a server dying mid-request); counts the requests that reached it."""

    def __init__(self) -> None:
        import socket
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.requests = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            with conn:
                if conn.recv(65536):
                    with self._lock:
                        self.requests += 1

    def close(self) -> None:
        self.sock.close()
