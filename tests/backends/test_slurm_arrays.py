"""Slurm job arrays (backend.slurm.array_max): the array script, its key, element ids in
poll/sacct/cancel/recover, old task lists; canned scheduler output first, then the real
single-node cluster (arrays of 7 and 1,000, one element canceled, a restart's recover
with an array half-done, an element's node going down, two owners' arrays), each in both
modes (slurm_mode: cli, and rest through the real slurmrestd; the owners' arrays over
rest_auth/jwt, each owner's token minted by scontrol)."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import time
from pathlib import Path

import pytest

from funnel_hpc.backends import arrays
from funnel_hpc.backends.base import BackendError, JobState
from funnel_hpc.backends.commands import Result
from funnel_hpc.backends.slurm import SlurmBackend
from funnel_hpc.backends.slurm_arrays import LIST_MAX_AGE, ListSweep, expand
from funnel_hpc.backends.slurm_link import CliLink
from funnel_hpc.backends.slurm_rest_script import FLAG_PROPERTIES, OPTION_PROPERTIES, job_properties
from funnel_hpc.core.config import ConfigError
from tests.backend_helpers import FakeRunner, backend_options, make_request
from tests.owner_helpers import drop_user, make_user, need_root
from tests.slurm_array_helpers import (
    ScriptRunner,
    node_name,
    node_up,
    requests_writing_ids,
    squeue_elements,
    wait_all,
)
from tests.slurm_rest_helpers import scheduler_calls
from tests.templating_helpers import HOSTILE, task
from tests.waiting import wait_for

NO_ACCOUNTING = Result(1, "", "sacct: error: Slurm accounting storage is disabled\n")
# a task that waits for a file "go" in its own dir (made by the test when it may end)
WAIT_FOR_GO = ["/bin/sh", "-c",
               'echo ran > "$1/out"; while [ ! -e "$1/go" ]; do sleep 0.2; done', "sh"]


def bench(work: Path, mode: str = "cli", **extra: object) -> SlurmBackend:
    """A backend on the `bench` partition (oversubscribed: many trivial jobs at once)."""
    return SlurmBackend(backend_options("slurm", partition="bench", mode=mode, **extra), work)


def waiting_requests(work: Path, prefix: str, count: int) -> list:
    return [make_request(work, {"id": f"{prefix}{i}"}, [*WAIT_FOR_GO, str(work / f"{prefix}{i}")])
            for i in range(count)]


def go(work: Path, *task_ids: str) -> None:
    for task_id in task_ids:
        (work / task_id / "go").touch()


# ---- no Slurm needed ----

def test_expand_sacct_ranges():
    assert expand("123_4") == ["123_4"] and expand("125") == ["125"]
    assert expand("123_[5-7,9]") == ["123_5", "123_6", "123_7", "123_9"]
    assert expand("123_[0-2%4]") == ["123_0", "123_1", "123_2"]
    assert expand("123_[x]") == ["123_[x]"]


def test_array_key_is_the_header_never_the_task(tmp_path):
    backend = SlurmBackend(backend_options("slurm"), tmp_path)
    assert backend.array_max == 1000

    def key(task_id: str, params: dict | None = None, **fields: object) -> str | None:
        return backend.array_key(make_request(
            tmp_path, {"id": task_id, **fields},
            ["/w", "--task-file", str(tmp_path / task_id / "task.json")], params=params))

    base = key("a1", name="one", resources={"cpu_cores": 2})
    assert base is not None
    assert key("a2", name="another\nname", tags={"x": "y"}, resources={"cpu_cores": 2}) == base
    assert key("a3", resources={"cpu_cores": 3}) != base
    assert key("a4", resources={"cpu_cores": 2, "ram_gb": 1}) != base
    assert key("a5", resources={"cpu_cores": 2, "zones": ["bench"]}) != base
    assert key("a6", resources={"cpu_cores": 2}, params={"qos": "high"}) != base
    # another worker command (not only its task dir) is another array
    other = make_request(tmp_path, {"id": "a7", "resources": {"cpu_cores": 2}},
                         ["/w2", "--task-file", str(tmp_path / "a7" / "task.json")])
    assert backend.array_key(other) != base
    assert SlurmBackend(backend_options("slurm", array_max=1), tmp_path).array_key(other) is None
    # with submit_as_owner the owner is part of the key
    owned = SlurmBackend(backend_options("slurm", submit_as_owner=True), tmp_path)
    mine, theirs = (make_request(tmp_path, {"id": f"o{i}"}, ["/w"]) for i in (1, 2))
    mine.owner, theirs.owner = "alice", "bob"
    assert owned.array_key(mine) != owned.array_key(theirs)


def test_array_max_and_a_site_template(tmp_path):
    for bad in (0, -1, 200_000):
        with pytest.raises(ConfigError, match="backend.slurm.array_max"):
            SlurmBackend(backend_options("slurm", array_max=bad), tmp_path)
    own = tmp_path / "site.sh.j2"
    own.write_text("#!/bin/bash\nexec {{ worker_command }}\n")
    assert SlurmBackend(backend_options("slurm", template=str(own)), tmp_path).array_max == 1
    assert SlurmBackend(backend_options("slurm", template=str(own),
                                        array_template="slurm-array.sh.j2"),
                        tmp_path).array_max == 1
    own_array = tmp_path / "site-array.sh.j2"
    own_array.write_text("#!/bin/bash\n#SBATCH --array=0-{{ array_size - 1 }}\n")
    assert SlurmBackend(backend_options("slurm", template=str(own),
                                        array_template=str(own_array)),
                        tmp_path).array_max == 1000
    # a per-task variable in an array template: refused, the task is told why
    per_task = tmp_path / "bad-array.sh.j2"
    per_task.write_text("#!/bin/bash\n#SBATCH --job-name={{ job_name }}\n")
    backend = SlurmBackend(backend_options("slurm", array_template=str(per_task)), tmp_path)
    with pytest.raises(BackendError, match="job_name"):
        backend.array_key(make_request(tmp_path, {"id": "p1"}))


def test_hostile_values_never_make_a_script_line(tmp_path):
    """Hostile names, tags, descriptions: the array script is a harmless task's, bash -n
    reads it; hostile resources, backend_parameters and ids are refused."""
    backend = SlurmBackend(backend_options("slurm"), tmp_path)
    backend.runner = ScriptRunner({("sbatch",): Result(0, "78\n", "")})
    hostile = {**task(HOSTILE, HOSTILE), "id": "h1", "resources": {"cpu_cores": 2}}
    plain = {"id": "h2", "name": "plain", "resources": {"cpu_cores": 2}}
    argv = [sys.executable, "-c", "pass"]
    requests = [make_request(tmp_path, hostile, argv), make_request(tmp_path, plain, argv)]
    assert backend.array_key(requests[0]) == backend.array_key(requests[1])
    backend.submit_array(requests)
    script = backend.runner.inputs[-1]
    assert script is not None
    for word in ("pwned", "evil", "reboot", "rm -rf", "h1", "h2", "plain"):
        assert word not in script, word
    listed = arrays.find(tmp_path, "h1")
    assert listed is not None
    assert script == backend.render_array_script(requests[::-1], listed[0])
    checked = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    # REST mode sends the same script plus job properties read from its header: only
    # the table's properties, none of the hostile words
    properties = job_properties(script)
    assert set(properties) <= set(OPTION_PROPERTIES.values()) | \
        {name for name, _ in FLAG_PROPERTIES.values()}, properties
    for word in ("pwned", "evil", "reboot", "rm -rf", "h1", "h2", "plain"):
        assert word not in str(properties), word
    for bad in ({"resources": {"zones": [HOSTILE]}}, {"params": {"qos": HOSTILE}}):
        params = bad.pop("params", None)
        request = make_request(tmp_path, {"id": "h3", **bad}, argv, params=params)
        with pytest.raises(BackendError, match="cannot render"):
            backend.array_key(request)
    for bad_id in ("a\nb", "$(id)", "../h1", "x" * 65):
        odd = make_request(tmp_path, {"id": bad_id}, argv)
        with pytest.raises(BackendError, match="not a task id"):
            backend.submit_array([make_request(tmp_path, {"id": "h4"}, argv), odd])
    assert backend.runner.calls == 1


def test_submit_array_refuses_tasks_of_another_command(tmp_path):
    backend = SlurmBackend(backend_options("slurm"), tmp_path)
    backend.runner = ScriptRunner({("sbatch",): Result(0, "77\n", "")})
    one = make_request(tmp_path, {"id": "c1"}, ["/w", str(tmp_path / "c1" / "task.json")])
    two = make_request(tmp_path, {"id": "c2"}, ["/w", str(tmp_path / "c1" / "task.json")])
    with pytest.raises(BackendError, match="cannot share an array"):
        backend.submit_array([one, two])
    assert backend.runner.calls == 0
    elsewhere = make_request(tmp_path / "other", {"id": "c3"}, ["/w"])
    with pytest.raises(BackendError, match="its task dir is not"):
        backend.submit_array([make_request(tmp_path, {"id": "c4"}, ["/w"]), elsewhere])
    assert backend.submit_array([make_request(tmp_path, {"id": f"c{i}"}, ["/w"])
                                 for i in (5, 6, 7)]) == ["77_0", "77_1", "77_2"]
    command, script = backend.runner.commands[-1], backend.runner.inputs[-1]
    assert command == ["sbatch", "--parsable"] and "#SBATCH --array=0-2" in str(script)
    listed = arrays.find(tmp_path, "c6")
    assert listed is not None and listed[1] == 1 and listed[0].task_ids == ("c5", "c6", "c7")
    assert (listed[0].path.stat().st_mode & 0o777) == 0o600


def test_poll_reads_elements_from_one_squeue_r():
    squeue = ("50_0|COMPLETED|0|None\n50_1|RUNNING|0|None\n50_2|PENDING|0|BeginTime\n"
              "51|RUNNING|0|None\n")
    sacct = Result(0, "50_3|COMPLETED|0:0|None\n50_[4-5,7]|PENDING|0:0|None\n", "")
    backend = SlurmBackend(backend_options("slurm"), Path("/nonexistent"))
    backend.runner = FakeRunner({("squeue",): Result(0, squeue, ""), ("sacct",): sacct})
    wanted = ["50_0", "50_1", "50_2", "50_3", "50_4", "50_7", "50_9", "51"]
    states = {j: s.state for j, s in backend.poll(wanted).items()}
    assert states == {"50_0": JobState.COMPLETED, "50_1": JobState.RUNNING,
                      "50_2": JobState.PENDING, "50_3": JobState.COMPLETED,
                      "50_4": JobState.PENDING, "50_7": JobState.PENDING,
                      "50_9": JobState.LOST, "51": JobState.RUNNING}
    squeue_argv = backend.runner.commands[0]
    assert squeue_argv[:5] == ["squeue", "-h", "--me", "-t", "all"] and "-r" in squeue_argv
    assert "JobArrayID:|,State:|,exit_code:|,Reason:" in squeue_argv
    assert [c[0] for c in backend.runner.commands].count("squeue") == 1
    # as owners: -j names the elements, in order
    owned = SlurmBackend(backend_options("slurm", submit_as_owner=True), Path("/nonexistent"))
    owned.runner = FakeRunner({("squeue",): Result(0, squeue, ""), ("sacct",): NO_ACCOUNTING})
    owned.poll(["50_10", "50_2", "51", "x;y"])
    asked = owned.runner.commands[0]
    assert asked[asked.index("-j") + 1] == "50_2,50_10,51"


def test_recover_asks_the_list_then_the_name(tmp_path):
    listed = arrays.write(tmp_path, ["r0", "r1", "r2"])
    backend = SlurmBackend(backend_options("slurm"), tmp_path)
    backend.runner = FakeRunner({
        ("squeue", "-h", "--me", "-t", "all", "-n", listed.job_name): Result(0, "60|root\n", ""),
        ("squeue",): Result(0, "", "")})
    assert backend.recover("r2", tmp_path / "r2") == "60_2"
    assert backend.recover("r9", tmp_path / "r9") is None
    assert backend.runner.commands[-1][-3:] == ["funnel-r9", "-o", "%F|%u"]
    gone = SlurmBackend(backend_options("slurm"), tmp_path)  # the array left squeue
    gone.runner = FakeRunner({("squeue",): Result(0, "", "")})
    assert gone.recover("r1", tmp_path / "r1") is None
    assert [c[-3] for c in gone.runner.commands] == [listed.job_name, "funnel-r1"]
    down = SlurmBackend(backend_options("slurm"), tmp_path)
    down.runner = FakeRunner({("squeue",): Result(1, "", "Unable to contact slurm controller")})
    with pytest.raises(BackendError) as raised:
        down.recover("r1", tmp_path / "r1")
    assert raised.value.transient


def test_old_lists_go_once_their_arrays_are_gone(tmp_path):
    young = arrays.write(tmp_path, ["y1"])
    live, done = arrays.write(tmp_path, ["l1"]), arrays.write(tmp_path, ["d1"])
    old = time.time() - LIST_MAX_AGE - 60
    for listed in (live, done):
        os.utime(listed.path, (old, old))
    failing = FakeRunner({("squeue",): Result(1, "", "Unable to contact slurm controller")})
    assert ListSweep(CliLink(failing, as_owner=False).live_names, tmp_path).run() == 0
    assert live.path.exists() and done.path.exists()
    runner = FakeRunner({("squeue",): Result(0, f"{live.job_name}\n", "")})
    sweep = ListSweep(CliLink(runner, as_owner=False).live_names, tmp_path)
    assert sweep.due() and sweep.run() == 1 and not sweep.due()
    assert young.path.exists() and live.path.exists() and not done.path.exists()
    asked = runner.commands[0]
    assert sorted(asked[asked.index("-n") + 1].split(",")) == sorted([live.job_name,
                                                                       done.job_name])


# ---- real Slurm ----

@pytest.mark.slurm
def test_real_array_of_7_and_one_element_canceled(tmp_path, slurm_mode):
    backend = bench(tmp_path, slurm_mode)
    requests = waiting_requests(tmp_path, "seven", 7)
    ids = backend.submit_array(requests)
    job = ids[0].split("_")[0]
    assert ids == [f"{job}_{i}" for i in range(7)]
    try:
        wait_all(backend, ids, {JobState.RUNNING}, timeout=180)
        assert sorted(squeue_elements(job)) == sorted(ids)  # JOBID_IDX in squeue
        backend.cancel(ids[3])
        statuses = wait_all(backend, [ids[3]], {JobState.CANCELLED}, timeout=60)
        assert statuses[ids[3]].state == JobState.CANCELLED
        others = [i for i in ids if i != ids[3]]
        assert all(s.state == JobState.RUNNING for s in backend.poll(others).values())
        go(tmp_path, *(f"seven{i}" for i in range(7)))
        finished = wait_all(backend, others, {JobState.COMPLETED, JobState.FAILED})
        assert all(s.state == JobState.COMPLETED for s in finished.values()), finished
        for i in range(7):
            assert (tmp_path / f"seven{i}" / "out").read_text() == "ran\n"
            assert (tmp_path / f"seven{i}" / "slurm.err").exists()  # each its own job output
        backend.cancel(ids[3])  # again, and a finished one: no error
        backend.cancel(ids[0])
        backend.withdraw(ids[1])
    finally:
        subprocess.run(["scancel", job])


@pytest.mark.slurm
def test_real_array_of_1000_in_one_sbatch_and_one_squeue(tmp_path, slurm_mode):
    backend = bench(tmp_path, slurm_mode)
    requests = requests_writing_ids(tmp_path, "k", 1000)
    one = (1, 0) if slurm_mode == "cli" else (0, 1)  # one sbatch, or one POST
    backend.poll(["1"])  # (REST mode: the API version is read once, first)
    calls = scheduler_calls(backend)
    ids = backend.submit_array(requests)
    assert tuple(b - a for a, b in zip(calls, scheduler_calls(backend), strict=True)) == one
    assert len(set(ids)) == 1000
    job = ids[0].split("_")[0]
    try:
        before = scheduler_calls(backend)
        statuses = wait_all(backend, ids, {JobState.COMPLETED, JobState.FAILED}, timeout=900)
        polls = sum(scheduler_calls(backend)) - sum(before)
        assert all(s.state == JobState.COMPLETED for s in statuses.values()), \
            [s for s in statuses.values() if s.state != JobState.COMPLETED][:3]
        for i in range(1000):
            assert (tmp_path / f"k{i}" / "out").read_text() == f"k{i}\n"
            assert (tmp_path / f"k{i}" / "slurm.err").exists()  # its own job output files
        calls = scheduler_calls(backend)
        backend.poll(ids)
        # one squeue (or GET) for 1,000 elements
        after = scheduler_calls(backend)
        assert tuple(b - a for a, b in zip(calls, after, strict=True)) == one, polls
    finally:
        subprocess.run(["scancel", job])


@pytest.mark.slurm
def test_real_recover_with_an_array_half_done(tmp_path, slurm_mode):
    """Element 0 COMPLETED, 1 RUNNING, 2 PENDING (held): a new backend object (a restarted
    gateway) finds each task's element; the array then ends every task right."""
    backend = bench(tmp_path, slurm_mode, site={"extra_directives": ["--hold"]})
    requests = waiting_requests(tmp_path, "half", 3)
    ids = backend.submit_array(requests)
    job = ids[0].split("_")[0]
    try:
        go(tmp_path, "half0")
        subprocess.run(["scontrol", "release", ids[0], ids[1]], check=True)
        wait_all(backend, ids[:1], {JobState.COMPLETED}, timeout=180)
        wait_all(backend, ids[1:2], {JobState.RUNNING}, timeout=180)
        assert backend.poll(ids[2:])[ids[2]].state == JobState.PENDING
        restarted = bench(tmp_path, slurm_mode)
        assert [restarted.recover(f"half{i}", tmp_path / f"half{i}") for i in range(3)] == ids
        go(tmp_path, "half1", "half2")
        subprocess.run(["scontrol", "release", ids[2]], check=True)
        finished = wait_all(restarted, ids, {JobState.COMPLETED, JobState.FAILED}, timeout=180)
        assert all(s.state == JobState.COMPLETED for s in finished.values()), finished
    finally:
        subprocess.run(["scancel", job])


@pytest.mark.slurm
def test_real_element_node_down_is_node_failed_its_sibling_runs_after(tmp_path, slurm):
    """The node of a running element goes DOWN: that element is NODE_FAILED (not
    requeued: --no-requeue), its held sibling stays PENDING and completes once the node
    is back (the node is always resumed). CLI mode only: slurmrestd 22.05 has no way to
    submit --no-requeue (backends/slurm_rest_script.py), so a REST job is requeued."""
    backend = bench(tmp_path, site={"extra_directives": ["--hold", "--no-requeue"]})
    ids = backend.submit_array(waiting_requests(tmp_path, "nf", 2))
    job, node = ids[0].split("_")[0], node_name()
    try:
        subprocess.run(["scontrol", "release", ids[0]], check=True)
        wait_all(backend, ids[:1], {JobState.RUNNING}, timeout=180)
        subprocess.run(["scontrol", "update", f"NodeName={node}", "State=DOWN",
                        "Reason=funnel-array-test"], check=True)
        failed = wait_all(backend, ids[:1], {JobState.NODE_FAILED}, timeout=120)
        assert "NODE_FAIL" in failed[ids[0]].reason
        assert backend.poll(ids[1:])[ids[1]].state == JobState.PENDING
    finally:
        if not node_up():  # (ReturnToService=2 may have brought it back already)
            subprocess.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"])
    try:
        wait_for(node_up, 120, "the node back")
        go(tmp_path, "nf1")
        subprocess.run(["scontrol", "release", ids[1]], check=True)
        done = wait_all(backend, ids[1:], {JobState.COMPLETED, JobState.FAILED}, timeout=180)
        assert done[ids[1]].state == JobState.COMPLETED, done
    finally:
        subprocess.run(["scancel", job])


@pytest.mark.slurm
@pytest.mark.parametrize("mode", ["cli", "rest"])
def test_real_arrays_of_two_owners_run_as_them(tmp_path, slurm, mode, monkeypatch):
    """Each owner's array runs as that owner, and so does one job: in CLI mode through
    `sudo -u OWNER sbatch`, in REST mode through slurmrestd with rest_auth/jwt and a
    token scontrol minted for the owner. The jobs get the owner's environment, nothing
    of the gateway's."""
    need_root()
    tmp_path.chmod(0o755)
    for parent in tmp_path.parents:
        if parent == parent.parent:
            break
        parent.chmod(parent.stat().st_mode | 0o111)  # traversable for the owners
    monkeypatch.setenv("GATEWAY_ONLY_SECRET", "s3cr3t")  # in the gateway's environment
    daemon = None
    rest: dict[str, str] = {}
    if mode == "rest":
        from tests.slurm_rest_helpers import jwt_restd

        daemon, rest = jwt_restd(tmp_path / "jwt")
        daemon.start()
    owners = [make_user("arr"), make_user("arr")]
    backend = bench(tmp_path, mode, submit_as_owner=True,
                    **({"rest": rest} if rest else {}))
    jobs: list[str] = []
    try:
        by_owner = {}
        for owner in owners:
            requests = [make_request(tmp_path, {"id": f"{owner}-{i}"},
                                     ["/bin/sh", "-c", 'id -un > "$1"; env > "$1.env"', "sh",
                                      str(tmp_path / f"{owner}-{i}" / "who")])
                        for i in range(3)]
            for request in requests:
                request.owner = owner
            assert len({backend.array_key(r) for r in requests}) == 1
            by_owner[owner] = requests
        assert backend.array_key(by_owner[owners[0]][0]) != \
            backend.array_key(by_owner[owners[1]][0])
        ids = {owner: backend.submit_array(requests) for owner, requests in by_owner.items()}
        single = make_request(tmp_path, {"id": f"{owners[1]}-one"},
                              ["/bin/sh", "-c", 'id -un > "$1"; env > "$1.env"', "sh",
                               str(tmp_path / f"{owners[1]}-one" / "who")])
        single.owner = owners[1]
        one = backend.submit(single)
        jobs = [element[0].split("_")[0] for element in ids.values()] + [one]
        every = [e for elements in ids.values() for e in elements] + [one]
        finished = wait_all(backend, every, {JobState.COMPLETED, JobState.FAILED}, timeout=300)
        assert all(s.state == JobState.COMPLETED for s in finished.values()), finished
        for request in [*by_owner[owners[0]], *by_owner[owners[1]], single]:
            account = pwd.getpwnam(request.owner or "")
            assert (request.task_dir / "who").read_text().strip() == account.pw_name
            assert request.task_dir.stat().st_uid == account.pw_uid
            environment = (request.task_dir / "who.env").read_text()
            assert "GATEWAY_ONLY_SECRET" not in environment
            assert f"HOME={account.pw_dir}\n" in environment
        for owner in owners:
            job = ids[owner][0].split("_")[0]
            shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True,
                                   text=True).stdout
            assert f"UserId={owner}(" in shown
        # the list is readable by the elements' owners, in a directory they cannot list
        listed = arrays.find(tmp_path, f"{owners[0]}-1")
        assert listed is not None and (listed[0].path.stat().st_mode & 0o777) == 0o644
        assert ((tmp_path / arrays.DIR_NAME).stat().st_mode & 0o777) == 0o711
        # recover: an owner's task in their own array, never bound to another's
        first = f"{owners[0]}-1"
        assert backend.recover(first, tmp_path / first, owners[0]) == ids[owners[0]][1]
        assert backend.recover(first, tmp_path / first, owners[1]) is None
        assert backend.recover(single.task_id, single.task_dir, owners[1]) == one
        assert backend.recover(single.task_id, single.task_dir, owners[0]) is None
    finally:
        if jobs:
            subprocess.run(["scancel", *jobs])
        backend.close()
        if daemon is not None:
            daemon.stop()
        for owner in owners:
            drop_user(owner)


@pytest.mark.slurm
def test_real_withdraw_of_one_pending_element_leaves_its_siblings(tmp_path, slurm_mode):
    """Measured on Slurm 22.05: `scancel --state=PENDING 123_1` while 123_[0-2] wait as one
    record cancels all three; withdraw splits the element out first."""
    backend = bench(tmp_path, slurm_mode)
    requests = [make_request(tmp_path, {"id": f"wd{i}"}, ["/bin/true"],
                             params={"begin": "now+1hour"}) for i in range(3)]
    ids = backend.submit_array(requests)
    job = ids[0].split("_")[0]
    try:
        wait_all(backend, ids, {JobState.PENDING}, timeout=60)
        backend.withdraw(ids[1])
        wait_all(backend, ids[1:2], {JobState.CANCELLED}, timeout=60)
        assert {j: s.state for j, s in backend.poll([ids[0], ids[2]]).items()} == \
            {ids[0]: JobState.PENDING, ids[2]: JobState.PENDING}
        backend.withdraw(ids[1])  # again: gone, no error
        running = bench(tmp_path, slurm_mode).submit_array(waiting_requests(tmp_path, "wr", 2))
        try:
            wait_all(backend, running, {JobState.RUNNING}, timeout=180)
            backend.withdraw(running[0])  # running: not withdrawn
            assert backend.poll(running)[running[0]].state == JobState.RUNNING
            go(tmp_path, "wr0", "wr1")
            done = wait_all(backend, running, {JobState.COMPLETED, JobState.FAILED})
            assert all(s.state == JobState.COMPLETED for s in done.values()), done
        finally:
            subprocess.run(["scancel", running[0].split("_")[0]])
    finally:
        subprocess.run(["scancel", job])


def test_recover_reads_the_lists_once_for_many_tasks(tmp_path):
    older = arrays.write(tmp_path, ["i0", "i1"])
    past = time.time() - 60
    os.utime(older.path, (past, past))
    newer = arrays.write(tmp_path, ["i1", "i2"])  # i1 again: a later attempt's array
    found = arrays.index(tmp_path)
    assert found["i0"] == (older, 0) and found["i1"] == (newer, 0) and found["i2"] == (newer, 1)
    assert found["i1"] == arrays.find(tmp_path, "i1")
