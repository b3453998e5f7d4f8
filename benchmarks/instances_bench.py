"""N trivial tasks split over Slurm and Grid Engine at once, against the same N on one
Slurm instance: the gateway's own CPU per task (issue #28: split <= 1.1 x one instance).

Run: .venv/bin/python benchmarks/instances_bench.py [--tasks 1000]

Each side is one real `funnel server run` (its reconcilers in it, SQLite) started afresh:
- split: `hpc: slurm (partition bench)` plus `ge: gridengine (cli)`, the N tasks at once,
  those tagged site=ge (half) routed there;
- slurm_half, gridengine_half: each half alone, on a gateway with that one instance
  (the target's reference: the same tasks, each on its one instance);
- one: all N on one Slurm instance (shown beside: Grid Engine's own cost per job, its
  qstat XML and accounting reads, is in the split and not in this one).
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
SLURM = {"kind": "slurm", "partition": "bench"}
GRIDENGINE = {"kind": "gridengine", "mode": "cli"}
# side -> (backends, routing, its share of the N tasks)
SIDES = {
    "one": ({"hpc": SLURM}, [], 1.0),                # every task on one Slurm instance
    "slurm_half": ({"hpc": SLURM}, [], 0.5),         # the Slurm half, alone
    "gridengine_half": ({"ge": GRIDENGINE}, [], 0.5),  # the Grid Engine half, alone
    "split": ({"hpc": SLURM, "ge": GRIDENGINE},      # both halves at once, one gateway
              [{"when": {"tags": {"site": "ge"}}, "backend": "ge"}, {"backend": "hpc"}], 1.0),
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


def run_side(side: str, total: int, tmp: Path, timeout: float) -> dict:
    backends, routing, share = SIDES[side]
    n = round(total * share)
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
    """The four sides; `ratio`: split against the same tasks each on its own instance
    alone (the two halves' CPU added); `ratio_one`: against every task on one Slurm
    instance (Grid Engine's own cost per job included in the split, not in that one)."""
    tmp = Path(tempfile.mkdtemp(prefix="funnel-instances-"))
    sides = {side: run_side(side, n, tmp, timeout) for side in SIDES}
    alone = sides["slurm_half"]["cpu_s"] + sides["gridengine_half"]["cpu_s"]
    alone_children = alone + sides["slurm_half"]["children_cpu_s"] + \
        sides["gridengine_half"]["children_cpu_s"]
    split = sides["split"]
    return {"tasks": n, **sides, "alone_cpu_ms_per_task": round(alone * 1000 / n, 2),
            "ratio": split["cpu_s"] / alone,
            "ratio_with_children": (split["cpu_s"] + split["children_cpu_s"]) / alone_children,
            "ratio_one": split["cpu_ms_per_task"] / sides["one"]["cpu_ms_per_task"]}


def suite_rows(quick: bool) -> tuple[list[dict], dict]:
    """benchmarks/suite.py's `instances` row and the raw figures."""
    r = measure(100 if quick else 1000)
    split = r["split"]
    complete = all(r[side]["all_complete"] for side in SIDES)
    row = {"figure": f"{r['tasks']:,} tasks split over Slurm and Grid Engine at once "
                     "(gateway CPU per task)",
           "measured": f"{split['cpu_ms_per_task']:.1f} ms a task ({split['seconds']:.0f} s), "
                       f"{'all' if split['all_complete'] else 'NOT all'} COMPLETE",
           "reference": f"each half alone on its one instance {r['alone_cpu_ms_per_task']:.1f}"
                        f" ms a task; all on one Slurm instance "
                        f"{r['one']['cpu_ms_per_task']:.1f} ms ({r['ratio_one']:.2f}x)",
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
    print(f"split / each half alone, gateway CPU: {r['ratio']:.2f} (target <= "
          f"{TARGET_RATIO}); with scheduler commands {r['ratio_with_children']:.2f}; split / "
          f"all on one Slurm instance {r['ratio_one']:.2f}; results in {out}")


if __name__ == "__main__":
    main()
