"""Reconciler tick CPU with per-owner limits on and off (limits.per_owner, issue 28).

An in-process reconciler over SQLite and the scheduler double of reconciler_tick.py. N
QUEUED tasks without a job, spread over 10 owners, plus 2 RUNNING tasks of each owner (job,
event log); every owner may have 2 tasks in flight, so with limits on every tick finds all
of them waiting: the tick a site pays over and over while users queue more than they may
run. Measured, as process CPU (time.process_time), median of --ticks ticks, in one run:
- limits on: the whole tick (the one grouped count query, owners in turn, every owner's
  next task refused; nothing written: each waiting task was told on the first tick);
- limits off, nothing picked (reconciler.submit_per_tick 0): the same tick without
  choosing what to submit, the reference;
- choosing 500 of the N alone: owners in turn (FairShare.pick, limits off) and the
  oldest-first pick it replaced (oldest_first, below).

Usage: .venv/bin/python benchmarks/quotas_tick.py [--sizes 1000,10000] [--ticks 7]
Results go to benchmarks/results/quotas-tick-<time>.json.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sqlalchemy import insert  # noqa: E402

from benchmarks.reconciler_tick import EVENTS, InstantBackend  # noqa: E402
from funnel_hpc.backends.base import JobState, JobStatus  # noqa: E402
from funnel_hpc.core import config as config_mod  # noqa: E402
from funnel_hpc.core.events import rfc3339  # noqa: E402
from funnel_hpc.gateway.reconcile.reconciler import Reconciler  # noqa: E402
from funnel_hpc.gateway.store import db  # noqa: E402
from tests.reconciler_helpers import TRIVIAL, make  # noqa: E402

OWNERS = 10
IN_FLIGHT_EACH = 2
PICK = 500  # reconciler.submit_per_tick's default


def fill(service, work: Path, backend: InstantBackend, queued: int) -> None:
    """`queued` QUEUED tasks without a job over OWNERS owners, and IN_FLIGHT_EACH RUNNING
    tasks of each owner with a job and an event log."""
    an_hour_ago = rfc3339(time.time() - 3600)
    rows = []
    for n in range(queued):
        rows.append({"id": f"queued{n:07d}", "state": "QUEUED", "name": None,
                     "owner": f"owner{n % OWNERS}", "creation_time": an_hour_ago,
                     "spec": TRIVIAL, "logs": [], "backend": backend.name, "job_id": None,
                     "attempt": 0, "event_seq": 0, "updated_at": an_hour_ago, "cpu_cores": 1})
    for n in range(OWNERS * IN_FLIGHT_EACH):
        task_id, job_id = f"running{n:04d}", str(1_000_000 + n)
        rows.append({"id": task_id, "state": "RUNNING", "name": None,
                     "owner": f"owner{n % OWNERS}", "creation_time": an_hour_ago,
                     "spec": TRIVIAL, "logs": [], "backend": backend.name, "job_id": job_id,
                     "attempt": 1, "event_seq": 2, "updated_at": an_hour_ago, "cpu_cores": 1})
        backend.jobs[job_id] = task_id
        backend.answer[job_id] = JobStatus(JobState.RUNNING)
        directory = work / task_id
        directory.mkdir(parents=True)
        (directory / "events.jsonl").write_text(EVENTS)
    with db.writing(service.engine) as conn:
        conn.execute(insert(db.tasks), rows)


def oldest_first(unsubmitted: dict, limit: int) -> list:
    """The pick owners in turn replaced (InFlightIndex.next_to_submit until 2026-12-06):
    the oldest `limit` QUEUED tasks without a job, whoever owns them."""
    if len(unsubmitted) <= limit:
        return sorted(unsubmitted.values(), key=lambda row: row.seq)
    return heapq.nsmallest(limit, unsubmitted.values(), key=lambda row: row.seq)


def cpu_ms(step: Callable[[], object], times: int) -> float:
    """Median process CPU of `times` calls, in ms."""
    runs = []
    for _ in range(times):
        before = time.process_time()
        step()
        runs.append(time.process_time() - before)
    return statistics.median(runs) * 1000


def measure_size(queued: int, ticks: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        backend = InstantBackend()
        limits = {"limits": {"per_owner": {"max_tasks_in_flight": IN_FLIGHT_EACH}}}
        service, limited = make(Path(tmp), backend, limits)
        fill(service, Path(tmp) / "work", backend, queued)
        first = cpu_ms(limited.tick, 1)  # reads every row; tells each owner's next task why
        told = sum(1 for row in service.reconciler_queries.active_rows()
                   if row.state == "QUEUED" and row.job_id is None)
        on = cpu_ms(limited.tick, ticks)
        assert limited.last_tick.submitted == 0
        config = config_mod.load(environ={}, overrides={
            "work_dir": str(Path(tmp) / "work"),
            "reconciler": {"submit_threads": 1, "submit_per_tick": 0}})
        unlimited = Reconciler(service, backend, config)
        unlimited.tick()  # its first tick reads every row
        off = cpu_ms(unlimited.tick, ticks)
        waiting = unlimited.index.unsubmitted
        assert len(waiting) == queued
        fair = cpu_ms(lambda: unlimited.submitter.fair_share.pick(waiting, PICK), ticks)
        oldest = cpu_ms(lambda: oldest_first(waiting, PICK), ticks)
        submitted = service.state_counts().get("INITIALIZING", 0)
    return {"queued": queued, "owners": OWNERS, "queued_at_end": told, "submitted": submitted,
            "first_tick_on_ms": first, "tick_on_ms": on, "tick_off_nothing_picked_ms": off,
            "pick_in_turn_ms": fair, "pick_oldest_first_ms": oldest}


def measure(sizes: list[int], ticks: int) -> dict:
    return {"time": datetime.now(UTC).isoformat(), "cpus": os.cpu_count(),
            "curve": [measure_size(size, ticks) for size in sizes]}


def suite_rows(quick: bool) -> tuple[list[dict], dict]:
    """Rows for benchmarks/suite.py: the tick with limits on against the same tick
    choosing nothing, at 1,000 and 10,000 QUEUED tasks."""
    r = measure([1000, 10000], 5 if quick else 7)
    rows = []
    for point in r["curve"]:
        rows.append({
            "figure": f"reconciler tick, {point['queued']:,} QUEUED over {OWNERS} owners all "
                      "at limits.per_owner (SQLite)",
            "measured": f"{point['tick_on_ms']:.1f} ms CPU",
            "reference": f"the same tick choosing nothing {point['tick_off_nothing_picked_ms']:.1f}"
                         f" ms; owners in turn, 500 of them, {point['pick_in_turn_ms']:.1f} ms"
                         f" (oldest first {point['pick_oldest_first_ms']:.1f} ms)",
            "ratio": point["tick_on_ms"] / max(point["tick_off_nothing_picked_ms"], 0.001),
            "target": "context", "met": None})
    return rows, r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--ticks", type=int, default=7)
    args = parser.parse_args()
    results = measure([int(size) for size in args.sizes.split(",")], args.ticks)
    for point in results["curve"]:
        print(f"{point['queued']:>7,} QUEUED, {OWNERS} owners at their limit: tick "
              f"{point['tick_on_ms']:6.1f} ms CPU with limits on (first "
              f"{point['first_tick_on_ms']:.0f} ms), "
              f"{point['tick_off_nothing_picked_ms']:6.1f} ms off choosing nothing; "
              f"choosing {PICK}: owners in turn {point['pick_in_turn_ms']:.1f} ms, oldest first "
              f"{point['pick_oldest_first_ms']:.1f} ms")
    out = REPO / "benchmarks" / "results" / f"quotas-tick-{int(time.time())}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"  written to {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
