"""N trivial tasks split over Slurm and Grid Engine at once, against the same N on one
Slurm instance: the gateway's own CPU per task (issue #28: split <= 1.1 x one instance).

Run: .venv/bin/python benchmarks/instances_bench.py [--tasks 1000]

Each side is one real `funnel server run` (its reconcilers in it, SQLite) started afresh:
- one: `backends: {hpc: slurm, partition bench}`, every task there;
- split: `hpc` plus `ge: gridengine` (cli), tasks tagged site=ge routed there (half).
N tasks (executor `true` in the busybox image, the real worker in each job) are created
over HTTP by 8 threads, then followed to the end by reading the SQLite file (no API calls:
the server's CPU is the tasks' own). Measured from before the first POST to the last task
ending: the server process's CPU (user + system, its threads: API and every reconciler),
and with its waited-for children (sbatch, squeue, qsub, qstat) apart. Every task must end
COMPLETE. Grid Engine here has 2 slots, so the split run lasts longer: its idle ticks
count against it (a stricter comparison, not a looser one).

Needs the single-node Slurm (partition bench) and Grid Engine of scripts/setup/ and the
worker tools of scripts/setup/40-worker.sh.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.server_helpers import ServerProcess  # noqa: E402

TARGET_RATIO = 1.1
TICK = 1.0
TERMINAL = ("COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR", "CANCELED", "PREEMPTED")
SIDES = {
    "one": ({"hpc": {"kind": "slurm", "partition": "bench"}}, []),
    "split": ({"hpc": {"kind": "slurm", "partition": "bench"},
               "ge": {"kind": "gridengine", "mode": "cli"}},
              [{"when": {"tags": {"site": "ge"}}, "backend": "ge"}, {"backend": "hpc"}]),
}
TASK = {"executors": [{"image": "busybox", "command": ["true"]}]}


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(own user+system, waited-for children's user+system) of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    # after the ")": state is fields[0]; utime, stime, cutime, cstime are stat's 14-17
    utime, stime, cutime, cstime = (int(fields[i]) for i in range(11, 15))
    return (utime + stime) / ticks, (cutime + cstime) / ticks


def states(db_path: Path) -> dict[str, int]:
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30) as conn:
        return dict(conn.execute("SELECT state, count(*) FROM tasks GROUP BY state").fetchall())


def run_side(side: str, n: int, tmp: Path, timeout: float) -> dict:
    backends, routing = SIDES[side]
    work = tmp / side
    db_path = work / "funnel.db"
    server = ServerProcess(work, f"sqlite:///{db_path}", reconcile=True, overrides={
        "backend": {"name": "local"}, "backends": backends, "routing": routing,
        "reconciler": {"interval_seconds": TICK},
        "worker": {"container_driver": "bwrap"}}).start(timeout=60)
    assert server.proc is not None
    try:
        own0, children0 = cpu_seconds(server.proc.pid)
        started = time.monotonic()
        with requests.Session() as session:
            def create(index: int) -> None:
                tags = {"site": "ge" if side == "split" and index % 2 else "hpc"}
                resp = session.post(server.api + "/tasks", json={**TASK, "tags": tags},
                                    timeout=60)
                resp.raise_for_status()

            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                list(pool.map(create, range(n)))
        created = time.monotonic() - started
        deadline = time.monotonic() + timeout
        counts: dict[str, int] = {}
        while time.monotonic() < deadline:
            counts = states(db_path)
            if sum(counts.get(state, 0) for state in TERMINAL) >= n:
                break
            time.sleep(2)
        seconds = time.monotonic() - started
        own1, children1 = cpu_seconds(server.proc.pid)
    finally:
        server.stop()
    own, children = own1 - own0, children1 - children0
    return {"tasks": n, "seconds": round(seconds, 1), "create_seconds": round(created, 1),
            "states": counts, "all_complete": counts.get("COMPLETE", 0) == n,
            "cpu_s": round(own, 2), "children_cpu_s": round(children, 2),
            "cpu_ms_per_task": round(own * 1000 / n, 2),
            "cpu_ms_per_task_with_children": round((own + children) * 1000 / n, 2)}


def measure(n: int, timeout: float = 3600.0) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="funnel-instances-"))
    one = run_side("one", n, tmp, timeout)
    split = run_side("split", n, tmp, timeout)
    return {"tasks": n, "one": one, "split": split,
            "ratio": split["cpu_ms_per_task"] / one["cpu_ms_per_task"],
            "ratio_with_children": (split["cpu_ms_per_task_with_children"]
                                    / one["cpu_ms_per_task_with_children"])}


def suite_rows(quick: bool) -> tuple[list[dict], dict]:
    """benchmarks/suite.py's `instances` row and the raw figures."""
    r = measure(100 if quick else 1000)
    one, split = r["one"], r["split"]
    complete = one["all_complete"] and split["all_complete"]
    row = {"figure": f"{r['tasks']:,} tasks split over Slurm and Grid Engine at once "
                     "(gateway CPU per task)",
           "measured": f"{split['cpu_ms_per_task']:.1f} ms a task ({split['seconds']:.0f} s; "
                       f"with scheduler commands {split['cpu_ms_per_task_with_children']:.1f}"
                       f" ms), {'all' if split['all_complete'] else 'NOT all'} COMPLETE",
           "reference": f"the same tasks on one Slurm instance {one['cpu_ms_per_task']:.1f} ms"
                        f" a task ({one['seconds']:.0f} s; with scheduler commands "
                        f"{one['cpu_ms_per_task_with_children']:.1f} ms)",
           "ratio": r["ratio"], "target": f"<= {TARGET_RATIO}x, every task COMPLETE",
           "met": complete and r["ratio"] <= TARGET_RATIO}
    return [row], r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args()
    r = measure(args.tasks, args.timeout)
    print(json.dumps(r, indent=2))
    out = REPO / "benchmarks" / "results" / f"instances-{int(time.time())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2))
    print(f"split / one, gateway CPU per task: {r['ratio']:.2f} (target <= {TARGET_RATIO}); "
          f"with scheduler commands {r['ratio_with_children']:.2f}; results in {out}")


if __name__ == "__main__":
    main()
