"""CPU of ONE Slurm poll at N jobs in flight: squeue (CLI mode) vs slurmrestd (REST mode).

Run: .venv/bin/python benchmarks/slurm_rest_poll.py [--arrays 10] [--size 1000] [--polls 5]
     [--plain 0]

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
Needs scripts/setup/30-slurm.sh and 35-slurmrestd.sh (the shared daemon on its socket).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from funnel_hpc.backends.base import JobState, JobStatus  # noqa: E402
from funnel_hpc.backends.slurm import exit_code, map_state  # noqa: E402
from funnel_hpc.backends.slurm_rest import SlurmRestClient  # noqa: E402
from funnel_hpc.backends.slurm_rest_http import RestTransport, default_user  # noqa: E402

SOCKET = "/run/slurmrestd/slurmrestd.socket"
PID_FILE = "/run/slurmrestd/slurmrestd.pid"
SQUEUE = ["squeue", "-h", "--me", "-t", "all", "-r", "-O",
          "JobArrayID:|,State:|,exit_code:|,Reason:"]
NAME = "funnel-bench-rest-poll"


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arrays", type=int, default=10)
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--plain", type=int, default=0)
    parser.add_argument("--polls", type=int, default=5)
    args = parser.parse_args()
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
