"""Running scheduler commands: here (subprocess) or on a login node over SSH (paramiko).

Both runners take an argv list, never a shell string built from task data, and
count their calls (``calls``) so tests and benchmarks can check that a poll
costs a constant number of scheduler commands.

    runner = make_runner(options.ssh, timeout=60)   # LocalRunner or SSHRunner
    rc, out, err = runner.run(["sbatch", "--parsable"], input=script)
    result = runner.run(["squeue", "-h"]); result.returncode, result.stdout, result.stderr

Failures to run at all are results, not exceptions: 127 (command not found),
124 (timed out), 255 (SSH trouble), with the cause in stderr. ``failure`` turns a
failed result into the one BackendError of every command-line backend, with the
one transient rule: timed out, SSH trouble, or the scheduler's own words for "daemon
unreachable" (each backend's list) are transient; anything else, a missing command
included (a configuration error), is not.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import threading
from typing import TYPE_CHECKING, NamedTuple, Protocol

from funnel_hpc.backends.base import BackendError
from funnel_hpc.core.config import SshOptions

if TYPE_CHECKING:
    import paramiko

COMMAND_NOT_FOUND, TIMED_OUT, SSH_FAILED = 127, 124, 255
# the scheduler could not be reached, whatever the scheduler
UNREACHABLE_CODES = frozenset({TIMED_OUT, SSH_FAILED})


class Result(NamedTuple):
    """What a command did; unpacks as (returncode, stdout, stderr)."""

    returncode: int
    stdout: str
    stderr: str


class Runner(Protocol):
    """What a backend needs of a runner (LocalRunner, SSHRunner, a test's fake)."""

    calls: int

    def run(self, argv: list[str], input: str | None = None) -> Result: ...

    def close(self) -> None: ...


class LocalRunner:
    """Runs commands here with subprocess (no shell), each with a timeout in seconds;
    env, when given, is the whole environment of the commands."""

    def __init__(self, timeout: float = 60, env: dict[str, str] | None = None):
        self.timeout = timeout
        self.env = env
        self.calls = 0

    def run(self, argv: list[str], input: str | None = None) -> Result:
        self.calls += 1
        try:
            done = subprocess.run(argv, input=input, capture_output=True, text=True,
                                  timeout=self.timeout, env=self.env)
        except FileNotFoundError:
            return Result(COMMAND_NOT_FOUND, "", f"{argv[0]}: command not found")
        except subprocess.TimeoutExpired:
            return Result(TIMED_OUT, "", f"{argv[0]}: timed out after {self.timeout}s")
        except OSError as exc:
            return Result(126, "", f"{argv[0]}: {exc}")
        return Result(done.returncode, done.stdout, done.stderr)

    def close(self) -> None:
        pass


class SSHRunner:
    """Runs the same commands on a remote host (the cluster's login node) with paramiko.

    The argv is joined with shlex.join, so the remote login shell sees each
    argument as one word; ``input`` goes to the command's stdin. One connection
    is kept and reused (re-opened after an error); host keys must be known
    (known_hosts file, else the system's): unknown ones are refused.
    """

    def __init__(self, host: str, user: str = "", port: int = 22, key_file: str = "",
                 timeout: float = 60, known_hosts: str = ""):
        self.host, self.user, self.port = host, user or None, int(port)
        self.key_file, self.timeout, self.known_hosts = key_file or None, timeout, known_hosts
        self.calls = 0
        self._client: paramiko.SSHClient | None = None
        self._lock = threading.Lock()

    def _connect(self) -> paramiko.SSHClient:
        import paramiko

        if self._client is not None:
            transport = self._client.get_transport()
            if transport is not None and transport.is_active():
                return self._client
        client = paramiko.SSHClient()
        if self.known_hosts:
            client.load_host_keys(self.known_hosts)
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
        else:
            client.load_system_host_keys()
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
        client.connect(self.host, port=self.port, username=self.user,
                       key_filename=self.key_file, timeout=self.timeout,
                       allow_agent=False, look_for_keys=self.key_file is None)
        self._client = client
        return client

    def run(self, argv: list[str], input: str | None = None) -> Result:
        import paramiko

        self.calls += 1
        with self._lock:
            try:
                client = self._connect()
                stdin, stdout, stderr = client.exec_command(shlex.join(argv), timeout=self.timeout)
                if input is not None:
                    stdin.write(input)
                stdin.channel.shutdown_write()
                out = stdout.read().decode()
                err = stderr.read().decode()
                code = stdout.channel.recv_exit_status()
            except (paramiko.SSHException, OSError) as exc:
                self._client = None
                return Result(SSH_FAILED, "", f"ssh {self.host}: {exc}")
        return Result(code, out, err)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def is_transient(result: Result, unreachable: tuple[str, ...] = ()) -> bool:
    """The scheduler could not be reached: timed out, SSH trouble, or its output holds
    one of the scheduler's `unreachable` phrases. A missing command is not transient."""
    if result.returncode in UNREACHABLE_CODES:
        return True
    text = result.stderr + result.stdout
    return any(phrase in text for phrase in unreachable)


def failure(command: str, result: Result, unreachable: tuple[str, ...] = ()) -> BackendError:
    """The BackendError of a failed command: "<command> failed (<rc>): <its words>"."""
    words = (result.stderr or result.stdout).strip()[:300]
    if result.returncode == COMMAND_NOT_FOUND:
        words += " (check the backend's configuration and PATH)"
    return BackendError(f"{command} failed ({result.returncode}): {words}",
                        transient=is_transient(result, unreachable))


def job_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The gateway's environment without its FUNNEL_ variables: what scheduler commands
    (and so, with Slurm's default --export=ALL, the jobs) see. Configuration set through
    FUNNEL_ variables (a database URL with its password, say) stays in the gateway;
    workers get their sections of it in <work_dir>/worker-config.json instead."""
    environ = dict(os.environ if environ is None else environ)
    return {name: value for name, value in environ.items() if not name.startswith("FUNNEL_")}


def make_runner(ssh: SshOptions | None, timeout: float = 60) -> Runner:
    """SSHRunner when ssh.host is set (backend.<name>.ssh), else LocalRunner whose
    commands get job_environment()."""
    if ssh and ssh.host:
        return SSHRunner(ssh.host, ssh.user, ssh.port, ssh.key_file, timeout, ssh.known_hosts)
    return LocalRunner(timeout, env=job_environment())
