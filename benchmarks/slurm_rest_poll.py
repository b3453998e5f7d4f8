"""CPU of ONE Slurm poll at N jobs in flight: squeue (CLI mode) vs slurmrestd (REST mode);
and of one RECONCILER tick at N tasks in flight in each mode (issue #29).

Run: .venv/bin/python benchmarks/slurm_rest_poll.py [--arrays 10] [--size 1000] [--polls 5]
     [--plain 0] [--ticks N_TASKS]

1. make N = arrays x size held jobs quickly: raw `sbatch --hold --array=0-<size-1>` on the
   `bench` partition (and --plain more held jobs, one sbatch each: slurmrestd lists a
   plain job as one record, a pending array range as one record for all its elements);
2. poll them all `--polls` times each way, alternating, and keep the median of:
   - CLI: `squeue -h --me -t all -r -O JobArrayID:|,State:|,exit_code:|,Reason:` and its
     parse into statuses (map_state, code:signal), as SlurmBackend.poll reads it;
   - REST: SlurmRestClient.jobs() (one GET, array ranges expanded) and the same mapping;
   CPU is this process + its children (resource.getrusage); slurmrestd's and slurmctld's
   own CPU over the same calls is read from /proc and reported beside it;
3. cancel every job made, always.

--ticks N (suite_rows: 10,000, quick 1,000): the reconciler's tick, as
benchmarks/slurm_throughput.py's gateway_run measures it, in mode cli then rest in the
same run: N held tasks (`begin: now+1hour`) created over HTTP on a server of that mode,
submitted by an in-process Reconciler over SQLite with arrays (array_max 1000: N/1000
sbatch or POST), then TICKS ticks with all N in flight; the median tick's CPU is this
process + its children (getrusage: the squeue a CLI tick runs is a child), with the forks,
slurmrestd requests, and slurmrestd's and slurmctld's own CPU per tick beside it. Every
job is canceled after each mode, always.
Needs scripts/setup/30-slurm.sh and 35-slurmrestd.sh (the shared daemon on its socket).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import slurm_throughput as throughput  # noqa: E402
from funnel_hpc.backends.base import JobState, JobStatus  # noqa: E402
from funnel_hpc.backends.slurm import (  # noqa: E402
    SlurmBackend,
    exit_code,
    map_state,
)
from funnel_hpc.backends.slurm_rest import SlurmRestClient  # noqa: E402
from funnel_hpc.backends.slurm_rest_http import RestTransport, default_user  # noqa: E402
from tests.server_helpers import DatabaseFactory  # noqa: E402

SOCKET = "/run/slurmrestd/slurmrestd.socket"
PID_FILE = "/run/slurmrestd/slurmrestd.pid"
SQUEUE = ["squeue", "-h", "--me", "-t", "all", "-r", "-O",
          "JobArrayID:|,State:|,exit_code:|,Reason:"]
NAME = "funnel-bench-rest-poll"
MODES = ("cli", "rest")
# in-flight ticks measured per mode: a tick that runs a full garbage collection of the
# gateway's heap costs ~150 ms more (measured), so a few ticks' median depends on where
# those fell: enough ticks for the median and mean to carry them
TICKS = 11
ARRAY_MAX = 1000
TARGET_TICK = 1.0   # REST mode's tick CPU <= CLI mode's (issue #29)


def own_cpu() -> float:
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def daemon_cpu(pid: int | None) -> float:
    """utime + stime of a daemon, in seconds (0 when it cannot be read)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pid_of(name: str) -> int | None:
    done = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True)
    pids = done.stdout.split()
    return int(pids[0]) if pids else None


def cli_poll() -> dict[str, JobStatus]:
    done = subprocess.run(SQUEUE, capture_output=True, text=True, check=True)
    found = {}
    for line in done.stdout.splitlines():
        parts = [part.strip() for part in line.split("|", 3)]
        if len(parts) == 4:
            job_id, state, code, reason = parts
            found[job_id] = JobStatus(map_state(state, reason), f"squeue: {state} "
                                      f"exit={exit_code(code)} reason={reason}")
    return found


def rest_poll(client: SlurmRestClient) -> dict[str, JobStatus]:
    return {row.job_id: JobStatus(map_state(row.state, row.reason), f"slurmrestd: {row.state} "
                                  f"exit={row.exit_code} reason={row.reason}")
            for row in client.jobs()}


def measured(poll: Callable[[], dict[str, JobStatus]], daemons: dict[str, int | None]) -> dict:
    before = {name: daemon_cpu(pid) for name, pid in daemons.items()}
    cpu, wall = own_cpu(), time.perf_counter()
    statuses = poll()
    point = {"cpu_ms": 1000 * (own_cpu() - cpu), "wall_ms": 1000 * (time.perf_counter() - wall),
             "jobs_seen": len(statuses),
             "pending": sum(s.state is JobState.PENDING for s in statuses.values())}
    for name, pid in daemons.items():
        point[f"{name}_cpu_ms"] = 1000 * (daemon_cpu(pid) - before[name])
    return point


def submit(argv: list[str]) -> str:
    done = subprocess.run(["sbatch", "--parsable", "--hold", "-p", "bench", "-J", NAME,
                           "-o", "/dev/null", "-e", "/dev/null", *argv, "--wrap", "true"],
                          capture_output=True, text=True, check=True)
    return done.stdout.strip().split(";")[0]


def measure(arrays: int, size: int, plain: int, polls: int) -> dict:
    client = SlurmRestClient(RestTransport(socket_path=SOCKET, timeout=300), default_user())
    pid_text = Path(PID_FILE).read_text().strip() if Path(PID_FILE).exists() else ""
    daemons = {"slurmrestd": int(pid_text) if pid_text.isdigit() else None,
               "slurmctld": pid_of("slurmctld")}
    made: list[str] = []
    try:
        start = time.perf_counter()
        made += [submit([f"--array=0-{size - 1}"]) for _ in range(arrays)]
        made += [submit([]) for _ in range(plain)]
        submit_s = time.perf_counter() - start
        ours = {f"{job}_{index}" for job in made[:arrays] for index in range(size)}
        ours |= set(made[arrays:])
        client.discover()
        cli_poll(), rest_poll(client)  # warm-up: page cache, the kept connection
        runs: dict[str, list[dict]] = {"cli": [], "rest": []}
        for _ in range(polls):
            runs["cli"].append(measured(cli_poll, daemons))
            runs["rest"].append(measured(lambda: rest_poll(client), daemons))
        seen = {kind: ours <= set(poll()) for kind, poll in
                (("cli", cli_poll), ("rest", lambda: rest_poll(client)))}
    finally:
        for first in range(0, len(made), 200):
            subprocess.run(["scancel", *made[first:first + 200]], check=False)
        client.close()
    median = {kind: {key: statistics.median(point[key] for point in points)
                     for key in points[0]} for kind, points in runs.items()}
    return {"jobs": len(ours), "arrays": arrays, "array_size": size, "plain_jobs": plain,
            "polls": polls, "submit_s": round(submit_s, 2), "every_job_seen": seen,
            "median": median, "runs": runs,
            "rest_over_cli_cpu": median["rest"]["cpu_ms"] / median["cli"]["cpu_ms"]}


def scheduler_calls(backend: SlurmBackend) -> tuple[int, int]:
    """(processes run, slurmrestd requests sent) so far."""
    rest = getattr(backend.link, "rest", None)
    return backend.runner.calls, (rest.calls if rest is not None else 0)


def cancel_jobs(job_ids: list[str]) -> None:
    bases = sorted({j.split("_")[0] for j in job_ids if j})
    for first in range(0, len(bases), 500):
        subprocess.run(["scancel", *bases[first:first + 500]], check=False,
                       capture_output=True)


def reconciler_ticks(mode: str, n: int, ticks: int, work: Path, db_url: str,
                     daemons: dict[str, int | None]) -> dict:
    """N held tasks submitted with arrays by an in-process reconciler in `mode`, then
    `ticks` ticks with all N in flight (module docstring)."""
    with throughput.held_gateway(n, work, db_url, {"mode": mode, "array_max": ARRAY_MAX}) \
            as gateway:
        service, backend, reconciler = gateway.service, gateway.backend, gateway.reconciler
        try:
            start, submitted, calls = time.perf_counter(), 0, scheduler_calls(backend)
            while submitted < n:
                submitted += reconciler.tick().submitted
            submit_s = time.perf_counter() - start
            submit_calls = [b - a for a, b in zip(calls, scheduler_calls(backend), strict=True)]
            reconciler.tick()  # warm: the first in-flight tick reads what submission left
            gc.collect()  # both modes start their measured ticks from a collected heap
            points = []
            for _ in range(ticks):
                before = {name: daemon_cpu(pid) for name, pid in daemons.items()}
                full_gcs = gc.get_stats()[2]["collections"]
                calls, cpu, wall = scheduler_calls(backend), own_cpu(), time.perf_counter()
                stats = reconciler.tick()
                after = scheduler_calls(backend)
                point = {"cpu_ms": 1000 * (own_cpu() - cpu),
                         "wall_ms": 1000 * (time.perf_counter() - wall),
                         "in_flight": stats.polled, "forks": after[0] - calls[0],
                         "requests": after[1] - calls[1],
                         "full_gcs": gc.get_stats()[2]["collections"] - full_gcs}
                for name, pid in daemons.items():
                    point[f"{name}_cpu_ms"] = 1000 * (daemon_cpu(pid) - before[name])
                points.append(point)
            reconciler.stop()
        finally:
            cancel_jobs([row.job_id for row in service.reconciler_queries.active_rows()])
    median = {key: statistics.median(point[key] for point in points) for key in points[0]}
    mean = {key: statistics.fmean(point[key] for point in points) for key in points[0]}
    return {"mode": mode, "tasks": n, "submit_s": round(submit_s, 2),
            "submit_calls": submit_calls, "median": median, "mean": mean, "ticks": points}


def measure_ticks(n: int, ticks: int = TICKS) -> dict:
    """reconciler_ticks in both modes, same run, each on its own SQLite database."""
    pid_text = Path(PID_FILE).read_text().strip() if Path(PID_FILE).exists() else ""
    daemons = {"slurmrestd": int(pid_text) if pid_text.isdigit() else None,
               "slurmctld": pid_of("slurmctld")}
    runs = {}
    with tempfile.TemporaryDirectory(prefix="funnel-rest-ticks-") as scratch:
        (Path(scratch) / "db").mkdir()
        databases = DatabaseFactory(Path(scratch) / "db")
        try:
            for mode in MODES:
                runs[mode] = reconciler_ticks(mode, n, ticks, Path(scratch) / mode,
                                              databases.new("sqlite"), daemons)
        finally:
            databases.drop_all()
    cli, rest = runs["cli"]["median"], runs["rest"]["median"]
    return {"tasks": n, "ticks": ticks, "runs": runs,
            "rest_over_cli_tick_cpu": rest["cpu_ms"] / cli["cpu_ms"] if cli["cpu_ms"] else None,
            "rest_over_cli_mean_cpu": runs["rest"]["mean"]["cpu_ms"] / runs["cli"]["mean"]["cpu_ms"]
            if runs["cli"]["mean"]["cpu_ms"] else None}


def suite_rows(quick: bool) -> tuple[list[dict], dict]:
    """benchmarks/suite.py's `rest` rows (the reconciler's tick in both modes) and the raw
    figures."""
    return suite_rows_of(1000 if quick else 10_000)


def suite_rows_of(n: int) -> tuple[list[dict], dict]:
    r = measure_ticks(n)
    cli, rest = r["runs"]["cli"]["median"], r["runs"]["rest"]["median"]
    ratio = r["rest_over_cli_tick_cpu"]
    row = {"figure": f"Slurm REST mode: reconciler tick CPU at {r['tasks']:,} held tasks in "
                     "flight (arrays), process + children",
           "measured": f"REST median {rest['cpu_ms']:.0f} ms, mean "
                       f"{r['runs']['rest']['mean']['cpu_ms']:.0f} ms ({rest['forks']:.0f} forks,"
                       f" {rest['requests']:.0f} request; slurmrestd "
                       f"{rest['slurmrestd_cpu_ms']:.0f} ms, slurmctld "
                       f"{rest['slurmctld_cpu_ms']:.0f} ms)",
           "reference": f"CLI median {cli['cpu_ms']:.0f} ms, mean "
                        f"{r['runs']['cli']['mean']['cpu_ms']:.0f} ms ({cli['forks']:.0f} fork; "
                        f"slurmctld {cli['slurmctld_cpu_ms']:.0f} ms)",
           "ratio": ratio, "target": f"<= {TARGET_TICK}x",
           "met": ratio is not None and ratio <= TARGET_TICK
           and rest["in_flight"] == cli["in_flight"] == r["tasks"]}
    return [row], r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arrays", type=int, default=10)
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--plain", type=int, default=0)
    parser.add_argument("--polls", type=int, default=5)
    parser.add_argument("--ticks", type=int, default=0, metavar="N_TASKS",
                        help="measure the reconciler's tick at N_TASKS in flight instead")
    args = parser.parse_args()
    if args.ticks:
        rows, raw = suite_rows_of(args.ticks)
        out = REPO / "benchmarks" / "results" / f"slurm-rest-ticks-{int(time.time())}.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(raw, indent=2))
        print(json.dumps(rows, indent=2), f"\nwritten to {out.relative_to(REPO)}")
        return
    result = measure(args.arrays, args.size, args.plain, args.polls)
    cli, rest = result["median"]["cli"], result["median"]["rest"]
    out = REPO / "benchmarks" / "results" / f"slurm-rest-poll-{int(time.time())}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"one poll at {result['jobs']:,} held jobs ({args.arrays} arrays x {args.size}"
          f" + {args.plain} plain): CLI {cli['cpu_ms']:.0f} ms CPU ({cli['wall_ms']:.0f} ms"
          f" wall, slurmctld {cli['slurmctld_cpu_ms']:.0f} ms), REST {rest['cpu_ms']:.0f} ms"
          f" CPU ({rest['wall_ms']:.0f} ms wall, slurmrestd {rest['slurmrestd_cpu_ms']:.0f} ms,"
          f" slurmctld {rest['slurmctld_cpu_ms']:.0f} ms): REST/CLI "
          f"{result['rest_over_cli_cpu']:.2f}; every job seen {result['every_job_seen']};"
          f" written to {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
