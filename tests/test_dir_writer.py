"""New task dirs written by a helper process beside the reconciler
(gateway/reconcile/dir_writer.py): a burst's dirs are all written, private, by the helper
and the reconciler together; a dir there already (planted) comes back for the careful way
untouched; an error is that dir's alone; a helper that dies loses nothing; and the
reconciler's tick of many tasks goes through it."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import time
from pathlib import Path

import pytest

from funnel_hpc.gateway.reconcile import dir_writer
from funnel_hpc.gateway.reconcile.dir_writer import THERE, DirWriter, TickDirs
from tests.test_array_submission import ArrayBackend, make, trivial


def texts(i: int) -> dict[str, str]:
    return {"task.json": json.dumps({"id": f"t{i}"}), "token": f"secret{i}"}


def private(path: Path, mode: int) -> bool:
    info = path.lstat()
    return stat.S_IMODE(info.st_mode) == mode and info.st_uid == os.geteuid()


@pytest.fixture
def writer():
    made = DirWriter()
    assert made.start()
    yield made
    made.close()


def plan(tmp_path: Path, n: int, writer: DirWriter | None) -> TickDirs:
    return TickDirs(lambda i: tmp_path / f"t{i}", texts, writer, range(n))


def test_a_burst_is_written_by_the_helper_and_the_reconciler(tmp_path, writer):
    n = 1000
    dirs = plan(tmp_path, n, writer)
    for first in range(0, n, 300):  # units, waited for in turn
        unit = list(range(first, min(first + 300, n)))
        dirs.wait_for(unit)
        assert all(dirs.result(i) is None for i in unit)
    dirs.finish()
    chunks = -(-n // dir_writer.CHUNK)
    # handed over at once: as many as are left to the reconciler, IN_FLIGHT at most
    assert dirs.helper_chunks >= min(dir_writer.IN_FLIGHT, (chunks + 1) // 2)
    assert dirs.helper_chunks + dirs.own_chunks == chunks
    for i in range(n):
        assert private(tmp_path / f"t{i}", 0o700)
        for name, text in texts(i).items():
            assert private(tmp_path / f"t{i}" / name, 0o600)
            assert (tmp_path / f"t{i}" / name).read_text() == text
    assert writer.running  # kept for the next tick


def test_pumped_between_steps_the_helper_writes_a_burst_alone(tmp_path, writer):
    """A reconciler busy elsewhere (claiming, rendering) pumps between its steps: the
    helper's answers are taken in and the rest handed over, so every chunk is the
    helper's and nothing is left for the reconciler to write when it waits."""
    n = 5 * dir_writer.CHUNK
    dirs = plan(tmp_path, n, writer)
    deadline = time.monotonic() + 60
    while not all(dirs.result(i) is None for i in range(n)):
        assert time.monotonic() < deadline, "the helper was not handed the burst"
        time.sleep(0.02)  # the reconciler's own work
        dirs.pump()
    dirs.finish()
    assert (dirs.helper_chunks, dirs.own_chunks) == (5, 0)
    assert all(private(tmp_path / f"t{i}" / "task.json", 0o600) for i in range(n))


def test_a_dir_there_already_comes_back_untouched(tmp_path, writer):
    """A planted dir (or symlink) is not written into: THERE sends the caller the careful
    way (files.private_dir and write_private, which take it back and follow no link)."""
    target = tmp_path / "elsewhere"
    target.write_text("keep")
    planted = tmp_path / "t3"
    planted.mkdir()
    (planted / "task.json").symlink_to(target)
    (tmp_path / "t5").symlink_to(tmp_path)
    dirs = plan(tmp_path, 10, writer)
    dirs.finish()
    assert [dirs.result(i) for i in range(10)] == \
        [None, None, None, THERE, None, THERE, None, None, None, None]
    assert target.read_text() == "keep" and (planted / "task.json").is_symlink()
    assert dirs.result(99) == THERE  # not a new dir of this tick: the careful way


def test_an_error_is_that_dirs_alone(tmp_path, writer):
    long_name = "x" * 300
    dirs = TickDirs(lambda i: tmp_path / (long_name if i else "ok"), texts, writer, [0, 1])
    dirs.finish()
    assert dirs.result(0) is None
    result = dirs.result(1)
    assert isinstance(result, tuple) and result[0] == errno.ENAMETOOLONG
    error = dir_writer.error_of(result, tmp_path / long_name)
    assert error.errno == errno.ENAMETOOLONG and long_name in str(error)


def test_nothing_is_lost_when_the_helper_dies(tmp_path, writer):
    os.kill(writer.pid, signal.SIGKILL)
    dirs = plan(tmp_path, 1000, writer)
    dirs.finish()
    results = [dirs.result(i) for i in range(1000)]
    assert set(results) <= {None, THERE}
    # THERE: in flight when it died, for the careful way; the rest written here
    assert all(private(tmp_path / f"t{i}" / "task.json", 0o600)
               for i, result in enumerate(results) if result is None)
    assert not writer.running
    assert writer.start() and writer.running  # the next tick starts another
    os.kill(writer.pid, signal.SIGKILL)  # dead between ticks: the next one starts anew
    os.waitid(os.P_PID, writer.pid, os.WEXITED | os.WNOWAIT)
    first = writer.pid
    assert writer.start() and writer.pid != first
    again = tmp_path / "again"
    again.mkdir()
    dirs = plan(again, 450, writer)
    dirs.finish()
    assert dirs.helper_chunks and writer.running


def test_without_a_helper_the_reconciler_writes_them(tmp_path):
    dirs = plan(tmp_path, 450, None)
    dirs.finish()
    assert dirs.helper_chunks == 0 and all(dirs.result(i) is None for i in range(450))
    assert all((tmp_path / f"t{i}" / "task.json").exists() for i in range(450))


def test_a_tick_of_many_tasks_goes_through_the_helper(tmp_path):
    """A tick of WRITER_MIN tasks and more: each task's dir private with its task.json,
    one planted dir taken back the careful way, and the helper ended with the
    reconciler."""
    backend = ArrayBackend(array_max=100)
    service, reconciler = make(tmp_path, backend)
    n = dir_writer.WRITER_MIN + 50
    ids = [service.create(trivial(f"t{i}")) for i in range(n)]
    planted = tmp_path / ids[7]
    planted.mkdir(mode=0o777)
    (planted / "task.json").symlink_to(tmp_path / "nowhere")
    assert reconciler.tick().submitted == n
    helper = reconciler.submitter._dir_writer
    assert helper.running
    for task_id in ids:
        task_dir = tmp_path / task_id
        assert private(task_dir, 0o700) and private(task_dir / "task.json", 0o600)
        assert json.loads((task_dir / "task.json").read_text())["id"] == task_id
    assert not (tmp_path / "nowhere").exists()
    assert sorted(len(job) for job in backend.jobs) == [50] + [100] * (n // 100)
    pid = helper.pid
    reconciler.stop()
    assert not helper.running and not os.path.exists(f"/proc/{pid}")  # ended and reaped
