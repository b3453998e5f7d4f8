"""Helpers for the slurmrestd tests: the shared daemon of scripts/setup/35-slurmrestd.sh,
private daemons a test may stop, squeue's view of the same jobs, rendered scripts."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from funnel_hpc.backends.base import BackendError
from funnel_hpc.backends.slurm import SlurmBackend
from funnel_hpc.backends.slurm_rest import SlurmRestClient, failure
from funnel_hpc.backends.slurm_rest_http import Answer, RestTransport, default_user
from funnel_hpc.backends.slurm_rest_jobs import JobRow, wait_status
from tests.backend_helpers import NO_WORK_DIR, backend_options, make_request
from tests.components import need
from tests.waiting import wait_for

# where scripts/setup/35-slurmrestd.sh starts the shared daemon
SOCKET = "/run/slurmrestd/slurmrestd.socket"
SLURMRESTD = "slurmrestd"
SLURMRESTD_REASON = "not answering on " + SOCKET + " (scripts/setup/35-slurmrestd.sh)"
Value = TypeVar("Value")
PLUGINS = "openapi/v0.0.36,openapi/v0.0.37,openapi/v0.0.38"
SQUEUE_COLUMNS = "JobArrayID:|,State:|,exit_code:|,Reason:"


def installed() -> bool:
    return shutil.which("slurmrestd") is not None or Path("/usr/sbin/slurmrestd").exists()


def client(socket_path: str = SOCKET, timeout: float = 30) -> SlurmRestClient:
    return SlurmRestClient(RestTransport(socket_path=socket_path, timeout=timeout),
                           default_user())


class Patient:
    """A SlurmRestClient whose calls are asked again while they fail transiently, as the
    reconciler asks again next tick: another test may stop slurmctld for a minute
    (tests/test_faults.py) or restart it (scripts/setup/30-slurm.sh). `tries`: how many
    requests-worth of attempts the last call took."""

    def __init__(self, rest: SlurmRestClient, timeout: float = 240):
        self.rest = rest
        self.timeout = timeout
        self.tries = 0

    def _again(self, call: Callable[[], Value], what: str) -> Value:
        done: list[Value] = []
        self.tries = 0

        def attempt() -> bool:
            self.tries += 1
            try:
                done.append(call())
            except BackendError as exc:
                if not exc.transient:
                    raise
                return False
            return True

        wait_for(attempt, self.timeout, f"slurmrestd to {what}", interval=1)
        return done[0]

    @property
    def calls(self) -> int:
        return self.rest.calls

    @property
    def version(self) -> str:
        return self.rest.version

    def submit(self, script: str) -> str:
        return self._again(lambda: self.rest.submit(script), "submit a job")

    def jobs(self) -> list[JobRow]:
        return self._again(self.rest.jobs, "list the jobs")

    def job(self, job_id: str) -> JobRow | None:
        return self._again(lambda: self.rest.job(job_id), f"show job {job_id}")

    def cancel(self, job_id: str) -> None:
        self._again(lambda: self.rest.cancel(job_id), f"cancel {job_id}")

    def withdraw(self, job_id: str) -> bool:
        return self._again(lambda: self.rest.withdraw(job_id), f"withdraw {job_id}")

    def answer(self, method: str, path: str) -> Answer:
        """One raw request (the version's paths), asked again while slurmctld is away."""
        def ask() -> Answer:
            answer = self.rest.transport.request(method, f"/slurm/{self.version}/{path}")
            if answer.status != 200:
                raise failure(path, answer)
            return answer
        return self._again(ask, f"{method} {path}")


def patient(socket_path: str = SOCKET) -> Patient:
    return Patient(client(socket_path))


def answers(socket_path: str = SOCKET) -> bool:
    rest = client(socket_path, timeout=10)
    try:
        rest.discover()
    except BackendError:
        return False
    finally:
        rest.close()
    return True


Facts = dict[str, tuple[str, str, str]]  # job id -> (state, code:signal, reason)


def squeue_rows(job_ids: set[str]) -> Facts:
    """squeue -r's (state, code:signal, reason) of the wanted ids, as SlurmBackend reads it
    (asked again while slurmctld is away)."""
    def ask() -> subprocess.CompletedProcess[str] | None:
        done = subprocess.run(["squeue", "-h", "--me", "-t", "all", "-r", "-O", SQUEUE_COLUMNS],
                              capture_output=True, text=True, timeout=60)
        return done if done.returncode == 0 else None

    done = wait_for(ask, 240, "squeue to answer", interval=1)
    rows = {}
    for line in done.stdout.splitlines():
        parts = [part.strip() for part in line.split("|", 3)]
        if len(parts) == 4 and parts[0] in job_ids:
            code = wait_status(int(parts[2])) if parts[2].isdigit() else parts[2]
            rows[parts[0]] = (parts[1], code, parts[3])
    return rows


def rest_rows(rest: SlurmRestClient | Patient, job_ids: set[str]) -> Facts:
    return {row.job_id: (row.state, row.exit_code, row.reason)
            for row in rest.jobs() if row.job_id in job_ids}


def rendered(tmp_path: Path, task_id: str, argv: list[str], directives: tuple[str, ...] = (),
             params: dict[str, str] | None = None, task: dict[str, Any] | None = None) -> str:
    """The script CLI mode would give sbatch for this task (templates/slurm.sh.j2), with
    the site's extra directives (e.g. --hold, --array=0-6)."""
    options = backend_options("slurm", site={"extra_directives": list(directives)})
    request = make_request(tmp_path, task or {"id": task_id}, argv, params=params)
    return SlurmBackend(options, NO_WORK_DIR).render_script(request)


class PrivateRestd:
    """A slurmrestd of the test's own on a socket under `folder` (as root, as the shared
    one), stopped by its pid; `conf` another slurm.conf (e.g. a controller that is down)."""

    def __init__(self, folder: Path, plugins: str = PLUGINS, conf: Path | None = None,
                 port: int | None = None):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.socket = str(folder / "rest.sock")
        self.plugins = plugins
        self.conf = conf
        self.port = port  # listen on 127.0.0.1:port with rest_auth/jwt instead
        self.log = folder / "slurmrestd.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> PrivateRestd:
        env = {**os.environ, "SLURMRESTD_SECURITY": "disable_user_check"}
        if self.conf:
            env["SLURM_CONF"] = str(self.conf)
        Path(self.socket).unlink(missing_ok=True)
        auth, where = "rest_auth/local", f"unix:{self.socket}"
        if self.port:
            auth, where = "rest_auth/jwt", f"127.0.0.1:{self.port}"
            env["SLURM_JWT"] = "daemon"
        with open(self.log, "ab") as log:
            process = subprocess.Popen(
                ["slurmrestd", "-a", auth, "-s", self.plugins, where],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        self.process = process
        wait_for(lambda: self._listening() or process.poll() is not None, 30,
                 f"slurmrestd to listen on {where}", detail=self.log.read_text)
        assert process.poll() is None, self.log.read_text()
        return self

    def _listening(self) -> bool:
        if not self.port:
            return Path(self.socket).exists()
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # slurmrestd's clean shutdown
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def __enter__(self) -> PrivateRestd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def scontrol_token(user: str) -> str:
    """A token for user from slurmctld, as `scontrol token` prints it (SLURM_JWT=...):
    slurmctld has AuthAltTypes=auth/jwt (scripts/setup/30-slurm.sh)."""
    line = subprocess.run(["scontrol", "token", f"username={user}", "lifespan=1800"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert line.startswith("SLURM_JWT=ey"), line
    return line


def jwt_restd(folder: Path, user: str = "") -> tuple[PrivateRestd, dict[str, str]]:
    """A private slurmrestd with rest_auth/jwt on a free port (not started) and the
    backend.slurm.rest settings that reach it as user (this account by default), its
    token in a file as `scontrol token` prints it."""
    from tests.server_helpers import free_port

    user = user or default_user()
    folder.mkdir(parents=True, exist_ok=True)
    token = folder / "token"
    token.write_text(scontrol_token(user) + "\n")
    token.chmod(0o600)
    daemon = PrivateRestd(folder / "restd", port=free_port())
    return daemon, {"url": f"http://127.0.0.1:{daemon.port}", "token_file": str(token),
                    "user": user}


def dead_controller_conf(folder: Path) -> Path:
    """This cluster's slurm.conf with the controller on a port nobody listens on."""
    text = Path("/etc/slurm/slurm.conf").read_text()
    text = re.sub(r"(?m)^SlurmctldPort=.*$", "", text) + "\nSlurmctldPort=9\n"
    conf = folder / "slurm.conf"
    conf.write_text(text)
    return conf


def held_ids(job_id: str, count: int) -> set[str]:
    return {f"{job_id}_{index}" for index in range(count)}


def scheduler_calls(backend: SlurmBackend) -> tuple[int, int]:
    """(processes run, slurmrestd requests sent) by a SlurmBackend so far."""
    rest = getattr(backend.link, "rest", None)
    return backend.runner.calls, (rest.calls if rest is not None else 0)


def need_slurmrestd() -> None:
    """The shared slurmrestd answers (fails, or skips where it is not installed), for tests
    outside tests/backends (whose conftest has the `slurmrestd` fixture)."""
    if not installed():
        need(SLURMRESTD, False, "not installed (scripts/setup/35-slurmrestd.sh)")
    wait_for(answers, 60, f"slurmrestd on {SOCKET}", interval=1, detail=lambda: SLURMRESTD_REASON)


class CannedRest:
    """Stands in for a SlurmRestClient: canned jobs-list rows (or an error), the calls made."""

    def __init__(self, rows: list[JobRow] | BackendError):
        self.answer = rows
        self.calls = 0
        self.canceled: list[str] = []

    def jobs(self) -> list[JobRow]:
        self.calls += 1
        if isinstance(self.answer, BackendError):
            raise self.answer
        return list(self.answer)

    def cancel(self, job_id: str) -> None:
        self.calls += 1
        self.canceled.append(job_id)

    def close(self) -> None:
        pass
