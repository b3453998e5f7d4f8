"""The executor sandbox, attacked for real: the worker (and once a real server) runs tasks in
the test registry's images (scripts/setup/45-registry.sh) under bwrap and proot, and every
attack of issue 15 must fail: host files, capabilities, remounts, writes to the image, the
task dir's secrets, other tasks, host /proc, LD_PRELOAD on the host side, the network."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading

import pytest
import requests

from tests.image_helpers import ANONYMOUS, AUTHENTICATED, CA_FILE, PASSWORD, USERNAME
from tests.server_helpers import TEST_REGISTRIES, ServerProcess
from tests.waiting import wait_for_state
from tests.worker_helpers import need

pytestmark = pytest.mark.registry

TESTIMAGE = f"{ANONYMOUS}/funnel/testimage:1"
TERMINAL = ("COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR", "CANCELED")


def in_image(script: str, image: str = TESTIMAGE, **fields) -> dict:
    return {"image": image, "command": ["sh", "-c", script], **fields}


def ok(run) -> list[dict]:
    assert run.state == "COMPLETE", (run.system_logs, run.stderr, run.fold.task_log["logs"])
    return run.fold.task_log["logs"]


ENGINES = {"bwrap": "bwrap", "proot": "proot", "charliecloud": "ch-run"}


@pytest.fixture(params=list(ENGINES))
def driver(request, harness):
    need(ENGINES[request.param])
    return request.param


def test_the_image_runs_not_the_host(harness, driver):
    run = harness.run(harness.task(executors=[in_image(
        ". /etc/os-release; echo id=$ID; cat /opt/funnel-test/marker >/dev/null && echo marker;"
        " echo path=$PATH image=$FUNNEL_IMAGE pwd=$(pwd);"
        " test -e /etc/debian_version && echo HOST-DEBIAN;"
        " test -e /usr/bin/python3 && echo HOST-PY;"
        " echo done")]), config=harness.config(container_driver=driver))
    ok(run)
    out = run.executor(0)["stdout"].split()
    if driver == "charliecloud":  # its root links to the image: pwd shows the link's target
        assert out[4].startswith("pwd=/") and out[4].endswith("/rootfs/opt/funnel-test")
        out[4] = "pwd=/opt/funnel-test"
    assert out == ["id=funnel-test", "marker", "path=/opt/funnel-test/bin:/bin",
                   "image=testimage", "pwd=/opt/funnel-test", "done"], run.executor(0)
    assert f"image {TESTIMAGE}: {TESTIMAGE}@sha256:" in run.system_logs


def test_executor_env_and_workdir_override_the_image_config(harness):
    run = harness.run(harness.task(
        inputs=[{"path": "/data/x", "content": "x"}],
        executors=[in_image("echo $PATH $FUNNEL_IMAGE $(pwd)", workdir="/data",
                            env={"FUNNEL_IMAGE": "mine"})]))
    ok(run)
    assert run.executor(0)["stdout"].split() == ["/opt/funnel-test/bin:/bin", "mine", "/data"]


def test_no_privilege_survives(harness):
    script = ("grep -E '^Cap(Eff|Prm|Bnd|Amb):' /proc/self/status; cat /proc/self/uid_map;"
              " mount -o remount,rw / 2>/dev/null && echo REMOUNTED-ROOT;"
              " mount -o remount,rw /etc 2>/dev/null && echo REMOUNTED-ETC;"
              " mount -t tmpfs x /mnt 2>/dev/null && echo MOUNTED; echo end")
    run = harness.run(harness.task(executors=[in_image(script)]))
    out = run.executor(0)["stdout"]
    ok(run)
    for cap in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
        assert f"{cap}:\t0000000000000000" in out, out
    uid_map = out.split("\n")[4].split()
    assert len(uid_map) == 3 and uid_map[2] == "1", out  # one id mapped, never the range
    if os.geteuid() == 0:
        assert uid_map[:2] == ["0", "65534"], out  # root inside is host nobody
    assert "REMOUNT" not in out and "MOUNTED" not in out and out.endswith("end\n")


def test_writes_to_the_image_fail_and_the_next_task_sees_it_pristine(harness, driver):
    config = harness.config(container_driver=driver)
    attack = ("echo evil > /bin/true; echo evil > /etc/os-release; touch /etc/planted;"
              " rm -f /opt/funnel-test/marker; mkdir -p /opt/funnel-test/bin/x;"
              " echo tmp > /tmp/left; echo end")
    first = harness.run(harness.task(executors=[in_image(attack)]), config=config)
    ok(first)
    assert "end" in first.executor(0)["stdout"]
    second = harness.run(harness.task(executors=[in_image(
        ". /etc/os-release; echo $ID; ls /etc/planted /tmp/left /opt/funnel-test/bin/x 2>&1;"
        " cat /opt/funnel-test/marker >/dev/null && echo marker; /bin/true && echo true-ok")]),
        config=config)
    ok(second)
    out = second.executor(0)["stdout"]
    assert out.startswith("funnel-test\n") and "marker\n" in out and "true-ok" in out
    assert "No such file" in out and "/etc/planted\n" not in out.replace("No such", "")


def test_the_task_dir_other_tasks_and_the_token_key_are_invisible(harness, driver):
    config = harness.config(container_driver=driver)
    harness.workdir.mkdir(parents=True, exist_ok=True)
    (harness.workdir / "worker-token.key").write_text("KEY-SECRET")
    other = harness.run(harness.task(inputs=[{"path": "/data/secret", "content": "OTHER"}],
                                     executors=[in_image("true")]), config=config)
    ok(other)
    (other.task_dir / "worker.token").write_text("TOKEN-SECRET")
    task = harness.task(inputs=[{"path": "/data/in", "content": "mine"}],
                        executors=[in_image(
                            "ls -a / /data; find / -name worker.token -o -name task.json"
                            " -o -name events.jsonl -o -name worker-token.key 2>/dev/null;"
                            " grep -rl SECRET /data /tmp /etc /opt /root 2>/dev/null; "
                            f"ls {harness.workdir} {other.task_dir} 2>&1; cat /data/in")])
    (harness.workdir / task["id"]).mkdir(parents=True)
    (harness.workdir / task["id"] / "worker.token").write_text("MY-TOKEN-SECRET")
    run = harness.run(task, config=config)
    ok(run)
    out = run.executor(0)["stdout"]
    assert "SECRET" not in out and "OTHER" not in out
    for name in ("worker.token", "task.json", "events.jsonl", "files", "worker-token.key"):
        assert name not in out, out
    assert out.endswith("mine") and "No such file" in run.executor(0)["stderr"] + out


def test_proc_shows_only_the_sandbox(harness):
    run = harness.run(harness.task(executors=[in_image(
        "echo $$; ls /proc | grep -c '^[0-9]'; tr '\\0' ' ' < /proc/1/cmdline")]))
    ok(run)
    pid, count, init = run.executor(0)["stdout"].split("\n", 2)
    assert int(pid) <= 3 and int(count) <= 4, run.executor(0)["stdout"]
    assert "systemd" not in init and "init" not in init.split(" ")[0]


@pytest.mark.parametrize("engine", ["proot", "charliecloud"])
def test_ld_preload_in_the_executor_env_never_reaches_the_host_side(harness, engine):
    need(ENGINES[engine])
    bogus = "/in/evil.so"
    run = harness.run(harness.task(
        inputs=[{"path": bogus, "content": "not an ELF"}],
        executors=[in_image("echo $LD_PRELOAD", env={"LD_PRELOAD": bogus,
                                                     "LD_LIBRARY_PATH": "/in"})]),
        config=harness.config(container_driver=engine))
    ok(run)
    assert run.executor(0)["stdout"] == f"{bogus}\n"  # the executor has it...
    assert "ld.so" not in run.executor(0)["stderr"]    # ...the engine (host side) never did
    assert "preload" not in run.executor(0)["stderr"].lower()


@pytest.fixture
def listener():
    """A TCP service on 127.0.0.1 (the gateway, PostgreSQL or a scheduler, say)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted = []

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(1)
            conn.sendall(b"HELLO\n")
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1]
    server.close()


def test_network_none_cannot_reach_host_services(harness, listener):
    probe = in_image(f"nc 127.0.0.1 {listener} </dev/null; echo rc=$?", image="busybox")
    open_run = harness.run(harness.task(executors=[probe]))
    assert "HELLO" in ok(open_run)[0]["stdout"]
    closed = harness.run(harness.task(executors=[probe]), config=harness.config(network="none"))
    assert "HELLO" not in ok(closed)[0]["stdout"]
    assert "network none" in closed.system_logs


@pytest.mark.parametrize("engine", ["proot", "charliecloud"])
def test_engines_without_a_network_namespace_refuse_network_none(harness, engine):
    need(ENGINES[engine])
    run = harness.run(harness.task(executors=[in_image("true")]),
                      config=harness.config(container_driver=engine, network="none"))
    assert run.state == "SYSTEM_ERROR" and "network" in run.system_logs


@pytest.mark.parametrize("image, settings, reason", [
    (f"{ANONYMOUS}/funnel/no-such-image:1", {}, "not_found"),
    (f"{AUTHENTICATED}/funnel/testimage:1",
     {AUTHENTICATED: {"username": USERNAME, "password": "wrong", "ca_file": str(CA_FILE)}},
     "auth"),
    ("127.0.0.1:{closed}/funnel/testimage:1", {}, "unreachable"),
])
def test_an_image_that_cannot_be_had_is_a_clear_system_error(harness, image, settings,
                                                             reason):
    with socket.socket() as sock:  # a port nothing listens on: a stopped registry
        sock.bind(("127.0.0.1", 0))
        image = image.format(closed=sock.getsockname()[1])
    config = harness.config(registries={**TEST_REGISTRIES, **settings}, image_retry_seconds=1)
    run = harness.run(harness.task(executors=[in_image("true", image=image)]), config=config)
    assert run.state == "SYSTEM_ERROR"
    assert f"image {image}" in run.system_logs and f"({reason})" in run.system_logs
    assert "wrong" not in run.system_logs  # never the password
    assert run.fold.task_log["logs"] == []


def test_basic_auth_registry_with_the_right_password(harness):
    settings = {AUTHENTICATED: {"username": USERNAME, "password": PASSWORD,
                                "ca_file": str(CA_FILE)}}
    run = harness.run(harness.task(executors=[in_image(
        ". /etc/os-release; echo $ID", image=f"{AUTHENTICATED}/funnel/testimage:1")]),
        config=harness.config(registries=settings))
    assert ok(run)[0]["stdout"] == "funnel-test\n"


def test_outputs_written_by_the_sandbox_user_are_uploaded(harness):
    out = harness.data / "result.txt"
    run = harness.run(harness.task(
        outputs=[{"path": "/out/result.txt", "url": f"file://{out}"}],
        executors=[in_image("id -u > /out/result.txt; echo made >> /out/result.txt")]))
    ok(run)
    assert out.read_text() == "0\nmade\n"  # uid 0 inside, whoever it is outside


def test_a_real_server_runs_the_image_sandboxed(tmp_path):
    need("bwrap")
    server = ServerProcess(tmp_path / "gateway", f"sqlite:///{tmp_path}/funnel.db",
                           reconcile=True, overrides={
                               "backend": {"name": "local"},
                               "reconciler": {"interval_seconds": 0.2},
                               "worker": {"container_driver": "bwrap"}})
    server.start()
    try:
        created = requests.post(server.api + "/tasks", timeout=10, json={"executors": [
            in_image(". /etc/os-release; echo $ID; grep CapEff /proc/self/status;"
                     " ls /proc | grep -c '^[0-9]'; ls /etc/os-release.planted 2>/dev/null;"
                     " echo x > /etc/os-release || echo read-only")]})
        created.raise_for_status()
        task = wait_for_state(server.api, created.json()["id"], TERMINAL, 120,
                              detail=lambda: server.log()[-3000:])
    finally:
        server.stop()
    assert task["state"] == "COMPLETE", task["logs"]
    stdout = task["logs"][0]["logs"][0]["stdout"].split("\n")
    assert stdout[0] == "funnel-test" and stdout[1] == "CapEff:\t0000000000000000"
    assert int(stdout[2]) <= 4 and stdout[3] == "read-only"
    assert any(f"image {TESTIMAGE}" in line for line in task["logs"][0]["system_logs"])


def test_a_seeded_cache_runs_busybox_offline(harness, tmp_path):
    """The quick start's offline image: busybox-static seeded into an empty cache, then run
    with no registry configured at all (docker.io unreachable here)."""
    tree = tmp_path / "seed"
    (tree / "bin").mkdir(parents=True)
    (tree / "etc").mkdir()
    shutil.copy2("/var/lib/funnel/rootfs/busybox/bin/busybox", tree / "bin" / "busybox")
    (tree / "bin" / "sh").symlink_to("busybox")
    (tree / "etc" / "seeded").write_text("yes\n")
    cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-m", "funnel_hpc.worker.images", "seed",
                           "docker.io/library/busybox:latest", "--from-dir", str(tree),
                           "--cache", str(cache)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("docker.io/library/busybox:latest@sha256:")
    run = harness.run(harness.task(executors=[in_image(
        "cat /etc/seeded; busybox echo $PATH", image="busybox")]),
        config=harness.config(registries={}, image_cache=str(cache), image_retry_seconds=1))
    assert ok(run)[0]["stdout"] == ("yes\n/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:"
                                    "/sbin:/bin\n")


def test_ram_and_cores_are_enforced_without_a_scheduler(harness):
    hog = "x=$(head -c 120000000 /dev/zero | tr '\\0' a) && echo allocated ${#x}"
    cpus = "grep Cpus_allowed_list /proc/self/status | tr -d ' \\t'"
    free = harness.run(harness.task(executors=[in_image(hog, image="busybox")]))
    assert ok(free)[0]["stdout"] == "allocated 120000000\n"
    limited = harness.run(harness.task(
        resources={"ram_gb": 0.1, "cpu_cores": 1},
        executors=[in_image(hog, image="busybox", ignore_error=True),
                   in_image(cpus, image="busybox")]))
    logs = ok(limited)
    assert "allocated" not in logs[0]["stdout"] and logs[0]["exit_code"] != 0
    assert logs[1]["stdout"].strip() in ("Cpus_allowed_list:0", "Cpus_allowed_list:1") \
        or len(os.sched_getaffinity(0)) == 1
    assert "limits (worker.limit_resources)" in limited.system_logs
    under_slurm = harness.run(harness.task(
        resources={"ram_gb": 0.1}, executors=[in_image(hog, image="busybox")]),
        extra_env={"SLURM_JOB_ID": "42"})  # a scheduler enforces its own: auto leaves it
    assert ok(under_slurm)[0]["stdout"] == "allocated 120000000\n"


def test_linked_inputs_keep_their_owner(harness):
    """worker.link_inputs hard-links a user's file: handing the task's files to the sandbox
    user must not chown the user's original."""
    original = harness.data / "shared.txt"
    original.write_text("shared\n")
    original.chmod(0o644)
    run = harness.run(harness.task(
        inputs=[{"path": "/in/shared.txt", "url": f"file://{original}"}],
        executors=[in_image("cat /in/shared.txt")]), config=harness.config(link_inputs=True))
    assert ok(run)[0]["stdout"] == "shared\n"
    assert original.stat().st_uid == os.geteuid()
