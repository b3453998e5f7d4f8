"""Reconciler tick CPU with N running tasks all sending live logs, beside the idle tick
(issue 18.1's benchmark).

An in-process reconciler over SQLite and the scripted scheduler double of the tests
(tests/reconciler_helpers.py): N tasks are submitted and RUNNING, each with an event log;
then per round every task's log gains one ``executor_log`` event (a short line, or a
full 10 KB tail reset) and one tick folds them all and writes every task's logs (one
transaction for all: reconciler_queries.update_many). Reported: median process CPU seconds of a
tick, idle (nothing new) and updating; 803 and 829 ms before the writes were batched.

Usage: .venv/bin/python benchmarks/live_logs_tick.py [--tasks 1000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from funnel_hpc.backends.base import JobState, JobStatus
from tests.reconciler_helpers import TRIVIAL, ScriptedBackend, make

TAIL = 10240


def append(task_dir: Path, events: list[dict]) -> None:
    with (task_dir / "events.jsonl").open("a") as fh:
        fh.write("".join(json.dumps(event, separators=(",", ":")) + "\n" for event in events))


def tick_cpu(reconciler) -> float:
    before = time.process_time()
    reconciler.tick()
    return time.process_time() - before


def measure(tasks: int, rounds: int) -> dict:
    """Median tick CPU seconds: idle, every task +1 short line, every task +10 KB reset."""
    with tempfile.TemporaryDirectory() as tmp:
        backend = ScriptedBackend()
        service, reconciler = make(Path(tmp), backend, submit_per_tick=tasks)
        ids = [service.create(TRIVIAL) for _ in range(tasks)]
        reconciler.tick()  # submits them all
        for job_id in backend.jobs:
            backend.status[job_id] = JobStatus(JobState.RUNNING)
        work = Path(tmp) / "work"
        for task_id in ids:
            (work / task_id).mkdir(parents=True, exist_ok=True)
            append(work / task_id, [
                {"seq": 1, "type": "state", "state": "INITIALIZING"},
                {"seq": 2, "type": "state", "state": "RUNNING"},
                {"seq": 3, "type": "executor_start", "index": 0, "start_time": "x"}])
        seq = 3
        reconciler.tick()  # reads the starts
        results: dict[str, list[float]] = {"idle": [], "line": [], "reset": []}
        for _round in range(rounds):
            results["idle"].append(tick_cpu(reconciler))
            for kind, text, reset in (("line", "one more line of output\n", False),
                                      ("reset", "x" * (TAIL - 1) + "\n", True)):
                seq += 1
                for task_id in ids:
                    append(work / task_id, [{"seq": seq, "type": "executor_log", "index": 0,
                                             "limit": TAIL, "stdout": text, "reset": reset}])
                results[kind].append(tick_cpu(reconciler))
        running = sum(1 for t in ids if service.get_row(t).state == "RUNNING")
    return {"tasks": tasks, "running": running, "runs": results,
            "medians": {kind: statistics.median(values) for kind, values in results.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    result = measure(args.tasks, args.rounds)
    medians = result["medians"]
    print(f"{args.tasks} running tasks ({result['running']} RUNNING at the end), median of "
          f"{args.rounds} ticks:")
    for kind, label in (("idle", "idle tick (nothing new)"),
                        ("line", "every task +1 short line"),
                        ("reset", "every task +10 KB tail reset")):
        print(f"  {label:30s} {medians[kind] * 1000:8.1f} ms CPU")
    print(json.dumps({"tasks": args.tasks, "runs": result["runs"]}))


if __name__ == "__main__":
    main()
