"""Slurm backend: script rendering against hostile input, and the real single-node cluster."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from backends.base import BackendError, JobState, SubmitRequest
from backends.slurm import STATE_MAP, SlurmBackend, map_state, parse_job_id
from backends.templating import TemplateValueError
from gateway import config as config_mod

HOSTILE = "x\n#SBATCH --wrap=evil\n$(touch /tmp/pwned) `id` 'q' \"d\"; rm -rf /"


def options(**extra) -> dict:
    base = config_mod.load(environ={})["backend"]["slurm"]
    return {**base, **extra}


def make_request(tmp_path: Path, task: dict, argv: list[str] | None = None,
                 params: dict | None = None) -> SubmitRequest:
    task_dir = tmp_path / task["id"]
    task_dir.mkdir(parents=True, exist_ok=True)
    return SubmitRequest(task_id=task["id"], task=task, task_dir=task_dir,
                         worker_argv=argv or ["/bin/true"], backend_parameters=params or {})


def directives(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


def test_hostile_task_values_add_no_directive_and_no_command(tmp_path):
    backend = SlurmBackend(options(), {"work_dir": str(tmp_path)})
    benign = {"id": "abc123", "name": "ok", "tags": {"a": "b"},
              "executors": [{"image": "busybox", "command": ["echo", "hi"], "env": {"A": "1"}}],
              "resources": {"cpu_cores": 2, "ram_gb": 1.5}}
    hostile = {"id": "abc123", "name": HOSTILE, "tags": {HOSTILE: HOSTILE},
               "description": HOSTILE,
               "executors": [{"image": HOSTILE, "command": [HOSTILE, "$(reboot)"],
                              "env": {"A": HOSTILE}}],
               "resources": {"cpu_cores": 2, "ram_gb": 1.5}}
    argv_hostile = ["/bin/echo", HOSTILE, "$(id)", "`id`", "'", '"', ";", "\n#SBATCH --x"]
    good = backend.render_script(make_request(tmp_path, benign))
    bad = backend.render_script(make_request(tmp_path, hostile, argv_hostile))
    assert directives(good) == directives(bad)
    for script in (good, bad):
        path = tmp_path / "s.sh"
        path.write_text(script)
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    # the worker command line arrives verbatim: run the script's last line
    exec_line = bad.strip().splitlines()[-1]
    assert exec_line.startswith("exec ")
    out = subprocess.run(["bash", "-c", exec_line[len("exec "):]], capture_output=True,
                         text=True, cwd=tmp_path)
    assert out.stdout == " ".join(argv_hostile[1:]) + "\n"
    assert not Path("/tmp/pwned").exists()


@pytest.mark.parametrize("value", ["1\n#SBATCH --wrap=x", "$(id)", "a b", "`id`", "x;y",
                                   "'q'", "a\rb"])
def test_backend_parameter_values_that_cannot_be_safe_are_refused(tmp_path, value):
    backend = SlurmBackend(options(), {"work_dir": str(tmp_path)})
    request = make_request(tmp_path, {"id": "t1"}, params={"qos": value})
    with pytest.raises(TemplateValueError):
        backend.render_script(request)
    with pytest.raises(BackendError, match="not allowed in a scheduler directive"):
        backend.submit(request)


def test_allowed_backend_parameters_become_directives(tmp_path):
    backend = SlurmBackend(options(), {"work_dir": str(tmp_path)})
    script = backend.render_script(make_request(
        tmp_path, {"id": "t2", "resources": {"zones": ["debug"], "ram_gb": 2, "disk_gb": 1}},
        params={"qos": "high", "time": "01:00:00", "notlisted": "x"}))
    lines = directives(script)
    assert "#SBATCH --qos=high" in lines and "#SBATCH --time=01:00:00" in lines
    assert "#SBATCH --partition=debug" in lines and "#SBATCH --mem=2048M" in lines
    assert "#SBATCH --tmp=1024M" in lines
    assert not any("notlisted" in line for line in lines)


def test_state_map_and_parsing():
    assert map_state("CANCELLED by 0") == JobState.CANCELLED
    assert map_state("OUT_OF_MEMORY") == JobState.FAILED
    assert map_state("WEIRD") == JobState.UNKNOWN
    assert all(isinstance(v, JobState) for v in STATE_MAP.values())
    assert parse_job_id("123\n") == "123" and parse_job_id("456;cluster") == "456"
    with pytest.raises(BackendError):
        parse_job_id("sbatch: error: nope")


# ---- real Slurm ----

def slurm_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0


real = pytest.mark.skipif(not slurm_up() and not os.environ.get("CI"),
                          reason="Slurm not running (scripts/setup/30-slurm.sh)")


def wait(backend, job_id, states, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = backend.poll([job_id])[job_id]
        if status.state in states:
            return status
        time.sleep(0.5)
    raise AssertionError(f"job {job_id}: {status}")


@real
@pytest.mark.slurm
def test_real_complete_fail_cancel_and_lost(tmp_path):
    backend = SlurmBackend(options(), {"work_dir": str(tmp_path)})
    done = make_request(tmp_path, {"id": "ok1"}, ["/bin/sh", "-c", f"echo hi > {tmp_path}/ok1/out"])
    job = backend.submit(done)
    assert wait(backend, job, {JobState.COMPLETED}).state == JobState.COMPLETED
    assert (tmp_path / "ok1" / "out").read_text() == "hi\n"

    bad = backend.submit(make_request(tmp_path, {"id": "bad1"}, ["/bin/sh", "-c", "exit 3"]))
    status = wait(backend, bad, {JobState.FAILED})
    assert "FAILED" in status.reason

    pending = backend.submit(make_request(tmp_path, {"id": "pend1"}, ["/bin/true"],
                                          params={"begin": "now+1hour"}))
    assert backend.poll([pending])[pending].state == JobState.PENDING
    backend.cancel(pending)
    assert wait(backend, pending, {JobState.CANCELLED}).state == JobState.CANCELLED

    running = backend.submit(make_request(tmp_path, {"id": "run1"}, ["/bin/sleep", "60"]))
    wait(backend, running, {JobState.RUNNING})
    backend.cancel(running)
    assert wait(backend, running, {JobState.CANCELLED}).state == JobState.CANCELLED
    backend.cancel(running)  # again: no error

    behind = backend.submit(make_request(tmp_path, {"id": "beh1"}, ["/bin/sleep", "60"]))
    wait(backend, behind, {JobState.RUNNING})
    subprocess.run(["scancel", behind], check=True)
    assert wait(backend, behind, {JobState.CANCELLED}).state == JobState.CANCELLED

    assert backend.poll(["99999999"])["99999999"].state == JobState.LOST
    assert backend.recover("pend1", tmp_path / "pend1") == pending
    assert backend.recover("never-submitted", tmp_path) is None


@real
@pytest.mark.slurm
def test_poll_costs_constant_scheduler_calls(tmp_path):
    backend = SlurmBackend(options(), {"work_dir": str(tmp_path)})
    backend.accounting_enabled()  # probed once, then cached
    jobs = [backend.submit(make_request(tmp_path, {"id": f"many{i}"}, ["/bin/true"],
                                        params={"begin": "now+1hour"})) for i in range(30)]
    try:
        costs = []
        for n in (1, 10, 30):
            before = backend.runner.calls
            statuses = backend.poll(jobs[:n])
            costs.append(backend.runner.calls - before)
            assert len(statuses) == n
            assert all(s.state == JobState.PENDING for s in statuses.values())
        assert costs == [1, 1, 1]
    finally:
        subprocess.run(["scancel", *jobs])


@pytest.fixture
def sshd(tmp_path):
    """A private sshd on 127.0.0.1 that accepts one generated key for root."""
    import getpass

    from tests.conftest import free_port

    sshd_bin = shutil.which("sshd") or "/usr/sbin/sshd"
    if not Path(sshd_bin).exists():
        pytest.skip("openssh-server not installed (scripts/setup/30-slurm.sh)")
    keys = tmp_path / "ssh"
    keys.mkdir(mode=0o700)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / "host")],
                   check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / "client")],
                   check=True)
    (keys / "authorized_keys").write_text((keys / "client.pub").read_text())
    os.chmod(keys / "authorized_keys", 0o600)
    port = free_port()
    Path("/run/sshd").mkdir(exist_ok=True)
    proc = subprocess.Popen([sshd_bin, "-D", "-e", "-p", str(port), "-h", str(keys / "host"),
                             "-o", "ListenAddress=127.0.0.1",
                             "-o", f"AuthorizedKeysFile={keys / 'authorized_keys'}",
                             "-o", "PasswordAuthentication=no", "-o", "PermitRootLogin=yes",
                             "-o", "StrictModes=no", "-o", f"PidFile={keys / 'sshd.pid'}",
                             "-o", "UsePAM=no"],
                            stderr=subprocess.PIPE)
    host_key = (keys / "host.pub").read_text().split()
    (keys / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    deadline = time.monotonic() + 10
    import socket
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    yield {"host": "127.0.0.1", "port": port, "user": getpass.getuser(),
           "key_file": str(keys / "client"), "known_hosts": str(keys / "known_hosts")}
    proc.terminate()
    proc.wait(5)


@real
@pytest.mark.slurm
def test_remote_mode_over_ssh(tmp_path, sshd):
    backend = SlurmBackend(options(ssh=sshd), {"work_dir": str(tmp_path)})
    from backends.commands import SSHRunner
    assert isinstance(backend.runner, SSHRunner)
    job = backend.submit(make_request(tmp_path, {"id": "ssh1"},
                                      ["/bin/sh", "-c", f"echo via-ssh > {tmp_path}/ssh1/out"]))
    assert wait(backend, job, {JobState.COMPLETED}).state == JobState.COMPLETED
    assert (tmp_path / "ssh1" / "out").read_text() == "via-ssh\n"
    held = backend.submit(make_request(tmp_path, {"id": "ssh2"}, ["/bin/true"],
                                       params={"begin": "now+1hour"}))
    calls = backend.runner.calls
    assert backend.poll([job, held])[held].state == JobState.PENDING
    assert backend.runner.calls - calls == 1
    backend.cancel(held)
    assert wait(backend, held, {JobState.CANCELLED}).state == JobState.CANCELLED
    backend.close()


def test_ssh_refuses_unknown_host_key(tmp_path, sshd):
    from backends.commands import SSHRunner

    (tmp_path / "empty_known_hosts").write_text("")
    runner = SSHRunner(sshd["host"], sshd["user"], sshd["port"], sshd["key_file"],
                       timeout=10, known_hosts=str(tmp_path / "empty_known_hosts"))
    result = runner.run(["true"])
    assert result.returncode == 255 and "ssh" in result.stderr
