"""The root gateway never trusts the shape of an owner-writable task directory (issue 31,
part 1). A real server with auth on runs real Slurm jobs as their owners
(`submit_as_owner`, two real local users); alice reshapes her own task dir as she likes
(as herself) and the gateway, reading it as root, must neither show her bob's task, nor
block, nor grow without bound. Alice's jobs wait (`--begin` an hour away) so they hold no
Slurm slot; bob's job runs tests/owner_worker.py, which reports like a worker."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from werkzeug.security import generate_password_hash

from tests.components import SLURM, SLURM_REASON, need, slurm_answers
from tests.owner_helpers import bytes_read, drop_user, make_user, peak_rss_kib, run_as
from tests.server_helpers import ServerProcess
from tests.waiting import wait_for

pytestmark = [pytest.mark.slurm,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make users")]
QUEUE_WAIT = 900  # the one-node cluster may be busy with other tests' jobs
SEEN = 60         # the gateway acting on what alice did: a few ticks at most
PASSWORD = "pw"
WAITING = {"begin": "now+3600"}  # backend_parameters of a job that holds no slot


@pytest.fixture(scope="module")
def people() -> Iterator[tuple[str, str]]:
    alice, bob = make_user("a"), make_user("b")
    yield alice, bob
    for name in (alice, bob):
        drop_user(name)


@pytest.fixture(scope="module")
def shared() -> Iterator[Path]:
    """A 755 directory of its own under /tmp: the owners' jobs and commands reach it
    (pytest's own base directory is made 700 again by every pytest that starts)."""
    path = Path(tempfile.mkdtemp(prefix="owner-reads-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture(scope="module")
def server(people, databases, shared) -> Iterator[ServerProcess]:
    need(SLURM, slurm_answers(), SLURM_REASON)
    script = shared / "owner_worker.py"  # where the owners can read it, wherever the checkout
    shutil.copy(Path(__file__).with_name("owner_worker.py"), script)
    script.chmod(0o644)
    srv = ServerProcess(shared / "srv", databases.new("sqlite"), reconcile=True, overrides={
        "auth": {"mode": "basic",
                 "users": {name: generate_password_hash(PASSWORD) for name in people}},
        "backend": {"name": "slurm", "slurm": {"submit_as_owner": True}},
        "reconciler": {"interval_seconds": 0.5},
        "worker": {"command": ["/usr/bin/python3", str(script)]}}).start()
    yield srv
    try:
        for name in people:  # no job of ours left holding (or waiting for) a slot
            subprocess.run(["scancel", "-u", name], capture_output=True, timeout=60)
    finally:
        srv.stop()


def create(server: ServerProcess, user: str, name: str, **fields) -> str:
    task = {"name": name, "executors": [{"image": "busybox", "command": ["true"]}], **fields}
    resp = requests.post(f"{server.api}/tasks", json=task, auth=(user, PASSWORD), timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()["id"]


def full(server: ServerProcess, user: str, task_id: str) -> dict:
    resp = requests.get(f"{server.api}/tasks/{task_id}", params={"view": "FULL"},
                        auth=(user, PASSWORD), timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()


def system_logs(task: dict) -> str:
    return "\n".join(line for entry in task.get("logs") or [] for line in
                     entry.get("system_logs", []))


@pytest.fixture(scope="module")
def bobs(server, people) -> str:
    """bob's running task, whose worker has reported its host, pid and stdout."""
    bob = people[1]
    task_id = create(server, bob, "talker")
    wait_for(lambda: "secret of" in json.dumps(full(server, bob, task_id)), QUEUE_WAIT,
             "bob's worker to report", interval=1,
             detail=lambda: f"{full(server, bob, task_id)}\n{server.log()[-3000:]}")
    return task_id


def alices(server: ServerProcess, alice: str) -> tuple[str, Path]:
    """A new task of alice's, submitted (its dir handed to her), its job waiting."""
    task_id = create(server, alice, "quiet",
                     resources={"backend_parameters": WAITING})
    directory = server.work_dir / task_id
    uid = int(run_as(alice, ["id", "-u"]))

    def handed_over() -> bool:
        metadata = (full(server, alice, task_id).get("logs") or [{}])[-1].get("metadata", {})
        return bool(metadata.get("job_id")) and directory.stat().st_uid == uid

    wait_for(handed_over, SEEN, f"alice's task {task_id} to be submitted as her",
             detail=lambda: server.log()[-3000:])
    return task_id, directory


def innocent(task: dict) -> None:
    """Nothing of another task's in alice's view (bob's stdout, his worker's host and pid,
    forged lines), and no state her waiting job did not reach."""
    assert task["state"] in ("QUEUED", "INITIALIZING"), task
    text = json.dumps(task)
    assert "secret of" not in text and "forged" not in text, task
    assert "pid" not in task["logs"][-1].get("metadata", {}), task


def noted(server: ServerProcess, user: str, task_id: str, words: str,
          check=lambda task: None) -> dict:
    """Alice's task once its system logs say `words` (check(task) at every look)."""
    def seen() -> dict | None:
        task = full(server, user, task_id)
        check(task)
        return task if words in system_logs(task) else None

    return wait_for(seen, SEEN, f"{words!r} in the system logs of {task_id}",
                    detail=lambda: f"{full(server, user, task_id)}\n{server.log()[-3000:]}")


def post_event(server: ServerProcess, task_id: str, token: str, event: dict,
               timeout: float = 10) -> requests.Response:
    return requests.post(f"{server.url}/funnel/v1/tasks/{task_id}/events", json=event,
                         headers={"Authorization": f"Bearer {token}"}, timeout=timeout)


def test_a_link_to_another_users_log_is_not_read(server, people, bobs):
    alice, _ = people
    task_id, directory = alices(server, alice)
    run_as(alice, ["ln", "-s", str(server.work_dir / bobs / "events.jsonl"),
                    str(directory / "events.jsonl")])
    task = noted(server, alice, task_id, "events.jsonl is a symbolic link: not read",
                 innocent)
    innocent(task)


def test_events_of_another_task_are_dropped_and_noted(server, people, bobs):
    alice, _ = people
    task_id, directory = alices(server, alice)
    lines = [{"seq": 1, "task_id": bobs, "type": "state", "state": "RUNNING"},
             {"seq": 2, "task_id": bobs, "type": "system_log", "message": "forged by alice"},
             {"seq": 3, "task_id": task_id, "type": "system_log", "message": "alice's own"}]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    run_as(alice, ["dd", "status=none", f"of={directory / 'events.jsonl'}"], data)
    task = noted(server, alice, task_id, "alice's own", innocent)
    assert "events.jsonl: 2 event(s) of another task dropped" in system_logs(task)
    innocent(task)


def test_another_users_file_or_a_directory_is_not_read(server, people, shared):
    alice, bob = people
    task_id, directory = alices(server, alice)
    # bob's world-writable file, hard-linked into alice's dir (she may: she can write it)
    drop = shared / "drop"
    drop.mkdir(mode=0o1777)
    drop.chmod(0o1777)
    planted = drop / "bobs.jsonl"
    line = {"seq": 1, "task_id": task_id, "type": "system_log", "message": "forged by bob"}
    run_as(bob, ["sh", "-c", f"umask 0; cat > {planted}"], (json.dumps(line) + "\n").encode())
    run_as(alice, ["ln", str(planted), str(directory / "events.jsonl")])
    bob_uid = int(run_as(bob, ["id", "-u"]))
    noted(server, alice, task_id, f"events.jsonl is owned by uid {bob_uid}", innocent)
    run_as(alice, ["rm", str(directory / "events.jsonl")])
    run_as(alice, ["mkdir", str(directory / "events.jsonl")])
    task = noted(server, alice, task_id, "events.jsonl is a directory: not read")
    assert "forged" not in json.dumps(task)


def test_fifos_block_neither_the_intake_nor_other_users(server, people):
    """18 events posted with alice's worker token while FIFOs sit where the old gateway
    wrote and read: each is answered, and so is bob, within seconds."""
    alice, bob = people
    task_id, directory = alices(server, alice)
    for name in ("events.received.jsonl", "events.jsonl"):
        run_as(alice, ["mkfifo", str(directory / name)])
    token = run_as(alice, ["cat", str(directory / "worker.token")]).decode().strip()
    slowest = 0.0
    for seq in range(1, 19):
        started = time.monotonic()
        resp = post_event(server, task_id, token, {"seq": seq, "type": "system_log",
                                                   "message": f"fifo-{seq}"})
        slowest = max(slowest, time.monotonic() - started)
        assert resp.status_code == 200 and resp.json()["accepted"], resp.text
        started = time.monotonic()
        listed = requests.get(f"{server.api}/tasks", auth=(bob, PASSWORD), timeout=10)
        slowest = max(slowest, time.monotonic() - started)
        assert listed.status_code == 200, listed.text
    assert slowest < 8, f"slowest answer {slowest:.1f} s"
    task = noted(server, alice, task_id, "fifo-18")
    assert "events.jsonl is a FIFO: not read" in system_logs(task)


def test_a_huge_line_costs_bounded_memory_and_is_read_once(server, people):
    """`truncate -s 1G events.jsonl` (no newline) and one event POST: the gateway's peak
    memory stays where it was, and the line is skipped once, not re-read every pass."""
    alice, _ = people
    task_id, directory = alices(server, alice)
    token = run_as(alice, ["cat", str(directory / "worker.token")]).decode().strip()
    assert server.proc is not None
    before = peak_rss_kib(server.proc.pid)
    run_as(alice, ["truncate", "-s", "1G", str(directory / "events.jsonl")])
    post_event(server, task_id, token, {"seq": 1, "type": "system_log", "message": "posted"})
    noted(server, alice, task_id, "posted")
    noted(server, alice, task_id, "events.jsonl: a line longer than")
    read = bytes_read(server.proc.pid)
    # the long line ends; what follows is read (its offset was remembered past it)
    run_as(alice, ["sh", "-c", f"cat >> {directory / 'events.jsonl'}"], b"\n" + json.dumps(
        {"seq": 2, "type": "system_log", "message": "after the long line"}).encode() + b"\n")
    for seq in range(3, 6):  # each makes the reconciler read alice's logs again
        post_event(server, task_id, token, {"seq": seq, "type": "system_log",
                                            "message": f"poke-{seq}"})
        noted(server, alice, task_id, f"poke-{seq}")
    task = noted(server, alice, task_id, "after the long line")
    after = peak_rss_kib(server.proc.pid)
    assert after - before < 64 * 1024, f"peak RSS {before} KiB -> {after} KiB"
    again = bytes_read(server.proc.pid) - read  # requests, SQLite pages: not 1 GB again
    assert again < 256 << 20, f"{again} bytes read since the line was skipped"
    assert system_logs(task).count("a line longer than") == 1, system_logs(task)


def test_the_intake_writes_only_into_the_gateways_own_directory(server, people):
    alice, _ = people
    task_id, directory = alices(server, alice)
    token = run_as(alice, ["cat", str(directory / "worker.token")]).decode().strip()
    outside = server.work_dir.parent / f"outside-{task_id}"
    run_as(alice, ["ln", "-s", str(outside), str(directory / "events.received.jsonl")])
    resp = post_event(server, task_id, token, {"seq": 1, "type": "system_log",
                                               "message": "through the intake"})
    assert resp.status_code == 200, resp.text
    noted(server, alice, task_id, "through the intake")
    assert not outside.exists()
    own = server.work_dir / ".gateway" / task_id
    assert own.stat().st_uid == 0 and own.stat().st_mode & 0o777 == 0o700
    assert (server.work_dir / ".gateway").stat().st_mode & 0o777 == 0o700


def test_job_output_is_read_only_from_the_owners_own_files(server, people, shared):
    """A job that ended without its worker recording an end: its task's system logs quote
    the tail of slurm.out (alice's own), never bob's file hard-linked as slurm.err."""
    alice, bob = people
    task_id, directory = alices(server, alice)
    drop = shared / "drop-output"
    drop.mkdir(mode=0o1777)
    drop.chmod(0o1777)
    planted = drop / "bobs.txt"
    run_as(bob, ["sh", "-c", f"umask 0; echo secret of bob > {planted}"])
    run_as(alice, ["ln", str(planted), str(directory / "slurm.err")])
    run_as(alice, ["sh", "-c", f"echo alice wrote this > {directory / 'slurm.out'}"])
    job_id = full(server, alice, task_id)["logs"][-1]["metadata"]["job_id"]
    subprocess.run(["scancel", job_id], check=True, timeout=60)
    task = noted(server, alice, task_id, "of slurm.out:\nalice wrote this")
    assert task["state"] == "SYSTEM_ERROR", task
    assert "secret of bob" not in json.dumps(task) and "slurm.err" not in system_logs(task)
