"""file:// access as the task's owner (issue 16, finding 2): with the worker as root and two
real local users, one's task cannot read or write what only the other may, `{user}`
entries of allowed_dirs confine each to their own, and outputs belong to their owner."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import requests
from werkzeug.security import generate_password_hash

from funnel_hpc.worker.storage import StorageError
from funnel_hpc.worker.storage.local import LocalStore
from tests.server_helpers import ServerProcess
from tests.waiting import wait_for_state
from tests.worker_helpers import need, sh

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make users")


def make_user(prefix: str) -> str:
    name = f"fh{prefix}{secrets.token_hex(3)}"
    subprocess.run(["useradd", "-M", "-U", "-s", "/usr/sbin/nologin", name], check=True)
    return name


@pytest.fixture
def people():
    """Two real local users (alice-like, bob-like) and a shared 755 directory /tmp/... with
    one 700 directory of each: bob's holds a 600 secret and a 644 note."""
    alice, bob = make_user("a"), make_user("b")
    shared = Path(tempfile.mkdtemp(prefix="owner-access-", dir="/tmp"))
    shared.chmod(0o755)
    for name in (alice, bob):
        (shared / name).mkdir(mode=0o700)
        shutil.chown(shared / name, name, name)
    secret, note = shared / bob / "secret.txt", shared / bob / "note.txt"
    for path, mode in ((secret, 0o600), (note, 0o644)):
        path.write_text(f"{path.name} of bob")
        path.chmod(mode)
        shutil.chown(path, bob, bob)
    yield alice, bob, shared
    shutil.rmtree(shared)
    for name in (alice, bob):
        subprocess.run(["userdel", name], check=True)


def store_for(owner: str | None, *allowed: Path | str) -> LocalStore:
    store = LocalStore([str(entry) for entry in allowed])
    store.owner = owner  # what Storage does with the task.json owner
    return store


def test_an_owner_cannot_read_another_users_600_file(people, tmp_path):
    alice, bob, shared = people
    store = store_for(alice, shared)
    for url in (f"file://{shared}/{bob}/secret.txt", f"{shared}/{bob}/note.txt"):
        with pytest.raises(StorageError, match=f"Permission denied.*owner {alice}"):
            store.get_file(url, tmp_path / "stolen")
        assert not (tmp_path / "stolen").exists()
    with pytest.raises(StorageError, match="Permission denied"):
        store.list(f"file://{shared}/{bob}")
    # bob reads his own; root (auth off: no owner) as before
    store_for(bob, shared).get_file(f"file://{shared}/{bob}/secret.txt", tmp_path / "his")
    store_for(None, shared).get_file(f"file://{shared}/{bob}/secret.txt", tmp_path / "root")
    assert (tmp_path / "his").read_text() == (tmp_path / "root").read_text() == \
        "secret.txt of bob"


def test_an_owner_cannot_write_into_another_users_directory(people, tmp_path):
    alice, bob, shared = people
    src = tmp_path / "result.txt"
    src.write_text("alice's")
    store = store_for(alice, shared)
    for url in (f"file://{shared}/{bob}/planted.txt", f"file://{shared}/{bob}/new/planted.txt",
                f"file://{shared}/{bob}/secret.txt"):
        with pytest.raises(StorageError, match="Permission denied"):
            store.put_file(src, url)
    assert sorted(os.listdir(shared / bob)) == ["note.txt", "secret.txt"]
    assert (shared / bob / "secret.txt").read_text() == "secret.txt of bob"


def test_outputs_into_the_owners_directory_are_the_owners(people, tmp_path):
    alice, _bob, shared = people
    src = tmp_path / "result.txt"
    src.write_text("alice's result")
    store_for(alice, shared).put_file(src, f"file://{shared}/{alice}/out/deep/result.txt")
    uid = int(subprocess.run(["id", "-u", alice], capture_output=True, check=True).stdout)
    out = shared / alice / "out"
    for path in (out, out / "deep", out / "deep" / "result.txt"):
        assert path.stat().st_uid == uid, path
    assert (out / "deep" / "result.txt").read_text() == "alice's result"


def test_user_entries_confine_each_user_to_their_own(people, tmp_path):
    alice, bob, shared = people
    mine = shared / alice / "mine.txt"
    mine.write_text("alice's data")
    shutil.chown(mine, alice, alice)
    store = store_for(alice, f"{shared}/{{user}}")
    assert store.allowed == [str(shared / alice)]
    store.get_file(f"file://{mine}", tmp_path / "mine")
    assert (tmp_path / "mine").read_text() == "alice's data"
    with pytest.raises(StorageError, match="outside the allowed directories"):
        store.get_file(f"file://{shared}/{bob}/note.txt", tmp_path / "theirs")
    assert store_for(bob, f"{shared}/{{user}}").allowed == [str(shared / bob)]


def test_without_an_owner_only_entries_without_user_apply(people, tmp_path):
    """Auth off: no owner, so no `{user}` root; the plain ones work as they always did."""
    _alice, bob, shared = people
    store = store_for(None, f"{shared}/{{user}}", shared / bob)
    assert store.allowed == [str(shared / bob)]
    store.get_file(f"file://{shared}/{bob}/secret.txt", tmp_path / "secret")
    with pytest.raises(StorageError, match="outside the allowed directories"):
        store_for(None, f"{shared}/{{user}}").get_file(f"{shared}/{bob}/note.txt",
                                                      tmp_path / "note")


def test_an_owner_without_a_local_account_gets_no_file_access(people, tmp_path):
    _alice, bob, shared = people
    store = store_for("nobody-here-" + secrets.token_hex(3), f"{shared}/{{user}}", shared)
    assert store.allowed == [str(shared)]
    with pytest.raises(StorageError, match="has no local account"):
        store.get_file(f"file://{shared}/{bob}/note.txt", tmp_path / "note")


def test_access_is_the_kernels_decision_acls_included(people, tmp_path):
    """Opened as the owner for real: an ACL bob grants is honoured, which no mode check does."""
    need("setfacl")
    alice, bob, shared = people
    for path in (shared / bob, shared / bob / "secret.txt"):
        subprocess.run(["setfacl", "-m", f"u:{alice}:rx", str(path)], check=True)
    store_for(alice, shared).get_file(f"file://{shared}/{bob}/secret.txt", tmp_path / "granted")
    assert (tmp_path / "granted").read_text() == "secret.txt of bob"


def test_a_real_worker_checks_as_the_owner_named_in_task_json(people, harness):
    """The worker run end to end: task.json's owner decides; outputs are the owner's."""
    alice, bob, shared = people
    config = harness.config(allowed_dirs=[str(shared)])
    stolen = harness.run(harness.task(
        owner=alice, inputs=[{"path": "/in/s", "url": f"file://{shared}/{bob}/secret.txt"}],
        executors=[sh("cat /in/s")]), config)
    assert stolen.state == "SYSTEM_ERROR", stolen.stderr
    assert "Permission denied" in stolen.system_logs
    assert not stolen.host("/in/s").exists()
    out = shared / alice / "out.txt"
    wrote = harness.run(harness.task(
        owner=alice, outputs=[{"path": "/out/o", "url": f"file://{out}"}],
        executors=[sh("echo hers > /out/o")]), config)
    assert wrote.state == "COMPLETE", wrote.stderr + wrote.system_logs
    assert out.read_text() == "hers\n" and out.owner() == alice
    planted = harness.run(harness.task(
        owner=alice, outputs=[{"path": "/out/o", "url": f"file://{shared}/{bob}/o.txt"}],
        executors=[sh("echo planted > /out/o")]), config)
    assert planted.state == "SYSTEM_ERROR" and "Permission denied" in planted.system_logs
    assert not (shared / bob / "o.txt").exists()
    auth_off = harness.run(harness.task(
        inputs=[{"path": "/in/s", "url": f"file://{shared}/{bob}/secret.txt"}],
        executors=[sh("cat /in/s")]), config)
    assert auth_off.state == "COMPLETE", auth_off.stderr + auth_off.system_logs
    assert auth_off.executor(0)["stdout"] == "secret.txt of bob"


def test_through_the_server_alices_task_cannot_read_bobs_file(people, databases, tmp_path):
    """The real server as root, auth on, local backend: the reconciler hands the owner on."""
    need("bwrap")
    alice, bob, shared = people
    srv = ServerProcess(tmp_path / "srv", databases.new("sqlite"), reconcile=True, overrides={
        "auth": {"mode": "basic", "users": {alice: generate_password_hash("pw")}},
        "reconciler": {"interval_seconds": 0.3},
        "worker": {"container_driver": "bwrap", "allowed_dirs": [str(shared)]}}).start()
    try:
        resp = requests.post(srv.api + "/tasks", auth=(alice, "pw"), timeout=10, json={
            "inputs": [{"path": "/in/s", "url": f"file://{shared}/{bob}/secret.txt"}],
            "executors": [sh("cat /in/s")]})
        assert resp.status_code == 200, resp.text
        task = wait_for_state(srv.api, resp.json()["id"], ("COMPLETE", "SYSTEM_ERROR"),
                              auth=(alice, "pw"), detail=lambda: srv.log()[-2000:])
        assert task["state"] == "SYSTEM_ERROR"
        assert "Permission denied" in "\n".join(task["logs"][-1]["system_logs"])
    finally:
        srv.stop()
