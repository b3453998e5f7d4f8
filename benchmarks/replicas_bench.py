"""Replicas on one PostgreSQL: the reconciler failover gap and the API create rate.

- **Failover gap.** Three `funnel server run` replicas (local backend, no tasks: every
  tick answers at once) share one PostgreSQL database; the lease holder is killed with -9,
  a fresh replica takes the dead one's place, again, --kills times. Each replica's ticks
  are read from its /metrics (``funnel_reconciler_tick_seconds_count``) every 0.05 s; the
  gap runs from the dead holder's last tick to the next holder's first, against the
  configured lease + 2 ticks (gateway/store/leases.py's promise). The database's own figure
  (last renewal -> takeover, from the lease row) is reported beside it.
- **Create rate.** 8 client processes (benchmarks/api_bench.py's clients) create tasks
  through 1 replica, then through 2 (clients split between them), in the same run, each on
  a fresh PostgreSQL database, interleaved --rounds times; replicas run without a
  reconciler, so only the API is measured. On a 2-core machine two replicas compete for
  the same cores as the clients and PostgreSQL: the figure is context, not a speed-up.

Usage: .venv/bin/python benchmarks/replicas_bench.py [--quick]
Cost: about 10 s per kill plus 10 s per create measurement.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
from sqlalchemy import create_engine

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.api_bench import CLIENTS, _client  # noqa: E402
from tests.replica_helpers import ReplicaProcess, holder_pid, lease_row  # noqa: E402
from tests.server_helpers import DatabaseFactory  # noqa: E402
from tests.waiting import wait_for  # noqa: E402

LEASE = 3.0
TICK = 0.5
SCRAPE_SECONDS = 0.05
TICK_COUNT = "funnel_reconciler_tick_seconds_count"
BACKEND = "local"


def tick_count(replica: ReplicaProcess) -> float | None:
    """The replica's reconciler ticks so far (None: it does not answer)."""
    try:
        text = requests.get(replica.url + "/metrics", timeout=2).text
    except requests.RequestException:
        return None
    for line in text.splitlines():
        if line.startswith(TICK_COUNT):
            return float(line.split()[-1])
    return None


class TickWatch:
    """Samples every replica's tick count; remembers when each count last changed."""

    def __init__(self) -> None:
        self.replicas: list[ReplicaProcess] = []
        self.counts: dict[str, float] = {}
        self.ticks: dict[str, list[float]] = {}  # name -> times a new tick was seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def watch(self, replica: ReplicaProcess) -> None:
        self.ticks.setdefault(replica.name, [])
        self.replicas = [*self.replicas, replica]

    def _run(self) -> None:
        while not self._stop.wait(SCRAPE_SECONDS):
            for replica in self.replicas:
                if replica.proc is None or replica.proc.poll() is not None:
                    continue
                count = tick_count(replica)
                if count is not None and count > self.counts.get(replica.name, 0.0):
                    self.counts[replica.name] = count
                    self.ticks[replica.name].append(time.time())

    def __enter__(self) -> TickWatch:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def start_replica(work: Path, url: str, number: int, watch: TickWatch) -> ReplicaProcess:
    overrides = {"backend": {"name": BACKEND},
                 "reconciler": {"interval_seconds": TICK, "lease_seconds": LEASE}}
    replica = ReplicaProcess(work, url, overrides=overrides, reconcile=True,
                             name=f"replica{number}").start(timeout=60)
    watch.watch(replica)
    return replica


def holder(engine, replicas: list[ReplicaProcess]) -> ReplicaProcess | None:
    row = lease_row(engine, BACKEND)
    if row is None or row.expires_at < time.time():
        return None
    return next((r for r in replicas if r.proc and r.proc.poll() is None
                 and r.proc.pid == holder_pid(row)), None)


def one_failover(engine, replicas: list[ReplicaProcess], watch: TickWatch) -> dict:
    """kill -9 the holder (after it ticked twice); the gap to the next holder's first tick."""
    dead = wait_for(lambda: holder(engine, replicas), 60, "a lease holder")
    wait_for(lambda: len(watch.ticks[dead.name]) >= 2, 30, "the holder to tick")
    dead.kill()
    killed_at = time.time()
    last_renewal = lease_row(engine, BACKEND).renewed_at
    alive = [r for r in replicas if r is not dead]
    ticked = wait_for(lambda: next((r for r in alive if any(
        t > killed_at for t in watch.ticks[r.name])), None), LEASE * 10, "a new holder's tick")
    first = min(t for t in watch.ticks[ticked.name] if t > killed_at)
    last = max(watch.ticks[dead.name])
    taken = lease_row(engine, BACKEND)
    return {"gap_s": round(first - last, 3), "after_kill_s": round(first - killed_at, 3),
            "renewal_to_takeover_s": round(taken.acquired_at - last_renewal, 3)}


def measure_failover(kills: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="funnel-replicas-bench-"))
    databases = DatabaseFactory(tmp)
    url = databases.new("postgres")
    engine = create_engine(url)
    replicas: list[ReplicaProcess] = []
    gaps: list[dict] = []
    try:
        with TickWatch() as watch:
            replicas = [start_replica(tmp / "work", url, n, watch) for n in range(3)]
            for kill in range(kills):
                gap = one_failover(engine, replicas, watch)
                gaps.append(gap)
                replicas = [r for r in replicas if r.proc and r.proc.poll() is None]
                replicas.append(start_replica(tmp / "work", url, 3 + kill, watch))
    finally:
        for replica in replicas:
            replica.stop()
        engine.dispose()
        databases.drop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    limit = LEASE + 2 * TICK
    median = statistics.median(g["gap_s"] for g in gaps)
    return {"lease_s": LEASE, "tick_s": TICK, "limit_s": limit, "kills": gaps,
            "gap_median_s": round(median, 3), "gap_max_s": max(g["gap_s"] for g in gaps),
            "renewal_to_takeover_median_s": round(statistics.median(
                g["renewal_to_takeover_s"] for g in gaps), 3)}


def create_rate(urls: list[str], total: int) -> float:
    """Tasks/s created by CLIENTS processes, client i through urls[i % len(urls)]."""
    per = total // CLIENTS
    with multiprocessing.Pool(CLIENTS) as pool:
        pool.map(_client, [(urls[i % len(urls)], 5) for i in range(CLIENTS)])  # warm-up
        start = time.perf_counter()
        done = sum(pool.map(_client, [(urls[i % len(urls)], per) for i in range(CLIENTS)]))
        return done / (time.perf_counter() - start)


def one_create_run(tmp: Path, databases: DatabaseFactory, count: int, total: int) -> float:
    url = databases.new("postgres")
    replicas = [ReplicaProcess(tmp / f"create{count}-{n}", url, name=f"api{n}")
                for n in range(count)]
    try:
        for replica in replicas:
            replica.start(timeout=60)
        return create_rate([r.api + "/tasks" for r in replicas], total)
    finally:
        for replica in replicas:
            replica.stop()


def measure_creates(total: int, rounds: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="funnel-replicas-bench-"))
    databases = DatabaseFactory(tmp)
    runs: dict[str, list[float]] = {"one": [], "two": []}
    try:
        for _round in range(rounds):  # interleaved: drift hits both alike
            runs["one"].append(one_create_run(tmp, databases, 1, total))
            runs["two"].append(one_create_run(tmp, databases, 2, total))
    finally:
        databases.drop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    one, two = statistics.median(runs["one"]), statistics.median(runs["two"])
    return {"creates": total, "clients": CLIENTS, "rounds": rounds,
            "one_replica_per_s": round(one, 1), "two_replicas_per_s": round(two, 1),
            "ratio": round(two / one, 3), "runs": runs}


def measure(quick: bool) -> dict:
    return {"failover": measure_failover(3 if quick else 5),
            "create": measure_creates(1000 if quick else 4000, 1 if quick else 3)}


def suite_rows(quick: bool) -> tuple[list[dict], dict]:
    """benchmarks/suite.py's replica rows (failover gap, create rate) and the raw figures."""
    r = measure(quick)
    fail, create = r["failover"], r["create"]
    gaps = ", ".join(f"{g['gap_s']:.2f}" for g in fail["kills"])
    rows = [{"figure": f"reconciler failover after kill -9 of the lease holder, 3 replicas "
                       f"on PostgreSQL (lease {fail['lease_s']:g} s, tick {fail['tick_s']:g} s)",
             "measured": f"last tick -> next holder's first tick: median "
                         f"{fail['gap_median_s']:.2f} s, max {fail['gap_max_s']:.2f} s "
                         f"({len(fail['kills'])} kills: {gaps})",
             "reference": f"lease + 2 ticks {fail['limit_s']:g} s",
             "ratio": fail["gap_median_s"] / fail["limit_s"],
             "target": "<= lease + 2 ticks", "met": fail["gap_max_s"] <= fail["limit_s"]},
            {"figure": f"create, {create['clients']} clients, 2 replicas on PostgreSQL "
                       "(API only)",
             "measured": f"{create['two_replicas_per_s']:.0f} tasks/s",
             "reference": f"1 replica {create['one_replica_per_s']:.0f} tasks/s",
             "ratio": create["ratio"],
             "target": "context (2 cores: replicas share them with clients and PostgreSQL)"}]
    return rows, r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rows, raw = suite_rows(args.quick)
    for row in rows:
        print(f"{row['figure']}: {row['measured']} | {row['reference']} | ratio "
              f"{row['ratio']:.2f} | {row['target']}"
              + ("" if row.get("met") is None else f": {'met' if row['met'] else 'MISSED'}"))
    out = REPO / "benchmarks" / "results" / f"replicas-{int(time.time())}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(raw, indent=2))
    print(json.dumps(raw, indent=2))
    print(f"  written to {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
