"""Files the gateway writes into task directories (backends/files.py): 600 in 700 whatever
the umask, never through a symlink a user planted, never as root into a user's directory,
and a hand-over that re-owns only the files the gateway wrote, never a link's target.
Needs root (as the gateway runs)."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from funnel_hpc.backends import files
from funnel_hpc.backends.commands import Result
from funnel_hpc.backends.slurm import SlurmBackend
from tests.backend_helpers import FakeRunner, backend_options, make_request
from tests.reconciler_helpers import TRIVIAL, ScriptedBackend, make

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
NOBODY = pwd.getpwnam("nobody")


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return path.lstat().st_mode & 0o777


def outside_file(tmp_path: Path) -> Path:
    target = tmp_path / "root-only"
    target.write_text("untouched")
    target.chmod(0o600)
    return target


def test_modes_are_private_whatever_the_umask(tmp_path, umask_022):
    directory = tmp_path / "work" / "task1"
    files.write_private(directory, "task.json", "{}")
    files.write_private(directory, "run.sh", "#!/bin/sh\n", mode=0o700)
    assert mode(directory) == 0o700
    assert mode(directory / "task.json") == 0o600 and mode(directory / "run.sh") == 0o700
    assert sorted(os.listdir(directory)) == ["run.sh", "task.json"]  # no temp left


def test_a_new_dir_and_its_files_are_private_whatever_the_umask(tmp_path):
    old = os.umask(0o277)  # even one that would leave the owner nothing
    try:
        assert files.new_private_dir(tmp_path / "task1", {"task.json": "{}", "token": "t"})
    finally:
        os.umask(old)
    assert mode(tmp_path / "task1") == 0o700
    assert [mode(tmp_path / "task1" / n) for n in ("task.json", "token")] == [0o600, 0o600]
    assert (tmp_path / "task1" / "task.json").read_text() == "{}"


def test_a_dir_already_there_is_left_to_the_careful_way(tmp_path):
    """new_private_dir writes only into a dir it made: one that was there (a user's,
    with a link planted) or one without its parent is left untouched, False."""
    target = outside_file(tmp_path)
    directory = tmp_path / "task2"
    directory.mkdir()
    os.symlink(target, directory / "task.json")
    assert not files.new_private_dir(directory, {"task.json": "mine"})
    assert target.read_text() == "untouched" and (directory / "task.json").is_symlink()
    assert not files.new_private_dir(tmp_path / "missing" / "task3", {"task.json": "x"})
    assert not (tmp_path / "missing").exists()
    with pytest.raises(ValueError):
        files.new_private_dir(tmp_path / "task4", {"../escape": "x"})
    assert not (tmp_path / "escape").exists()


def test_planted_symlinks_are_replaced_not_followed(tmp_path):
    target = outside_file(tmp_path)
    directory = tmp_path / "task2"
    directory.mkdir()
    os.symlink(target, directory / "task.json")
    os.symlink(target, directory / ".slurm.sh.tmp")  # the temp name too
    files.write_private(directory, "task.json", "mine")
    files.write_private(directory, "slurm.sh", "#!/bin/sh\n")
    assert target.read_text() == "untouched"
    assert (directory / "task.json").read_text() == "mine"
    assert not (directory / "task.json").is_symlink()
    os.symlink(directory, tmp_path / "link-to-dir")
    with pytest.raises(OSError):  # a directory reached through a link: refused
        files.write_private(tmp_path / "link-to-dir", "x", "y")


def test_a_users_directory_is_taken_back_before_root_writes(tmp_path):
    directory = tmp_path / "task3"
    directory.mkdir(mode=0o777)
    os.chown(directory, NOBODY.pw_uid, NOBODY.pw_gid)
    files.write_private(directory, "task.json", "{}")
    info = directory.stat()
    assert (info.st_uid, mode(directory)) == (0, 0o700)


def test_handing_over_follows_no_link_and_reowns_only_our_files(tmp_path):
    target = outside_file(tmp_path)
    directory = tmp_path / "task4"
    files.write_private(directory, "task.json", "{}")
    os.symlink(target, directory / "evil")
    files.give_to(directory, NOBODY.pw_uid, NOBODY.pw_gid, ("task.json", "evil"))
    assert target.stat().st_uid == 0
    assert (directory / "evil").lstat().st_uid == 0  # a link: never handed over
    assert (directory / "task.json").stat().st_uid == NOBODY.pw_uid
    assert directory.stat().st_uid == NOBODY.pw_uid and mode(directory) == 0o700


def test_slurm_resubmission_as_owner_follows_no_planted_link(tmp_path, umask_022):
    """A second attempt in a task dir the owner holds: the links the owner planted at
    slurm.sh and beside it neither receive root's script nor pass root's chown on."""
    target = outside_file(tmp_path)
    request = make_request(tmp_path, {"id": "own9"}, ["/bin/true"])
    request.owner = "nobody"
    os.symlink(target, request.task_dir / "slurm.sh")
    os.symlink(target, request.task_dir / "evil")
    os.chown(request.task_dir, NOBODY.pw_uid, NOBODY.pw_gid)
    backend = SlurmBackend(backend_options("slurm", submit_as_owner=True,
                                           owner_max_uid=NOBODY.pw_uid),  # a stand-in owner
                           tmp_path)
    backend.runner = FakeRunner({("sudo",): Result(0, "4242\n", "")})
    assert backend.submit(request) == "4242"
    assert target.read_text() == "untouched" and target.stat().st_uid == 0
    script = request.task_dir / "slurm.sh"
    assert not script.is_symlink() and mode(script) == 0o600
    assert script.stat().st_uid == NOBODY.pw_uid  # the owner's worker reads it


def test_reconciler_writes_no_file_through_a_planted_link(tmp_path, umask_022):
    service, reconciler = make(tmp_path, ScriptedBackend())
    target = outside_file(tmp_path)
    task_id = service.create(TRIVIAL)
    directory = Path(reconciler.config.work_dir) / task_id
    directory.mkdir(parents=True)
    os.symlink(target, directory / "task.json")
    os.symlink(target, directory / ".task.json.tmp")
    reconciler.tick()
    assert service.get_row(task_id).job_id  # submitted
    assert target.read_text() == "untouched"
    assert mode(directory) == 0o700 and mode(directory / "task.json") == 0o600


def test_a_task_dir_that_is_a_link_fails_that_task_only(tmp_path):
    service, reconciler = make(tmp_path, ScriptedBackend())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    linked, plain = service.create(TRIVIAL), service.create(TRIVIAL)
    work = Path(reconciler.config.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    os.symlink(elsewhere, work / linked)
    reconciler.tick()
    assert service.get(linked)["state"] == "SYSTEM_ERROR"
    assert os.listdir(elsewhere) == []
    assert service.get_row(plain).job_id  # the other task was submitted
