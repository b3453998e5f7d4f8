"""backend.slurm.submit_as_owner through the real server, real Slurm and real local users,
with auth on (HTTP Basic, static bearer, JWT, gRPC): system accounts, low uids and users
outside owner_group get 403 and no job; a task of a permitted owner runs with the
DEFAULT worker command (the gateway's own Python, from an install every user can read,
as docs/admin.md recommends) to COMPLETE, and the owner can read none of the gateway's
secrets: not the site's worker-config.json, worker-token.key or the database, and the
task's own worker-config.json holds no storage secret of the site."""

from __future__ import annotations

import json
import pwd
import secrets
import shutil
import sqlite3
import subprocess
import sys
import time

import grpc
import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa
from werkzeug.security import generate_password_hash

from funnel_hpc.proto import tes_pb2, tes_pb2_grpc
from tests.components import SLURM, need
from tests.owner_helpers import (
    as_user,
    drop_user,
    held_job,
    make_user,
    need_root,
    open_dir,
    readable_install,
)
from tests.server_helpers import ServerProcess, worker_image_config
from tests.waiting import wait_for_state

pytestmark = pytest.mark.slurm
TERMINAL = {"COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR", "CANCELED"}
QUEUE_WAIT = 900  # the one-node cluster may be busy with other tests' jobs
PASSWORD = "owner-pw"
SITE_SECRETS = ("SITE-S3-KEY-ID", "SITE-S3-SECRET", "SITE-HTTP-BEARER", "SITE-ENDPOINT-KEY",
                "SITE-REGISTRY-PW")
TASK = {"executors": [{"image": "busybox", "command": ["sh", "-c", "echo hello from $0", "x"]}]}


def _slurm_up() -> None:
    need(SLURM, shutil.which("sinfo") is not None, "not installed (scripts/setup/30-slurm.sh)")


@pytest.fixture(scope="module")
def site():
    """Users: alice (in the owner group), bob (not), low (a system account, uid below
    UID_MIN); a JWT signing key; the readable install; the server."""
    need_root()
    _slurm_up()
    group = f"fog{secrets.token_hex(3)}"
    subprocess.run(["groupadd", group], check=True)
    alice, bob, low = make_user("a", groups=(group,)), make_user("b"), make_user("l", system=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    install_dir, work = open_dir("own-install-"), open_dir("own-work-")
    try:
        python = readable_install(install_dir)
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
        jwk.update(kid="k1", use="sig", alg="RS256")
        jwks = install_dir / "jwks.json"
        jwks.write_text(json.dumps({"keys": [jwk]}))
        hashed = generate_password_hash(PASSWORD)
        server = ServerProcess(work, f"sqlite:///{work}/funnel.db", reconcile=True,
                               funnel=[str(python), "-m", "funnel_hpc.gateway.cli.main"],
                               overrides={
            "backend": {"name": "slurm", "slurm": {"submit_as_owner": True,
                                                   "owner_group": group}},
            "auth": {"mode": "basic+bearer", "admins": ["tesadmin"],
                     "users": dict.fromkeys((alice, bob, low, "tesadmin"), hashed),
                     "tokens": {"root-static-token": "root"},
                     "oidc": {"jwks_file": str(jwks), "issuer": "https://idp.test",
                              "audience": "funnel"},
                     "login_free_failures": 1000, "login_rate_per_second": 0},
            "reconciler": {"interval_seconds": 0.5},
            # image_cache "": each owner pulls into ~/.cache/funnel-hpc/images; a registry
            # login of the site's beside the test registry's settings
            "worker": {"container_driver": "bwrap", "poll_server_seconds": 1,
                       "image_cache": "", "registries": {
                           **worker_image_config()["registries"],
                           "registry.example.org": {"username": "site",
                                                    "password": "SITE-REGISTRY-PW"}}},
            "storage": {"s3": {"access_key_id": "SITE-S3-KEY-ID",
                               "secret_access_key": "SITE-S3-SECRET",
                               "endpoints": {"archive": {"access_key_id": "SITE-ENDPOINT-KEY",
                                                         "buckets": ["arch-*"]}}},
                        "http": {"headers": {"data.example.org": {
                            "Authorization": "Bearer SITE-HTTP-BEARER"}}}}})
        server.write_config()
        server.config_path.chmod(0o600)  # as /etc/funnel/funnel.yaml (docs/admin.md)
        server.start(timeout=120)
        yield {"server": server, "alice": alice, "bob": bob, "low": low, "group": group,
               "key": key, "work": work}
        server.stop()
    finally:
        for name in (alice, bob, low):
            drop_user(name)
        subprocess.run(["groupdel", group], capture_output=True)
        shutil.rmtree(install_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def jwt_for(key, sub: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "iss": "https://idp.test", "aud": "funnel", "iat": now,
                       "exp": now + 300}, key, algorithm="RS256", headers={"kid": "k1"})


def post(server, **auth) -> requests.Response:
    return requests.post(server.api + "/tasks", json=TASK, timeout=30, **auth)


def test_system_accounts_low_uids_and_outsiders_get_403_and_no_job(site):
    server, key = site["server"], site["key"]
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 1))
    refused: dict[str, requests.Response] = {}
    for name in ("root", "slurm", "munge", "postgres", "_apt"):
        refused[f"jwt {name}"] = post(server, headers={
            "Authorization": f"Bearer {jwt_for(key, name)}"})
    refused["static root"] = post(server, headers={"Authorization": "Bearer root-static-token"})
    refused["basic low"] = post(server, auth=(site["low"], PASSWORD))
    refused["basic bob"] = post(server, auth=(site["bob"], PASSWORD))
    for who, resp in refused.items():
        assert resp.status_code == 403, (who, resp.text)
    messages = {who: resp.json()["message"] for who, resp in refused.items()}
    assert messages["jwt root"] == "owner root: uid 0 is below backend.slurm.owner_min_uid (1000)"
    assert messages["static root"] == messages["jwt root"]
    assert "uid 64030 is above backend.slurm.owner_max_uid (60000)" in messages["jwt slurm"] \
        or "no local account" in messages["jwt slurm"]
    for name in ("munge", "postgres", "_apt"):
        assert f"owner {name}: uid " in messages[f"jwt {name}"] and "is below" in \
            messages[f"jwt {name}"], messages
    assert "is below backend.slurm.owner_min_uid" in messages["basic low"]
    assert messages["basic bob"] == (f"owner {site['bob']}: not in group {site['group']} "
                                     "(backend.slurm.owner_group)")
    # gRPC: the same rule, PERMISSION_DENIED
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = tes_pb2_grpc.TaskServiceStub(channel)
        task = tes_pb2.Task(executors=[tes_pb2.Executor(image="busybox", command=["true"])])
        with pytest.raises(grpc.RpcError) as denied:
            stub.CreateTask(task, metadata=[("authorization", f"Bearer {jwt_for(key, 'root')}")])
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "uid 0 is below" in denied.value.details()
    # no task, so no job: the admin sees nothing of theirs
    listed = requests.get(server.api + "/tasks", params={"view": "BASIC"},
                          auth=("tesadmin", PASSWORD), timeout=30).json()
    assert not [t for t in listed.get("tasks", []) if t.get("name") != "owner-e2e"]
    for name in ("root", "munge", "postgres", "_apt", site["low"], site["bob"]):
        assert name not in funnel_job_users(since), name


def funnel_job_users(since: str) -> set[str]:
    """Users of the jobs named funnel-* squeue lists, submitted at `since` or later (an
    older job may show a new account's name: userdel frees uids that useradd reuses)."""
    done = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%j|%u|%V"],
                          capture_output=True, text=True, check=True)
    rows = [line.split("|", 2) for line in done.stdout.splitlines() if line.count("|") == 2]
    return {user for name, user, submitted in rows
            if name.startswith("funnel-") and submitted >= since}


def test_default_worker_command_completes_as_the_owner_seeing_no_secret(site):
    server, alice, work = site["server"], site["alice"], site["work"]
    resp = requests.post(server.api + "/tasks", json={**TASK, "name": "owner-e2e"},
                         auth=(alice, PASSWORD), timeout=30)
    assert resp.status_code == 200, resp.text
    task_id = resp.json()["id"]
    task = wait_state(server, task_id)
    assert task["state"] == "COMPLETE", (task["logs"][-1].get("system_logs"), server.log()[-3000:])
    assert task["logs"][-1]["logs"][0]["stdout"].strip() == "hello from x"
    directory = work / task_id
    uid = pwd.getpwnam(alice).pw_uid
    assert directory.stat().st_uid == uid
    assert (directory / "events.jsonl").stat().st_uid == uid  # the worker ran as alice
    log = server.log()
    assert "worker.command" not in log  # the start-up check passed
    # the job's worker read the task's own config, not the site's
    script = (directory / "slurm.sh").read_text()
    assert f"--config {directory}/worker-config.json" in script, script
    # what alice can read: her task's config, without a secret of the site's
    mine = as_user(alice, "cat", str(directory / "worker-config.json"))
    assert mine.returncode == 0, mine.stderr
    for secret in SITE_SECRETS:
        assert secret not in mine.stdout, secret
    assert json.loads(mine.stdout)["storage"]["s3"]["endpoints"]["archive"]["buckets"] == \
        ["arch-*"]  # the rest of the section is there
    # what she cannot: the site's config, the worker-token key, the database, the server's
    # configuration file
    for name in ("worker-config.json", "worker-token.key", "funnel.db", "server.yaml"):
        denied = as_user(alice, "cat", str(work / name))
        assert denied.returncode != 0 and "Permission denied" in denied.stderr, name
    site_config = (work / "worker-config.json").read_text()
    assert "SITE-S3-SECRET" in site_config  # the site's own workers still get it
    listing = as_user(alice, "ls", str(work))
    assert listing.returncode != 0  # 711: she reaches her dir, lists nothing


def wait_state(server, task_id) -> dict:
    return wait_for_state(server.api, task_id, TERMINAL, QUEUE_WAIT, ("tesadmin", PASSWORD),
                          detail=lambda: server.log()[-3000:])


def test_a_worker_command_owners_cannot_run_stops_the_start(tmp_path):
    """An interpreter under a 700 directory (a venv under /root): the gateway does not
    start, and says why, instead of every task ending SYSTEM_ERROR."""
    need_root()
    hidden = tmp_path / "private"
    hidden.mkdir(mode=0o700)
    (hidden / "python").symlink_to(sys.executable)
    work = tmp_path / "work"
    server = ServerProcess(work, f"sqlite:///{work}/funnel.db", reconcile=True, overrides={
        "backend": {"name": "slurm", "slurm": {"submit_as_owner": True}},
        "auth": {"mode": "bearer", "tokens": {"t": "someone"}},
        "worker": {"command": [str(hidden / "python"), "-m", "funnel_hpc.worker", "run"]}})
    with pytest.raises(RuntimeError, match="server exited 1") as failed:
        server.start(timeout=120)
    said = str(failed.value)
    expected = (f"worker.command {hidden}/python -m funnel_hpc.worker run does not run as "
                "an unprivileged user (nobody: exit")
    assert expected in said, said
    assert "install funnel-hpc with a system Python where all users can read it" in said


def test_a_restart_never_binds_another_users_job_of_that_name(site):
    """The gateway stopped between claiming alice's task and recording its job; bob,
    who read her task id in squeue, holds a job named funnel-<her id>. After the
    restart her task gets a job of her own and COMPLETEs; bob's job is neither bound
    nor canceled."""
    server, alice, bob = site["server"], site["alice"], site["bob"]
    server.stop()
    server.reconcile = False  # the API only: the task stays QUEUED, without a job
    server.start(timeout=120)
    try:
        resp = requests.post(server.api + "/tasks", json={**TASK, "name": "owner-e2e"},
                             auth=(alice, PASSWORD), timeout=30)
        assert resp.status_code == 200, resp.text
        task_id = resp.json()["id"]
    finally:
        server.stop()
        server.reconcile = True
    # what a claim left behind looks like (ReconcilerQueries.claim_with_tasks)
    with sqlite3.connect(site["work"] / "funnel.db") as conn:
        claimed = conn.execute("UPDATE tasks SET job_id = '', attempt = 1, event_seq = 0 "
                               "WHERE id = ? AND job_id IS NULL", (task_id,)).rowcount
    assert claimed == 1
    bobs = held_job(bob, f"funnel-{task_id}")
    try:
        server.start(timeout=120)
        task = wait_state(server, task_id)
        assert task["state"] == "COMPLETE", task["logs"][-1].get("system_logs")
        job_id = task["logs"][-1]["metadata"]["job_id"]
        assert job_id != bobs
        assert f"task {task_id} was claimed but not submitted" in server.log()  # recovered
        shown = subprocess.run(["scontrol", "show", "job", bobs], capture_output=True,
                               text=True).stdout
        assert "JobState=PENDING" in shown and "Reason=JobHeldUser" in shown, shown
    finally:
        subprocess.run(["scancel", bobs], capture_output=True)
