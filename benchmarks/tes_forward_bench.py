"""The tes backend's throughput (issue #28): N trivial tasks through a funnel-hpc gateway
forwarding to another, against the same N sent straight to such a server, in one run.

Both sides are real servers as the tests start them (tests/tes_helpers.py): the remote is
a funnel-hpc server with auth on, the local backend (max_concurrent 2) running busybox
`true` through bwrap from the test registry; the forwarder is a second server (its own
process, work dir and SQLite database) whose backend is `tes`, with a bearer token from a
file. Clients on both sides use bearer tokens. Each measurement gets a fresh remote with
the same configuration, and every server runs the shipped reconciler interval (5 s).
Measured: from the first POST (8 client threads) until every task is COMPLETE (listed
with state=COMPLETE once a second), the rate of each, their ratio (target >= 0.8), and
the forwarder's CPU per task (its whole process: API, reconciler, the tes backend's calls);
as context, each remote's own span (first task created to last task ended, from its logs).

Usage: .venv/bin/python benchmarks/tes_forward_bench.py [--quick] [--tasks N]
Results go to benchmarks/results/tes-forward-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.server_helpers import DatabaseFactory, ServerProcess  # noqa: E402
from tests.tes_helpers import (  # noqa: E402
    REMOTE_AUTH,
    USER_AUTH,
    forwarder,
    remote_server,
    token_file,
)
from tests.waiting import wait_for  # noqa: E402

TASKS, QUICK_TASKS = 1000, 50
ROUNDS = 2  # of each side (1 with --quick)
CLIENTS = 8
INTERVAL = 5.0  # the shipped reconciler.interval_seconds
TARGET = 0.8
TRIVIAL = {"executors": [{"image": "busybox", "command": ["true"]}]}
ENDED = ("COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR", "CANCELED", "PREEMPTED")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (its threads included)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def count(server: ServerProcess, state: str, auth: Any) -> int:
    """Tasks in `state`, by a walk of MINIMAL pages."""
    total, token = 0, None
    while True:
        params = {"state": state, "page_size": 2047, **({"page_token": token} if token else {})}
        answer = requests.get(server.api + "/tasks", params=params, auth=auth,
                              timeout=60).json()
        total += len(answer.get("tasks") or [])
        token = answer.get("next_page_token")
        if not token:
            return total


def span(server: ServerProcess, auth: Any) -> float:
    """Seconds from the first task's creation to the last task's end on `server`, from its
    task logs: how long the server itself took, whoever sent the tasks."""
    from datetime import datetime as clock

    def parse(text: str) -> float:
        return clock.fromisoformat(text.replace("Z", "+00:00")).timestamp()

    first, last, token = float("inf"), 0.0, None
    while True:
        params = {"view": "BASIC", "page_size": 2047,
                  **({"page_token": token} if token else {})}
        answer = requests.get(server.api + "/tasks", params=params, auth=auth,
                              timeout=120).json()
        for task in answer.get("tasks") or []:
            first = min(first, parse(task["creation_time"]))
            ends = [log.get("end_time") for log in task.get("logs") or [] if log.get("end_time")]
            if ends:
                last = max(last, parse(ends[-1]))
        token = answer.get("next_page_token")
        if not token:
            return last - first


def run(server: ServerProcess, tasks: int, auth: Any) -> dict[str, Any]:
    """POST `tasks` trivial tasks with CLIENTS threads; wait until all ended."""
    cpu_before = cpu_seconds(server.proc.pid) if server.proc else 0.0
    started = time.monotonic()

    def post(_n: int) -> None:
        resp = requests.post(server.api + "/tasks", json=TRIVIAL, auth=auth, timeout=60)
        resp.raise_for_status()

    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(post, range(tasks)))
    posted = time.monotonic() - started

    def ended() -> dict[str, int] | None:
        counts = {state: count(server, state, auth) for state in ENDED}
        return counts if sum(counts.values()) >= tasks else None

    counts = wait_for(ended, 60 + tasks * 3.0, f"{tasks} tasks to end", interval=1.0,
                      detail=lambda: server.log()[-3000:])
    seconds = time.monotonic() - started
    cpu = (cpu_seconds(server.proc.pid) if server.proc else 0.0) - cpu_before
    return {"tasks": tasks, "seconds": seconds, "post_seconds": posted,
            "rate_per_s": tasks / seconds, "complete": counts["COMPLETE"], "ended": counts,
            "server_cpu_s": cpu, "server_cpu_ms_per_task": cpu * 1000 / tasks}


def direct(tmp: Path, dbs: DatabaseFactory, tasks: int) -> dict[str, Any]:
    """The tasks sent straight to a fresh remote."""
    remote = remote_server(tmp, dbs.new("sqlite"), interval=INTERVAL).start()
    try:
        result = run(remote, tasks, REMOTE_AUTH)
        result["remote_span_s"] = span(remote, REMOTE_AUTH)
        return result
    finally:
        remote.stop()


def forwarded(tmp: Path, dbs: DatabaseFactory, tasks: int) -> dict[str, Any]:
    """The tasks sent to a forwarder in front of a fresh remote."""
    remote = remote_server(tmp / "remote", dbs.new("sqlite"), interval=INTERVAL).start()
    token = token_file(tmp / "secrets")
    gateway = forwarder(tmp / "forwarder", dbs.new("sqlite"), remote.url, token,
                        reconciler={"interval_seconds": INTERVAL}).start()
    try:
        result = run(gateway, tasks, USER_AUTH)
        result["remote_complete"] = count(remote, "COMPLETE", REMOTE_AUTH)
        result["remote_span_s"] = span(remote, REMOTE_AUTH)
        return result
    finally:
        gateway.stop()
        remote.stop()


def measure(quick: bool, tasks: int | None = None, rounds: int | None = None
            ) -> dict[str, Any]:
    """`rounds` of each side in ABBA order (direct, forwarded, forwarded, direct, ...), so
    that a load drifting on the machine weighs on both alike; the rates are over all
    rounds of a side."""
    tasks = tasks or (QUICK_TASKS if quick else TASKS)
    rounds = rounds or (1 if quick else ROUNDS)
    tmp = Path(tempfile.mkdtemp(prefix="funnel-tes-forward-"))
    dbs = DatabaseFactory(tmp)
    sides = {"direct": direct, "forwarded": forwarded}
    order = [name for n in range(rounds)
             for name in (("direct", "forwarded") if n % 2 == 0 else ("forwarded", "direct"))]
    runs: dict[str, list[dict[str, Any]]] = {"direct": [], "forwarded": []}
    for index, name in enumerate(order):
        runs[name].append(sides[name](tmp / f"{index}-{name}", dbs, tasks))
        print(f"  {name}: {runs[name][-1]['seconds']:.0f} s", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    out: dict[str, Any] = {"tasks": tasks, "rounds": rounds, "interval_seconds": INTERVAL,
                           "runs": runs}
    for name, results in runs.items():
        seconds = sum(r["seconds"] for r in results)
        out[name] = {"seconds": seconds, "rate_per_s": tasks * len(results) / seconds,
                     "complete": sum(r["complete"] for r in results),
                     "server_cpu_ms_per_task":
                         sum(r["server_cpu_ms_per_task"] for r in results) / len(results)}
    out["ratio"] = out["forwarded"]["rate_per_s"] / out["direct"]["rate_per_s"]
    out["ratios_per_round"] = [f["seconds"] and d["seconds"] / f["seconds"]
                               for d, f in zip(runs["direct"], runs["forwarded"], strict=True)]
    out["all_complete"] = all(
        r["complete"] == tasks for results in runs.values() for r in results) and all(
        r["remote_complete"] == tasks for r in runs["forwarded"])
    return out


def suite_rows(quick: bool) -> tuple[list[dict], dict]:
    """benchmarks/suite.py's tes backend row and the raw figures."""
    r = measure(quick)
    f, d = r["forwarded"], r["direct"]
    rounds = f", {r['rounds']} runs of each" if r["rounds"] > 1 else ""
    rows = [{"figure": f"tes backend: {r['tasks']:,} trivial tasks through a forwarding "
                       f"funnel-hpc (rate{rounds})",
             "measured": f"{f['rate_per_s']:.1f}/s ({f['seconds']:.0f} s in all), "
                         f"{'all' if r['all_complete'] else 'NOT all'} COMPLETE; forwarder "
                         f"CPU {f['server_cpu_ms_per_task']:.1f} ms per task",
             "reference": f"sent straight to the remote {d['rate_per_s']:.1f}/s "
                          f"({d['seconds']:.0f} s)",
             "ratio": r["ratio"], "target": f">= {TARGET:g}x",
             "met": r["all_complete"] and r["ratio"] >= TARGET}]
    return rows, r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_TASKS} tasks")
    parser.add_argument("--tasks", type=int, help=f"tasks ({TASKS:,}; --quick {QUICK_TASKS})")
    parser.add_argument("--rounds", type=int, help=f"runs of each side ({ROUNDS}; --quick 1)")
    args = parser.parse_args()
    raw = measure(args.quick, args.tasks, args.rounds)
    print(json.dumps(raw, indent=2))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = REPO / "benchmarks" / "results" / f"tes-forward-{stamp}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(raw, indent=2))
    print(f"ratio {raw['ratio']:.2f} (target >= {TARGET:g}); written to "
          f"{out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
