"""Replicas: three `funnel server run` processes, each with its reconciler, on one
PostgreSQL and one work dir, driving the real Slurm. One reconciler is active (the lease
holder, gateway/store/leases.py); kill -9 it mid-run, later the next one: every task still
completes, each has exactly one Slurm job, and the failover gap is measured. Then a
private PostgreSQL stopped for 30 s under two replicas: 503s, nothing half written, all
tasks resume.

1,000 tasks, as issue 20 asks, on Slurm's `bench` partition (trivial jobs share the two
cores there, as they would spread over a wider cluster): about 2 minutes on this 2-core
machine; the two slots of `debug` would take 15.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from sqlalchemy import create_engine, func, select, text

from funnel_hpc.backends import arrays
from funnel_hpc.gateway.store import db
from tests.components import (
    POSTGRES,
    POSTGRES_BINARIES_REASON,
    POSTGRES_REASON,
    SLURM,
    SLURM_REASON,
    need,
    needs,
    slurm_ready,
)
from tests.replica_helpers import ReplicaProcess, holder_pid, lease_row
from tests.server_helpers import _postgres_reachable
from tests.waiting import wait_for

N_TASKS = 1000
LEASE = 6.0
# scripts/setup/30-slurm.sh; `debug` starts about one job a second here
PARTITION = "bench"
TICK = 0.5
TASK = {"executors": [{"image": "busybox", "command": ["true"]}]}

pytestmark = [pytest.mark.slurm, pytest.mark.postgres, pytest.mark.slow,
              needs(POSTGRES, _postgres_reachable(), POSTGRES_REASON),
              needs(SLURM, slurm_ready(), SLURM_REASON)]


class SlurmJobLedger:
    """Every (job id, name) Slurm lists, one array element a line (squeue -r), sampled
    every 2 s by a thread: finished jobs stay listed for MinJobAge (120 s here), so no job
    is missed, however short. `jobs_of` says which of them ran a task."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir  # the gateway's: its job arrays' task lists
        self.jobs: dict[str, set[str]] = defaultdict(set)  # name -> job ids
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SlurmJobLedger:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(60)
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(2):
            self.sample()

    def sample(self) -> None:
        listed = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-o", "%i %j"],
                                capture_output=True, text=True)
        for line in listed.stdout.splitlines():
            job_id, _, name = line.partition(" ")
            self.jobs[name].add(job_id)

    def jobs_of(self, task_ids: list[str]) -> dict[str, set[str]]:
        """Task id -> the Slurm jobs that ran it: jobs named funnel-<id>, and the element
        at the task's line of each array (funnel-array-<list>) whose list holds it."""
        found = {task_id: set(self.jobs.get(f"funnel-{task_id}", ())) for task_id in task_ids}
        for name, job_ids in self.jobs.items():
            list_name = arrays.name_of_job(name)
            listed = arrays.read(self.work_dir, list_name) if list_name else None
            for index, task_id in enumerate(listed.task_ids if listed else ()):
                if task_id in found:
                    found[task_id] |= {j for j in job_ids if j.endswith(f"_{index}")}
        return found


@pytest.fixture
def private_dir() -> Iterator[Path]:
    """The replicas' work dir and image cache, outside pytest's basetemp: each pytest
    session starting on the machine chmods /tmp/pytest-of-<user>, which clears the ACL
    mask the workers set for the sandbox user, and a sandbox starting at that moment cannot
    reach its image (EXECUTOR_ERROR): 1,000 tasks hit that when other sessions run."""
    top = Path(tempfile.mkdtemp(prefix="funnel-replicas-"))
    yield top
    # a failed run leaves jobs behind: cancel those of this dir (Slurm is shared)
    listed = subprocess.run(["squeue", "-h", "-o", "%i %Z"], capture_output=True, text=True)
    left = [line.split()[0] for line in listed.stdout.splitlines()
            if line.split()[-1].startswith(f"{top}/")]
    if left:
        subprocess.run(["scancel", *left], capture_output=True)
    shutil.rmtree(top, ignore_errors=True)


def replicas(top: Path, url: str) -> list[ReplicaProcess]:
    overrides = {"backend": {"name": "slurm", "slurm": {"partition": PARTITION}},
                 "reconciler": {"interval_seconds": TICK, "lease_seconds": LEASE,
                                # several ticks of submissions, so kills land mid-submission
                                "submit_per_tick": 30,
                                # workers report through the shared work dir only: a killed
                                # replica's URL must not be theirs (a site gives its LB's)
                                "pass_server_url": False},
                 "worker": {"container_driver": "bwrap",
                            "image_cache": str(top / "image-cache")}}
    return [ReplicaProcess(top / "work", url, overrides=overrides, reconcile=True,
                           name=f"replica{i}") for i in range(3)]


def states(engine) -> dict[str, int]:
    with db.reading(engine) as conn:
        counted = conn.execute(select(db.tasks.c.state, func.count())
                               .group_by(db.tasks.c.state)).all()
    return dict(counted)  # rows are (state, count) pairs


def not_complete(engine, limit: int = 3) -> list:
    """Id, state and stored logs of a few ended tasks that did not COMPLETE (a failure's
    detail)."""
    with db.reading(engine) as conn:
        return [tuple(row) for row in conn.execute(
            select(db.tasks.c.id, db.tasks.c.state, db.tasks.c.logs)
            .where(db.tasks.c.state.in_(["SYSTEM_ERROR", "EXECUTOR_ERROR", "CANCELED"]))
            .limit(limit)).all()]


def database_bytes(engine) -> int:
    """Bytes of the task tables and the event outbox, indexes included."""
    with db.reading(engine) as conn:
        return conn.execute(text(
            "SELECT sum(pg_total_relation_size(name::regclass)) FROM unnest(ARRAY["
            "'tasks', 'task_tags', 'event_outbox']) AS name")).scalar_one()


def leader_of(engine, servers: list[ReplicaProcess]) -> ReplicaProcess | None:
    row = lease_row(engine, "slurm")
    if row is None or row.expires_at < time.time():
        return None
    alive = [s for s in servers if s.proc and s.proc.poll() is None]
    return next((s for s in alive if s.proc and s.proc.pid == holder_pid(row)), None)


def kill_leader(engine, servers: list[ReplicaProcess], leader: ReplicaProcess) -> dict:
    """kill -9 the leader; wait for another to take over; the gap by the database's clock
    (last renewal -> takeover) and by the test's (kill -> takeover). While tasks were
    still QUEUED: also how long they waited, kill -> the successor's first submission."""
    leader.kill()
    killed_at = time.time()
    last = lease_row(engine, "slurm")  # the dead holder's last renewal
    submitted = with_job(engine)  # a claim in flight at the kill was rolled back or is here
    successor = wait_for(lambda: (lambda s: s if s is not None and s is not leader else None)(
        leader_of(engine, servers)), LEASE + 120, "another replica to take the lease")
    row = lease_row(engine, "slurm")
    gap = {"successor": successor, "gap": row.acquired_at - last.renewed_at,
           "after_kill": row.acquired_at - killed_at}
    if submitted < sum(states(engine).values()):
        wait_for(lambda: with_job(engine) > submitted, 120, "the successor's first submission")
        gap["queued_wait"] = time.time() - killed_at
    return gap


def create_round_robin(servers: list[ReplicaProcess], numbers: range) -> Iterator[str]:
    """Tasks rep<n> created in turn through the replicas still alive."""
    alive = [s for s in servers if s.proc and s.proc.poll() is None]
    for n in numbers:
        server = alive[n % len(alive)]
        resp = requests.post(server.api + "/tasks", json={**TASK, "name": f"rep{n}"},
                             timeout=30)
        assert resp.status_code == 200, resp.text
        yield resp.json()["id"]


def with_job(engine) -> int:
    with db.reading(engine) as conn:
        return conn.execute(select(func.count()).select_from(db.tasks)
                            .where(db.tasks.c.job_id.is_not(None), db.tasks.c.job_id != "")
                            ).scalar_one()


def test_three_replicas_two_leader_kills(databases, private_dir):
    wait_for(slurm_ready, 180, "Slurm to answer (another test may have stopped it)")
    url = databases.new("postgres")
    servers = replicas(private_dir, url)
    engine = create_engine(url)
    gaps = []
    try:
        for server in servers:
            server.start()
        leader = wait_for(lambda: leader_of(engine, servers), 60, "a lease holder")
        with SlurmJobLedger(private_dir / "work") as ledger:
            half = N_TASKS // 2
            ids = list(create_round_robin(servers, range(half)))
            # the first leader dies while it submits (claims in flight) ...
            wait_for(lambda: with_job(engine) >= 30, 300, "30 tasks submitted")
            waiting = half - with_job(engine)
            gap = kill_leader(engine, servers, leader)
            leader = gap.pop("successor")
            gaps.append({**gap, "unsubmitted_at_kill": waiting})
            # ... the other half is created through the two left, the next leader dies later
            ids += create_round_robin(servers, range(half, N_TASKS))
            wait_for(lambda: states(engine).get("COMPLETE", 0) >= N_TASKS // 2, 900,
                     "half of the tasks COMPLETE",
                     detail=lambda: (states(engine), not_complete(engine)))
            gap = kill_leader(engine, servers, leader)
            leader = gap.pop("successor")
            gaps.append(gap)
            wait_for(lambda: states(engine).get("COMPLETE", 0) == N_TASKS, 900,
                     "every task COMPLETE",
                     detail=lambda: (states(engine), not_complete(engine), leader.log()[-2000:]))
        print(f"failover gaps (lease {LEASE} s, tick {TICK} s): {gaps}; database bytes "
              f"per COMPLETE task: {database_bytes(engine) / N_TASKS:.0f}")
        # issue 20: no QUEUED task waits longer than lease + 2 ticks without a reconciler;
        # asserted with 15 s to spare for the takeover, and 30 s for the successor's first
        # submission (its first tick reads every row and recovers the dead leader's claims:
        # 20 s on a 2-core machine under a load of 10), so that a busy machine cannot fail
        # it (the figures printed above are the measurement)
        assert "queued_wait" in gaps[0], gaps  # the first kill left tasks QUEUED
        for gap in gaps:
            assert gap["gap"] <= LEASE + 2 * TICK + 15, gaps
            assert gap.get("queued_wait", 0) <= LEASE + 2 * TICK + 30, gaps
            assert gap["gap"] >= LEASE - 1, gaps  # nobody took over before the expiry
        with db.reading(engine) as conn:  # every task once in Slurm, the job it recorded
            rows = conn.execute(select(db.tasks.c.id, db.tasks.c.job_id, db.tasks.c.attempt)).all()
        assert {row.attempt for row in rows} == {1}
        jobs = ledger.jobs_of([row.id for row in rows])
        twice = {task_id: found for task_id, found in jobs.items() if len(found) != 1}
        assert not twice, twice  # one Slurm job per task: none missing, none twice
        assert {row.id: row.job_id for row in rows} == {i: next(iter(jobs[i])) for i in ids}
    finally:
        for server in servers:
            server.stop()
        engine.dispose()


OUTAGE_SECONDS = 30
OUTAGE_TASKS = 200  # on `bench` most are still in flight when PostgreSQL stops


def test_postgres_down_30s_replicas_answer_503_and_resume(private_dir):
    """Two replicas on a private PostgreSQL that is stopped for 30 s mid-run: every API
    call meanwhile is a 503, the lease holder stops reconciling, no task or tag row is
    half written, and after the restart every task completes with one Slurm job."""
    from tests.postgres_helpers import PrivatePostgres, available

    need(POSTGRES, available(), POSTGRES_BINARIES_REASON)
    wait_for(slurm_ready, 180, "Slurm to answer (another test may have stopped it)")
    postgres = PrivatePostgres.create()
    servers = replicas(private_dir, postgres.url)[:2]
    engine = create_engine(postgres.url)
    try:
        for server in servers:
            server.start()
        leader = wait_for(lambda: leader_of(engine, servers), 60, "a lease holder")
        with SlurmJobLedger(private_dir / "work") as ledger:
            ids = [requests.post(servers[n % 2].api + "/tasks", timeout=30, json={
                **TASK, "name": f"out{n}", "tags": {"n": str(n)}}).json()["id"]
                for n in range(OUTAGE_TASKS)]
            wait_for(lambda: states(engine).get("COMPLETE", 0) >= 5, 600, "5 tasks COMPLETE")
            print(f"states when PostgreSQL stops: {states(engine)}")
            engine.dispose()
            postgres.stop()
            statuses = outage_statuses(servers, time.monotonic() + OUTAGE_SECONDS)
            wait_for(lambda: "lease of slurm lost" in leader.log(), 120,
                     "the holder to stop reconciling", detail=leader.log)
            # once its lease ran out the holder tried no tick (each would have failed)
            assert "tick failed" not in leader.log().split("lease of slurm lost", 1)[1]
            postgres.start()
            wait_for(lambda: states(engine).get("COMPLETE", 0) == OUTAGE_TASKS, 900,
                     "every task COMPLETE", detail=lambda: states(engine))
        assert statuses == {503}, statuses  # never a 500, never a half answer
        with db.reading(engine) as conn:
            tags = conn.execute(select(db.tasks.c.id, db.task_tags.c.value).join(
                db.task_tags, db.task_tags.c.task_seq == db.tasks.c.seq)).all()
        assert sorted(tags) == sorted((task_id, str(n)) for n, task_id in enumerate(ids))
        assert sum(states(engine).values()) == OUTAGE_TASKS  # no 503'd create was stored
        counts = {task_id: len(found) for task_id, found in ledger.jobs_of(ids).items()}
        assert set(counts.values()) == {1}, counts
    finally:
        for server in servers:
            server.stop()
        engine.dispose()
        postgres.destroy()


def outage_statuses(servers: list[ReplicaProcess], until: float) -> set[int]:
    """POST and GET on every replica, over and over until `until`: the statuses seen."""
    seen: set[int] = set()
    while time.monotonic() < until:
        for server in servers:
            seen.add(requests.post(server.api + "/tasks", json={**TASK, "name": "during"},
                                   timeout=60).status_code)
            seen.add(requests.get(server.api + "/tasks", timeout=60).status_code)
        time.sleep(1)  # pacing of the probes, not a wait for a condition
    return seen
