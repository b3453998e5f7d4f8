"""A full id range for a worker that is not root (worker/subids.py): a real `funnel worker
run` as a real local user with an /etc/subuid range, Debian's setuid newuidmap/newgidmap,
bwrap over real images from the test registry; attacked from inside the task and from the
worker user's side; and through a real server with auth on and submit_as_owner on real
Slurm, where the worker is the task's owner."""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import requests
from werkzeug.security import generate_password_hash

from funnel_hpc.worker import subids
from funnel_hpc.worker.sandbox import SandboxError
from tests.components import SLURM, need
from tests.owner_helpers import need_root
from tests.server_helpers import ServerProcess, worker_image_config
from tests.subids_helpers import DEBIAN, Account, UserWorker
from tests.waiting import wait_for, wait_for_state
from tests.worker.conftest import need as need_tool
from tests.worker.conftest import need_registry

pytestmark = pytest.mark.registry
TERMINAL = ("COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR", "CANCELED")


def _need_tools() -> None:
    need_root()
    need_tool("bwrap")
    need_registry()
    for path in ("/usr/bin/newuidmap", "/usr/bin/newgidmap"):
        need("uidmap", os.path.exists(path), f"{path} missing (scripts/setup/40-worker.sh)")


@pytest.fixture(scope="module")
def alice():
    """A local user with a subordinate range and a worker set-up of her own."""
    _need_tools()
    account = Account.make("r")
    if account.first_uid is None or account.first_gid is None:
        account.drop()
        pytest.fail("useradd gave no /etc/subuid range (scripts/setup/40-worker.sh makes "
                    "/etc/subuid and /etc/subgid)")
    worker = UserWorker.make(account)
    yield worker
    worker.remove()
    account.drop()


@pytest.fixture
def rangeless():
    """A local user whose /etc/subuid and /etc/subgid lines were removed."""
    _need_tools()
    account = Account.make("n")
    account.without_range()
    worker = UserWorker.make(account)
    yield worker
    worker.remove()
    account.drop()


def in_debian(script: str) -> dict:
    return {"image": DEBIAN, "command": ["bash", "-c", script]}


def owned(path: Path) -> tuple[int, int]:
    info = path.lstat()
    return info.st_uid, info.st_gid


def test_tar_and_chown_work_inside_and_everything_comes_back_the_workers(alice):
    """GNU tar x as root of an archive of 1001-owned entries, chown, a set-user-ID file of
    a subordinate id, a 000 directory of one: all work inside; the outputs arrive the
    worker user's, without set-ID bits; the task's files are removed whole at its end."""
    account = alice.account
    script = textwrap.dedent("""\
        set -e; cd /tmp; mkdir -p src/deep; echo a > src/deep/a; echo b > src/b
        chown -R 1001:1001 src/deep; tar --numeric-owner -cf t.tar src; rm -rf src
        tar -C /out -xf t.tar; ls -ln /out/src | sed 1d | awk '{print $3":"$4" "$9}'
        echo f > /out/f; chown 1001:1001 /out/f; cp /bin/true /out/suid
        chown 1002:1002 /out/suid; chmod 6755 /out/suid
        mkdir /out/locked; echo s > /out/locked/s; chown -R 4242:4242 /out/locked
        chmod 000 /out/locked; mkdir -p /work/left/deeper; echo x > /work/left/deeper/x
        chown -R 7:7 /work/left; chmod 700 /work/left
        setpriv --reuid 1001 --regid 1001 --clear-groups id -u
        id -u; cat /proc/self/uid_map /proc/self/gid_map
    """)
    task = alice.task(volumes=["/work"], outputs=[
        {"path": "/out", "type": "DIRECTORY", "url": f"file://{alice.outputs}/out"}],
        executors=[in_debian(script)])
    run = alice.run(task, alice.config())
    assert run.state == "COMPLETE", (run.system_logs, run.stderr, run.fold.task_log["logs"])
    stdout = run.executor(0)["stdout"].split("\n")
    assert stdout[:2] == ["0:0 b", "1001:1001 deep"], stdout
    assert stdout[2:4] == ["1001", "0"], stdout
    maps = [line.split() for line in stdout[4:8]]
    assert maps == [["0", str(account.uid), "1"], ["1", str(account.first_uid), "65535"],
                    ["0", str(account.gid), "1"], ["1", str(account.first_gid), "65535"]]
    assert f"(ids 0-65535 inside: root the worker's uid {account.uid}" in run.system_logs
    out = alice.outputs / "out"
    uploaded = [out, *out.rglob("*")]
    assert {p.name for p in uploaded} >= {"out", "src", "deep", "a", "b", "f", "suid",
                                          "locked", "s"}
    for path in uploaded:
        assert owned(path) == (account.uid, account.gid), path
        assert not path.lstat().st_mode & 0o6000 or path.is_dir(), path
    # keep_workdir never: the task's files went, subordinate-owned 000 and 700 dirs too
    assert sorted(p.name for p in run.task_dir.iterdir()) == ["events.jsonl"], \
        list(run.task_dir.iterdir())
    assert "cannot remove" not in run.system_logs


def test_a_user_without_a_range_gets_root_only_and_the_reason(rangeless):
    account = rangeless.account
    task = rangeless.task(executors=[in_debian(
        "cd /tmp; touch f; chown 1001 f; echo chown=$?; wc -l < /proc/self/uid_map")])
    run = rangeless.run(task, rangeless.config())
    assert run.state == "COMPLETE", (run.system_logs, run.stderr)
    assert run.executor(0)["stdout"].split("\n")[-3:-1] == ["chown=1", "1"]
    assert (f"root only inside: no id range: /etc/subuid gives {account.name} (uid "
            f"{account.uid}) no range of at least 65535 ids") in run.system_logs
    # and what `funnel config show` says for that user
    said = subprocess.run(["/usr/sbin/runuser", "-u", account.name, "--", str(rangeless.python),
                           "-m", "funnel_hpc.gateway.cli.main", "config", "show"],
                          capture_output=True, text=True, cwd="/", env={"PATH": "/usr/bin:/bin"})
    assert said.returncode == 0, said.stderr
    assert "no range of at least 65535 ids" in said.stdout
    # off: the same, saying so
    run = rangeless.run(rangeless.task(executors=[in_debian("true")]),
                        rangeless.config(sandbox_uids={"subordinate": "off"}))
    assert "root only inside: no id range: worker.sandbox_uids.subordinate is off" \
        in run.system_logs


def test_ids_outside_the_map_stay_nobody_and_unreachable(alice):
    """Root inside has CAP_DAC_OVERRIDE and CAP_CHOWN over its map only: a 0600 file of
    another user's subordinate range (or of the worker user, outside the task) planted in
    its volume shows as nobody and stays unreadable; ids past 65535 cannot be had; files
    of the worker user outside the task are not there at all."""
    account = alice.account
    other = Account.make("o")
    try:
        assert other.first_uid is not None and other.first_gid is not None
        assert other.first_uid != account.first_uid
        home = Path(pwd.getpwnam(account.name).pw_dir)
        secret = home / "secret.txt"
        secret.write_text("alice-home-secret")
        secret.chmod(0o600)
        shutil.chown(secret, account.name, account.name)
        script = textwrap.dedent(f"""\
            until [ -e /data/planted ]; do sleep 0.05; done
            stat -c '%u:%g' /data/planted; cat /data/planted; echo cat=$?
            chown 0 /data/planted; echo chown=$?
            touch /tmp/x; chown 70000 /tmp/x; echo big=$?
            setpriv --reuid 70000 id -u; echo setuid=$?
            cat {secret}; echo home=$?; wc -l < /proc/self/uid_map
            touch /data/checked
            until [ ! -e /data/planted ]; do sleep 0.05; done
        """)
        task = alice.task(volumes=["/data"], executors=[in_debian(script)])
        worker = alice.start(task, alice.config())
        data = alice.workdir / task["id"] / "files" / "data"
        wait_for(data.is_dir, 300, "the task's volume", detail=worker.poll)
        planted = data / "planted"
        planted.write_text("bob-range-secret")
        planted.chmod(0o600)
        os.chown(planted, other.first_uid + 1000, other.first_gid + 1000)
        wait_for((data / "checked").exists, 120, "the task's checks", detail=worker.poll)
        planted.unlink()
        _out, err = worker.communicate(timeout=300)
    finally:
        other.drop()
    run_dir = alice.workdir / task["id"]
    from funnel_hpc.core.events import read_event_log

    fold = read_event_log(run_dir / "events.jsonl")
    assert fold.state == "COMPLETE", (fold.task_log, err)
    stdout = fold.task_log["logs"][0]["stdout"]
    # setpriv's own exit status when the kernel refuses the id: 127 (no id -u ran)
    assert stdout.split("\n")[:6] == ["65534:65534", "cat=1", "chown=1", "big=1",
                                      "setuid=127", "home=1"], stdout
    assert stdout.split("\n")[6] == "2"
    assert "bob-range-secret" not in stdout and "alice-home-secret" not in stdout


def test_links_a_task_leaves_lead_the_re_owning_nowhere(alice):
    """The task moves a directory holding a bind away and leaves a symlink to a host
    directory of subordinate-owned files in its place (and a link at the top): the
    re-owning walks the task's files/ tree only, never through a link."""
    account = alice.account
    assert account.first_uid is not None and account.first_gid is not None
    victim = alice.base / "victim"
    victim.mkdir(mode=0o755)
    (victim / "f").write_text("not the task's")
    os.chown(victim / "f", account.first_uid + 5, account.first_gid + 5)
    script = (f"mv /data/in /data/moved 2>/dev/null; rm -rf /data/in; ln -s {victim} /data/in;"
              f" ln -s {victim} /data/top; mkdir /data/own; chown 1001:1001 /data/own;"
              " ls -l /data >/dev/null; true")
    task = alice.task(volumes=["/data"], inputs=[{"path": "/data/in/x.txt", "content": "x"}],
                      executors=[in_debian(script)])
    run = alice.run(task, alice.config())
    assert run.state == "COMPLETE", (run.system_logs, run.stderr)
    assert owned(victim / "f") == (account.first_uid + 5, account.first_gid + 5)
    assert sorted(p.name for p in run.task_dir.iterdir()) == ["events.jsonl"]


def test_newuidmap_maps_no_more_than_etc_subuid_grants(alice):
    """The worker passes only what /etc/subuid grants; asked for more (past its range, or
    another user's range), newuidmap itself refuses and the namespace stays unmapped."""
    account = alice.account
    other = Account.make("m")
    probe = textwrap.dedent("""\
        import json, os, subprocess, sys
        info_r, info_w = os.pipe(); block_r, block_w = os.pipe()
        bwrap = subprocess.Popen(["bwrap", "--unshare-user", "--userns-block-fd", str(block_r),
            "--info-fd", str(info_w), "--ro-bind", "/", "/", "true"],
            pass_fds=(block_r, info_w), stderr=subprocess.DEVNULL)
        os.close(block_r); os.close(info_w)
        said = b""
        while chunk := os.read(info_r, 4096):
            said += chunk
        pid = json.loads(said)["child-pid"]
        done = subprocess.run(["/usr/bin/newuidmap", str(pid), *sys.argv[1:]],
                              capture_output=True, text=True)
        with open(f"/proc/{pid}/uid_map") as uid_map:
            mapped = uid_map.read()
        os.write(block_w, b"1"); os.close(block_w)  # it goes on (and ends: no gid map)
        bwrap.wait()
        print(json.dumps([done.returncode, mapped]))
    """)
    try:
        assert other.first_uid is not None
        own = str(account.uid)
        asks = {"granted": ["0", own, "1", "1", str(account.first_uid), "65535"],
                "one past": ["0", own, "1", "1", str(account.first_uid + 1), "65536"],
                "another's": ["0", own, "1", "1", str(other.first_uid), "65535"],
                "host root": ["0", "0", "1"]}
        answers = {}
        for what, ask in asks.items():
            ran = subprocess.run(["/usr/sbin/runuser", "-u", account.name, "--",
                                  str(alice.python), "-c", probe, *ask], capture_output=True,
                                 text=True, cwd="/", env={"PATH": "/usr/bin:/bin"}, timeout=60)
            assert ran.returncode == 0, ran.stderr
            answers[what] = json.loads(ran.stdout)
    finally:
        other.drop()
    assert answers["granted"][0] == 0 and len(answers["granted"][1].splitlines()) == 2
    for what in ("one past", "another's", "host root"):
        code, uid_map = answers[what]
        assert code != 0 and uid_map.strip() == "", (what, answers[what])
    # and what the worker would ask for is exactly its line of /etc/subuid
    found = subids.find("auto", account.uid)
    assert not isinstance(found, str)
    assert found.map_argv(123)[0][2:] == asks["granted"]


def test_etc_subuid_lines_are_matched_as_shadow_utils_does():
    text = "\n".join(["# a comment", "bob:100000:65536", "alice:200000:1000",
                      "1001:300000:65536", "alice:400000:65536", "alice:x:y",
                      "alice:500000:65536"])
    assert subids.first_range(text, "alice", 1001) == 300000  # by uid, first long enough
    assert subids.first_range(text, "alice", 1002) == 400000  # by name
    assert subids.first_range(text, "carol", 1003) is None
    assert subids.first_range("alice:0:65536", "alice", 1) is None  # never host root
    assert subids.first_range("alice:4294967000:65536", "alice", 1) is None


def test_missing_tools_or_tools_not_roots_give_the_reason(alice, monkeypatch, tmp_path):
    uid = alice.account.uid
    monkeypatch.setattr(subids, "TOOLS", {"uid": ("/nonexistent/newuidmap",),
                                          "gid": ("/usr/bin/newgidmap",)})
    assert subids.explain("auto", uid) == ("root only inside bwrap (no id range: newuidmap "
                                           "is not installed (looked for /nonexistent/"
                                           "newuidmap; Debian: uidmap))")
    planted = tmp_path / "newuidmap"
    shutil.copy("/usr/bin/newuidmap", planted)
    os.chown(planted, uid, uid)
    monkeypatch.setattr(subids, "TOOLS", {"uid": (str(planted),),
                                          "gid": ("/usr/bin/newgidmap",)})
    assert "newuidmap is not installed" in subids.explain("auto", uid)
    with pytest.raises(SandboxError, match="must be one of auto, off"):
        subids.find("yes", uid)


# ---- through a real server, auth on, submit_as_owner on real Slurm ----

PASSWORD = "subids-pw"


@pytest.mark.slurm
def test_submit_as_owner_task_gets_the_owners_range_through_the_server(alice, tmp_path):
    """The owner's own worker (a Slurm job as the owner) maps the owner's range: tar x of
    other owners' entries works and the output arrives the owner's."""
    need(SLURM, shutil.which("sinfo") is not None, "not installed (scripts/setup/30-slurm.sh)")
    account = alice.account
    group = f"fsg{secrets.token_hex(3)}"
    subprocess.run(["groupadd", group], check=True)
    subprocess.run(["usermod", "-a", "-G", group, account.name], check=True)
    work = alice.base / "server"
    work.mkdir(mode=0o755)
    server = ServerProcess(work, f"sqlite:///{work}/funnel.db", reconcile=True,
                           funnel=[str(alice.python), "-m", "funnel_hpc.gateway.cli.main"],
                           overrides={
        "backend": {"name": "slurm", "slurm": {"submit_as_owner": True, "owner_group": group}},
        "auth": {"mode": "basic", "users": {account.name: generate_password_hash(PASSWORD),
                                            "tesadmin": generate_password_hash(PASSWORD)},
                 "admins": ["tesadmin"]},
        "reconciler": {"interval_seconds": 0.5},
        "worker": {"container_driver": "bwrap", "poll_server_seconds": 1, "image_cache": "",
                   "allowed_dirs": [str(alice.outputs)],
                   "registries": worker_image_config()["registries"]}})
    try:
        server.write_config()
        server.config_path.chmod(0o600)
        server.start(timeout=120)
        script = ("set -e; cd /tmp; mkdir d; echo a > d/a; chown -R 1001:1001 d;"
                  " tar --numeric-owner -cf t.tar d; tar -C /out -xf t.tar;"
                  " stat -c %u /out/d/a")
        body = {"name": "subids-e2e", "executors": [in_debian(script)],
                "outputs": [{"path": "/out", "type": "DIRECTORY",
                             "url": f"file://{alice.outputs}/e2e"}]}
        resp = requests.post(server.api + "/tasks", json=body, auth=(account.name, PASSWORD),
                             timeout=30)
        assert resp.status_code == 200, resp.text
        task = wait_for_state(server.api, resp.json()["id"], TERMINAL, 900,
                              ("tesadmin", PASSWORD), detail=lambda: server.log()[-3000:])
        logs = task["logs"][-1]
        assert task["state"] == "COMPLETE", "\n".join(logs.get("system_logs") or [])
        assert logs["logs"][0]["stdout"].strip() == "1001"
        assert any(f"ids 0-65535 inside: root the worker's uid {account.uid}" in line
                   for line in logs["system_logs"]), logs["system_logs"]
        for path in [alice.outputs / "e2e", *(alice.outputs / "e2e").rglob("*")]:
            assert owned(path) == (account.uid, account.gid), path
    finally:
        server.stop()
        subprocess.run(["scancel", "-u", account.name], capture_output=True)
        subprocess.run(["gpasswd", "-d", account.name, group], capture_output=True)
        subprocess.run(["groupdel", group], capture_output=True)
