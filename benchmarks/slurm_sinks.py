"""The 1,000-task Slurm run with event sinks on against the same run without (issue 21:
>= 0.95x), and whether every event reached the sinks.

`slurm_throughput.gateway_run` twice on fresh SQLite databases: without sinks, then with a
webhook receiver in its own process (tests/events_helpers.py; it checks every event's HMAC)
and, when Redis answers on 127.0.0.1:6379 (scripts/setup/60-broker.sh), Redis Streams
under a prefix of this run. Each sink's event count is checked against the outbox, and at
the webhook per task.

Usage: .venv/bin/python benchmarks/slurm_sinks.py [--tasks 1000]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.sink_endpoints import SinkEndpoints  # noqa: E402
from benchmarks.slurm_throughput import gateway_run, save  # noqa: E402
from tests.server_helpers import DatabaseFactory  # noqa: E402


def sinks_measure(n: int, tmp: Path, dbs: DatabaseFactory) -> dict:
    """The gateway's run of N tasks without sinks, then with the webhook (and Redis)."""
    plain = gateway_run(n, tmp / f"gw{n}-plain", dbs.new("sqlite"))
    sinks = SinkEndpoints()
    try:
        published = gateway_run(n, tmp / f"gw{n}-sinks", dbs.new("sqlite"), sinks)
    finally:
        sinks.close()
    complete = all(run["states"].get("COMPLETE", 0) == n for run in (plain, published))
    return {"tasks": n, "plain": plain, "sinks": published,
            "rate_plain_per_s": n / plain["seconds"], "rate_sinks_per_s": n / published["seconds"],
            "ratio": plain["seconds"] / published["seconds"], "all_complete": complete}


def suite_rows(quick: bool) -> tuple[list[dict], dict]:
    """benchmarks/suite.py's rows for the issue 21 target: the Slurm run with sinks on
    stays >= 0.95x the same run without; and every event reached the sinks."""
    n = 200 if quick else 1000
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
    tmp = Path(tempfile.mkdtemp(prefix="funnel-throughput-sinks-", dir="/var/tmp"))
    try:
        r = sinks_measure(n, tmp, DatabaseFactory(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    got = r["sinks"]["sinks"]
    names = "webhook + Redis" if got["redis"] is not None else "webhook (no Redis here)"
    delivered = (got["webhook"] >= got["recorded"] and got["every_task_complete_at_webhook"]
                 and got["bad_signatures"] == 0
                 and (got["redis"] is None or got["redis"] >= got["recorded"]))
    rows = [{"figure": f"{r['tasks']:,} tasks QUEUED->COMPLETE on Slurm, {names} sinks on",
             "measured": f"{r['sinks']['seconds']:.0f} s, {r['rate_sinks_per_s']:.1f}/s",
             "reference": (f"same run without sinks {r['plain']['seconds']:.0f} s, "
                           f"{r['rate_plain_per_s']:.1f}/s"),
             "ratio": r["ratio"], "target": ">= 0.95x",
             "met": r["all_complete"] and r["ratio"] >= 0.95},
            {"figure": f"events of that run at the sinks ({got['recorded']:,} recorded)",
             "measured": (f"webhook {got['webhook']:,}"
                          + (f", Redis {got['redis']:,}" if got["redis"] is not None else "")
                          + f"; all in {got['drain_seconds']:.1f} s after the last task"),
             "target": "every task's events, HMAC valid", "met": delivered}]
    return rows, r


def summary_lines(r: dict) -> list[str]:
    got = r["sinks"]["sinks"]
    return [(f"{r['tasks']} tasks QUEUED->COMPLETE on Slurm: without sinks "
             f"{r['plain']['seconds']:.1f}s ({r['rate_plain_per_s']:.1f}/s), with sinks "
             f"{r['sinks']['seconds']:.1f}s ({r['rate_sinks_per_s']:.1f}/s), ratio "
             f"{r['ratio']:.3f}; all COMPLETE: {r['all_complete']}"),
            (f"  events recorded {got['recorded']}, at the webhook {got['webhook']} (every "
             f"task's: {got['every_task_complete_at_webhook']}, bad signatures "
             f"{got['bad_signatures']}), at Redis {got['redis']}; drained "
             f"{got['drain_seconds']:.1f}s after the last task ended")]



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000)
    args = parser.parse_args()
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
    tmp = Path(tempfile.mkdtemp(prefix="funnel-throughput-sinks-", dir="/var/tmp"))
    try:
        result = sinks_measure(args.tasks, tmp, DatabaseFactory(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n".join(summary_lines(result)))
    save(result)


if __name__ == "__main__":
    main()
