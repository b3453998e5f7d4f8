"""backend.slurm.submit_as_owner: each job is submitted with sudo as its task's owner, an
owner the policy allows (backends/owners.py); recover() binds only the owner's job, and
the hand-over of a task dir re-owns only the files the gateway wrote. Real Slurm and real
local users where marked."""

from __future__ import annotations

import pwd
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

from funnel_hpc.backends import files
from funnel_hpc.backends.base import BackendError, JobState, JobStatus
from funnel_hpc.backends.owners import OwnerPolicy, OwnerRefused, login_defs_uids
from funnel_hpc.backends.slurm import SlurmBackend
from tests.backend_helpers import backend_options, make_request
from tests.components import need
from tests.owner_helpers import (
    as_user,
    drop_user,
    held_job,
    make_user,
    need_root,
    open_dir,
    slurm_jobs,
)
from tests.waiting import wait_for


def wait(backend, job_id, states, timeout=60.0):
    last: list[JobStatus] = []

    def reached() -> JobStatus | None:
        status = backend.poll([job_id])[job_id]
        last[:] = [status]
        return status if status.state in states else None

    return wait_for(reached, timeout, f"job {job_id} to reach {states}", interval=0.5,
                    detail=lambda: f"last seen: {last[0] if last else None}")


def test_owner_names_are_checked_before_sudo(tmp_path):
    backend = SlurmBackend(backend_options("slurm", submit_as_owner=True),
                           tmp_path)
    for bad in (None, "root; rm -rf /", "../x", "Alice", "-u", "a b"):
        request = make_request(tmp_path, {"id": "own0"}, ["/bin/true"])
        request.owner = bad
        with pytest.raises(BackendError, match="cannot submit as owner"):
            backend.submit(request)


@pytest.mark.slurm
def test_job_runs_as_the_owner(tmp_path, slurm):
    try:
        uid = pwd.getpwnam("funneltest").pw_uid
    except KeyError:
        need("the user funneltest", False, "scripts/setup/30-slurm.sh creates it")
    tmp_path.chmod(0o755)
    for parent in tmp_path.parents:
        if parent == parent.parent:
            break
        parent.chmod(parent.stat().st_mode | 0o111)  # traversable for the owner
    backend = SlurmBackend(backend_options("slurm", submit_as_owner=True),
                           tmp_path)
    request = make_request(tmp_path, {"id": "own1"},
                           ["/bin/sh", "-c", f"id -u > {tmp_path}/own1/whoami"])
    request.owner = "funneltest"
    job = backend.submit(request)
    assert wait(backend, job, {JobState.COMPLETED}).state == JobState.COMPLETED
    assert (tmp_path / "own1" / "whoami").read_text().strip() == str(uid)
    assert (tmp_path / "own1").stat().st_uid == uid
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
    assert "UserId=funneltest" in shown.stdout


# ---- the owner policy ----

SYSTEM_ACCOUNTS = ("root", "slurm", "munge", "postgres", "_apt", "nobody")


def test_system_accounts_are_refused_naming_the_rule(tmp_path):
    policy = OwnerPolicy.from_options(backend_options("slurm", submit_as_owner=True))
    assert (policy.min_uid, policy.max_uid) == (1000, 60000)  # Debian's login.defs
    seen = 0
    for name in SYSTEM_ACCOUNTS:
        try:
            uid = pwd.getpwnam(name).pw_uid
        except KeyError:
            continue  # not installed here
        seen += 1
        side = "below backend.slurm.owner_min_uid (1000)" if uid < 1000 else \
            "above backend.slurm.owner_max_uid (60000)"
        with pytest.raises(OwnerRefused) as refused:
            policy.account(name)
        assert str(refused.value) == f"owner {name}: uid {uid} is {side}"
    assert seen >= 3  # root, _apt and nobody at least
    with pytest.raises(OwnerRefused, match="no local account"):
        policy.account("nosuchuser" + secrets.token_hex(3))
    with pytest.raises(OwnerRefused, match="needs an authenticated user"):
        policy.account(None)


def test_login_defs_and_configured_bounds(tmp_path):
    defs = tmp_path / "login.defs"
    defs.write_text("# UID_MIN 5\nUID_MIN\t\t 2000\nUID_MAX 3000 # site\n")
    assert login_defs_uids(defs) == {"UID_MIN": 2000, "UID_MAX": 3000}
    assert login_defs_uids(tmp_path / "missing") == {"UID_MIN": 1000, "UID_MAX": 60000}
    assert OwnerPolicy.from_options(backend_options("slurm", owner_min_uid=500)).min_uid == 500
    for bad in ({"owner_min_uid": 0}, {"owner_min_uid": "1000"}, {"owner_min_uid": True},
                {"owner_min_uid": 2000, "owner_max_uid": 1500}):
        with pytest.raises(ValueError, match="backend.slurm.owner_m"):
            OwnerPolicy.from_options(backend_options("slurm", **bad))
    with pytest.raises(ValueError, match="backend.slurm.owner_group: no such group"):
        OwnerPolicy.from_options(backend_options(
            "slurm", owner_group="nosuchgroup" + secrets.token_hex(3)))


def test_a_low_uid_and_an_outsider_of_owner_group_are_refused():
    need_root()
    low, member, outsider = make_user("l", system=True), make_user("m"), make_user("o")
    group = f"fog{secrets.token_hex(3)}"
    subprocess.run(["groupadd", group], check=True)
    subprocess.run(["usermod", "-aG", group, member], check=True)
    work = open_dir("own-out-")
    try:
        policy = OwnerPolicy.from_options(backend_options("slurm", owner_group=group))
        low_uid = pwd.getpwnam(low).pw_uid
        with pytest.raises(OwnerRefused, match=f"uid {low_uid} is below"):
            policy.account(low)
        with pytest.raises(OwnerRefused, match=f"not in group {group} "
                                               "[(]backend.slurm.owner_group[)]"):
            policy.account(outsider)
        assert policy.account(member).pw_name == member
        backend = SlurmBackend(backend_options("slurm", submit_as_owner=True,
                                               owner_group=group), Path("/tmp"))
        task_id = "out" + secrets.token_hex(6)
        request = make_request(work, {"id": task_id}, ["/bin/true"])
        request.owner = outsider
        with pytest.raises(BackendError, match="not in group"):  # before sudo, no job
            backend.submit(request)
        assert slurm_jobs(outsider, f"funnel-{task_id}") == []
    finally:
        for name in (low, member, outsider):
            drop_user(name)
        subprocess.run(["groupdel", group], capture_output=True)
        shutil.rmtree(work)


# ---- recover: the owner's job only ----

@pytest.mark.slurm
def test_recover_never_binds_another_users_job_of_that_name(slurm):
    """Bob holds a job named funnel-<alice's task id> (as he could before a restart):
    recovering alice's submission finds none, then alice's own, never bob's."""
    need_root()
    alice, bob = make_user("a"), make_user("b")
    try:
        task_id = "rec" + secrets.token_hex(6)
        backend = SlurmBackend(backend_options("slurm", submit_as_owner=True),
                               Path("/tmp"))
        bobs = held_job(bob, f"funnel-{task_id}")
        assert backend.recover(task_id, Path("/tmp"), alice) is None
        assert backend.recover(task_id, Path("/tmp"), None) is None
        alices = held_job(alice, f"funnel-{task_id}")
        assert int(alices) > int(bobs)
        assert backend.recover(task_id, Path("/tmp"), alice) == alices
        newer_bob = held_job(bob, f"funnel-{task_id}")  # newest of all, still bob's
        assert backend.recover(task_id, Path("/tmp"), alice) == alices != newer_bob
        gone = "gone" + secrets.token_hex(3)  # an account deleted since: asked, not stuck
        assert backend.recover(task_id, Path("/tmp"), gone) is None
    finally:
        drop_user(alice)
        drop_user(bob)


# ---- the hand-over re-owns only the gateway's files ----

@pytest.fixture
def hardlinks_unprotected():
    """fs.protected_hardlinks=0 (a user may hard-link a file of root's), restored after."""
    need_root()
    knob = Path("/proc/sys/fs/protected_hardlinks")
    before = knob.read_text().strip()
    knob.write_text("0")
    yield
    knob.write_text(before)


@pytest.mark.slurm
def test_a_hard_link_to_a_root_file_stays_roots_on_retry(slurm, hardlinks_unprotected):
    alice = make_user("h")
    work = open_dir("own-link-")
    secret = work / "root-secret"
    secret.write_text("root's only")
    secret.chmod(0o600)
    try:
        backend = SlurmBackend(backend_options("slurm", submit_as_owner=True),
                               work)
        request = make_request(work, {"id": "ownlink"}, ["/bin/true"])
        request.owner = alice
        request.gateway_files = ("task.json",)
        first = backend.submit(request)
        directory = request.task_dir
        uid = pwd.getpwnam(alice).pw_uid
        assert directory.stat().st_uid == uid
        planted = as_user(alice, "ln", str(secret), str(directory / "grab"))
        assert planted.returncode == 0, planted.stderr
        as_user(alice, "ln", "-s", str(secret), str(directory / "sym"))
        assert as_user(alice, "cat", str(directory / "grab")).returncode != 0
        # a root file (one link) in a directory of hers, moved into the task dir, and a
        # hard link under a name the gateway writes
        drop = work / "drop"
        drop.mkdir()
        shutil.chown(drop, alice)
        (drop / "note").write_text("root's note")
        (drop / "note").chmod(0o600)
        moved = as_user(alice, "mv", str(drop / "note"), str(directory / "moved"))
        assert moved.returncode == 0, moved.stderr
        assert as_user(alice, "rm", "-f", str(directory / "task.json")).returncode == 0
        assert as_user(alice, "ln", str(secret), str(directory / "task.json")).returncode == 0
        # the retry: the gateway takes the dir back and hands it over, first without
        # rewriting task.json (the hard link stays there), then as the reconciler does
        second = backend.submit(request)
        info = secret.stat()
        assert (info.st_uid, info.st_mode & 0o777, info.st_nlink) == (0, 0o600, 3)
        files.write_private(directory, "task.json", "{}")
        third = backend.submit(request)
        assert len({first, second, third}) == 3
        info = secret.stat()
        assert (info.st_uid, info.st_mode & 0o777, info.st_nlink) == (0, 0o600, 2)
        assert as_user(alice, "cat", str(directory / "grab")).returncode != 0
        assert (directory / "moved").stat().st_uid == 0  # not a name the gateway wrote
        assert as_user(alice, "cat", str(directory / "moved")).returncode != 0
        assert (directory / "task.json").stat().st_uid == uid  # the gateway's: handed over
        assert (directory / "slurm.sh").stat().st_uid == uid
        assert directory.stat().st_uid == uid and directory.stat().st_mode & 0o777 == 0o700
    finally:
        subprocess.run(["scancel", "-u", alice], capture_output=True)
        drop_user(alice)
        shutil.rmtree(work)
