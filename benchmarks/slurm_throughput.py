"""Drive N trivial tasks from QUEUED to COMPLETE on Slurm, beside a raw sbatch loop.

Run: .venv/bin/python benchmarks/slurm_throughput.py [--tasks 1000 10000]
                                                        [--payloads [container] [worker]]

For each N, in one run, both sides in three timed phases: submit every job held
(`--begin=now+1hour`, so submission has the CPU to itself), release them all
(`scontrol update JobId=... StartTime=now`), wait until all have ended.
- raw: a loop of N `sbatch` calls of a script running either the same container call
  the worker makes for a trivial task (`bwrap` over the busybox rootfs, `true`: payload
  "container", what Slurm alone costs) or the same worker command line the gateway
  submits, each on its own task file (payload "worker": what the gateway alone adds);
- gateway: N tasks created over HTTP first (8 threads; not timed), then a reconciler
  (`funnel reconcile`'s loop, in this process, so its CPU and commands can be counted)
  submits them one job per task (`array_max: 1`; `reconciler.submit_threads` sbatch at
  once; benchmarks/slurm_arrays.py measures arrays), is timed for three ticks with
  all N jobs in flight (CPU seconds, scheduler commands apart from sbatch), and follows
  them to COMPLETE, beside a `funnel server run --no-reconciler` process serving the API.
  Every Slurm job runs the real worker.
Reported: submission rates, total times, ticks, peak RSS of the API server and of the
reconciler process, and their CPU seconds per task.

benchmarks/slurm_sinks.py runs the gateway side with event sinks on against it without.

Jobs go to the partition `bench` (scripts/setup/30-slurm.sh: 64 trivial jobs may share
each core, as they would spread over a wider cluster). Needs that single-node Slurm and
the worker tools of scripts/setup/40-worker.sh.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.machine import machine_facts  # noqa: E402
from funnel_hpc.backends.slurm import SlurmBackend  # noqa: E402
from funnel_hpc.core import config as config_mod  # noqa: E402
from funnel_hpc.gateway.reconcile.reconciler import Reconciler, worker_command, write_worker_config  # noqa: E402
from funnel_hpc.gateway.web.app import make_service  # noqa: E402
from tests.server_helpers import DatabaseFactory, ServerProcess, worker_image_config  # noqa: E402

if TYPE_CHECKING:
    from benchmarks.sink_endpoints import SinkEndpoints

PARTITION = "bench"
ROOTFS = "/var/lib/funnel/rootfs/busybox"
HOLD = "now+1hour"
TRIVIAL = {"executors": [{"image": "busybox", "command": ["true"]}],
           "resources": {"backend_parameters": {"begin": HOLD}}}
TERMINAL = {"COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR", "CANCELED"}
TICK_SECONDS = 2.0


def peak_rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def jobs_left(name: str, tries: int = 10) -> int:
    """The jobs of that name squeue lists as not ended, an array's elements each one
    (``-r``); a failed squeue (slurmctld busy or restarting) is asked again, a second
    apart, up to `tries` times."""
    argv = ["squeue", "-h", "-r", "-n", name, "-t", "PD,R,CG,CF", "-o", "%i"]
    for _ in range(tries - 1):
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode == 0:
            return len(done.stdout.split())
        time.sleep(1.0)
    return len(subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split())


def release(job_ids: list[str]) -> None:
    """Let held (--begin) jobs start now, a thousand per scontrol call (an array's
    elements by their array job's id)."""
    job_ids = sorted({j.split("_")[0] for j in job_ids})
    for i in range(0, len(job_ids), 1000):
        subprocess.run(["scontrol", "update", "JobId=" + ",".join(job_ids[i:i + 1000]),
                        "StartTime=now"], check=True, capture_output=True)


LAUNCH_FAILED = "launch failed requeued held"


def start_waiting_again() -> int:
    """Start the jobs of partition `bench` that wait again after the run released them:
    those slurmctld held after slurmd could not confirm their launch (it happens on 2
    cores under a hundred jobs at once), released, and those waiting for their
    `--begin` again (a requeued job, or the gateway's next attempt of a task whose job
    was held so). Left alone, a run would wait for them for an hour or forever. The same
    for the gateway and the raw references; how many, each run says."""
    out = subprocess.run(["squeue", "-h", "-r", "-p", PARTITION, "-t", "PD", "-o", "%i|%r"],
                         capture_output=True, text=True, check=False).stdout
    held, waiting = [], []
    for line in out.splitlines():
        job_id, _, reason = line.partition("|")
        if reason.strip() == LAUNCH_FAILED:
            held.append(job_id)
        elif reason.strip() == "BeginTime":
            waiting.append(job_id)
    for job_id in held:
        subprocess.run(["scontrol", "release", job_id], check=False, capture_output=True)
    for job_id in held + waiting:  # a requeued job gets its --begin again: started now
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"],
                       check=False, capture_output=True)
    return len(held) + len(waiting)


def bare_container_command() -> str:
    """The container call the worker makes for a trivial task, without the worker."""
    bwrap = shutil.which("bwrap") or "bwrap"
    return (f"exec {bwrap} --die-with-parent --new-session --unshare-pid --unshare-ipc "
            f"--unshare-uts --hostname funnel-task --bind {ROOTFS} / --dev /dev "
            f"--proc /proc --tmpfs /tmp --clearenv --setenv PATH /bin -- true")


def same_worker_commands(n: int, work: Path) -> list[str]:
    """N task files and, for each, the worker command line the reconciler would submit
    (worker.command, --task-file, --workdir, --config): the gateway's jobs, minus the
    gateway."""
    config = config_mod.load(environ={}, overrides={
        "work_dir": str(work), "worker": {"container_driver": "bwrap", **worker_image_config()}})
    worker_config = write_worker_config(config)
    commands = []
    for i in range(n):
        task_dir = work / f"raw{i:05d}"
        task_dir.mkdir(parents=True, exist_ok=True)
        (task_dir / "task.json").write_text(json.dumps({**TRIVIAL, "id": f"raw{i:05d}"}))
        argv = [*worker_command(config), "--task-file", str(task_dir / "task.json"),
                "--workdir", str(work), "--config", str(worker_config)]
        commands.append("exec " + shlex.join(argv))
    return commands


def raw_loop(n: int, work: Path, payload: str = "container") -> dict:
    """N held sbatch calls, released; until all ended. payload "container": each job runs
    the bare container call; "worker": each runs the worker on its own task file."""
    work.mkdir(parents=True, exist_ok=True)
    name = f"raw{payload}{n}"
    commands = (same_worker_commands(n, work) if payload == "worker"
                else [bare_container_command()] * n)
    header = (f"#!/bin/sh\n#SBATCH --job-name={name}\n#SBATCH --partition={PARTITION}\n"
              f"#SBATCH --output=/dev/null\n#SBATCH --begin={HOLD}\n")
    start = time.perf_counter()
    job_ids = [subprocess.run(["sbatch", "--parsable"], input=header + command + "\n",
                              text=True, check=True, capture_output=True,
                              cwd=work).stdout.strip().split(";")[0]
               for command in commands]
    submitted = time.perf_counter() - start
    release(job_ids)
    relaunched = 0
    while jobs_left(name):
        relaunched += start_waiting_again()
        time.sleep(0.5)
    return {"payload": payload, "seconds": time.perf_counter() - start,
            "submit_seconds": submitted, "submit_rate_per_s": n / submitted,
            "released_after_launch_failure": relaunched}


def create_tasks(api: str, n: int) -> list[str]:
    def make(count: int) -> list[str]:
        session = requests.Session()
        return [session.post(api + "/tasks", json=TRIVIAL, timeout=60).json()["id"]
                for _ in range(count)]

    per = [n // 8 + (1 if i < n % 8 else 0) for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return [task_id for ids in pool.map(make, per) for task_id in ids]


@dataclass
class HeldGateway:
    """A server process with N tasks created over its HTTP API, and over the same
    database an in-process reconciler (ticked by the caller, never started) on Slurm
    partition `bench`: what the Slurm benchmarks measure."""

    server: ServerProcess
    service: Any
    backend: SlurmBackend
    reconciler: Reconciler


@contextmanager
def held_gateway(n: int, work: Path, db_url: str, slurm: dict | None = None,
                 per_tick: int = 1000, events: dict | None = None) -> Iterator[HeldGateway]:
    """slurm: more backend.slurm keys (array_max, mode); per_tick: submit_per_tick;
    events: the server's events section. The reconciler is stopped, the backend closed
    and the server stopped on the way out; jobs are the caller's to cancel."""
    overrides: dict = {"backend": {"name": "slurm",
                                   "slurm": {"partition": PARTITION, **(slurm or {})}},
                       "worker": {"container_driver": "bwrap", **worker_image_config()},
                       # a job Slurm held after its launch failed is canceled and runs
                       # again (retry_on node_fail), as at a site that sets max_attempts
                       "reconciler": {"interval_seconds": TICK_SECONDS, "max_attempts": 3,
                                      "submit_per_tick": per_tick, "pass_server_url": False}}
    if events is not None:
        overrides["events"] = events
    server = ServerProcess(work, db_url, overrides=overrides, reconcile=False).start()
    try:
        create_tasks(server.api, n)
        config = config_mod.load(environ={}, overrides={
            **overrides, "work_dir": str(work), "database": {"url": db_url},
            "server": {"http_port": server.port}})
        service = make_service(config)
        backend = SlurmBackend(config.backend.slurm, Path(config.work_dir))
        reconciler = Reconciler(service, backend, config)
        try:
            yield HeldGateway(server, service, backend, reconciler)
        finally:
            reconciler.stop()
            backend.close()
    finally:
        server.stop()


def gateway_run(n: int, work: Path, db_url: str, sinks: SinkEndpoints | None = None,
                slurm: dict | None = None) -> dict:
    """The gateway side (module docstring); with ``sinks``, its server publishes every
    event to them, and the run waits for them to have all before it stops the server.
    slurm: more backend.slurm keys (benchmarks/slurm_arrays.py: array_max)."""
    with held_gateway(n, work, db_url, slurm,
                      events=sinks.events_config() if sinks is not None else None) as gateway:
        service, backend, reconciler = gateway.service, gateway.backend, gateway.reconciler
        ticks: list[dict] = []

        def tick() -> dict:
            calls, cpu, wall = backend.runner.calls, time.process_time(), time.perf_counter()
            stats = reconciler.tick()
            ticks.append({"in_flight": stats.polled, "submitted": stats.submitted,
                          # sbatch (one a job, or one an array) and squeue commands
                          "commands": backend.runner.calls - calls,
                          "cpu_s": time.process_time() - cpu,
                          "wall_s": time.perf_counter() - wall})
            return ticks[-1]

        start = time.perf_counter()
        submitted = 0
        while submitted < n:
            submitted += tick()["submitted"]
        submit_seconds = time.perf_counter() - start
        in_flight = [tick() for _ in range(3)]  # every job held: all n in flight
        release([row.job_id for row in service.reconciler_queries.active_rows()])
        relaunched = 0
        progress = []  # (seconds since the start, tasks ended): where a run's time went
        while True:
            tick_start = time.perf_counter()
            relaunched += start_waiting_again()
            tick()
            counts = service.state_counts()
            ended = sum(counts.get(s, 0) for s in TERMINAL)
            progress.append((round(time.perf_counter() - start, 1), ended))
            if ended >= n:
                break
            time.sleep(max(0.0, TICK_SECONDS - (time.perf_counter() - tick_start)))
        elapsed = time.perf_counter() - start
        reconciler.stop()
        delivered = sinks.wait_delivered(service.engine) if sinks is not None else None
        server_rss = peak_rss_mb(gateway.server.proc.pid)
        server_cpu = cpu_seconds(gateway.server.proc.pid)
        reconciler_cpu = time.process_time()
    return {"seconds": elapsed, "submit_seconds": submit_seconds,
            "submit_rate_per_s": n / submit_seconds, "states": counts, "ticks": len(ticks),
            "in_flight_ticks": in_flight,
            "tick_cpu_s_median": statistics.median(t["cpu_s"] for t in in_flight),
            "scheduler_calls_per_tick": sorted({t["commands"] for t in in_flight}),
            # the ticks that submitted nothing: their commands are the poll's
            "scheduler_calls_per_tick_all": sorted({t["commands"] for t in ticks
                                                    if not t["submitted"]}),
            "server_peak_rss_mb": server_rss,
            "server_cpu_s_per_task": server_cpu / n,
            "reconciler_cpu_s_per_task": reconciler_cpu / n,
            "reconciler_peak_rss_mb": peak_rss_mb(), "sinks": delivered,
            "released_after_launch_failure": relaunched, "progress": progress}


def raw_loops(n: int, tmp: Path, payloads: tuple[str, ...]) -> dict[str, dict]:
    """A raw sbatch loop of N jobs for each payload (raw_loop), one after the other."""
    return {payload: raw_loop(n, tmp / f"raw-{payload}{n}", payload) for payload in payloads}


def raw_line(n: int, payload: str, raw: dict) -> str:
    return (f"raw sbatch loop of {n} jobs ({payload}): {raw['seconds']:.0f}s "
            f"({n / raw['seconds']:.1f}/s), submission {raw['submit_rate_per_s']:.0f}/s")


def measure(n: int, tmp: Path, dbs: DatabaseFactory,
            payloads: tuple[str, ...] = ("worker",)) -> dict:
    """The gateway's run of N tasks one job each (`array_max: 1`, as the raw loop's; the
    default groups them into arrays, which benchmarks/slurm_arrays.py measures), after a
    raw sbatch loop of N jobs for each payload (raw_loops; none: the gateway alone)."""
    raws = raw_loops(n, tmp, payloads)
    gateway = gateway_run(n, tmp / f"gw{n}", dbs.new("sqlite"), slurm={"array_max": 1})
    return {"tasks": n, "raw": raws, "gateway": gateway,
            "rate_per_s": n / gateway["seconds"],
            "all_complete": gateway["states"].get("COMPLETE", 0) == n}


def summary_lines(r: dict) -> list[str]:
    g = r["gateway"]
    lines = [(f"{r['tasks']} tasks QUEUED->COMPLETE on Slurm: gateway {g['seconds']:.0f}s "
              f"({r['rate_per_s']:.1f}/s), submission {g['submit_rate_per_s']:.0f}/s; "
              f"states {g['states']}")]
    lines += ["  " + raw_line(r["tasks"], payload, raw) for payload, raw in r["raw"].items()]
    lines.append(f"  reconciler with {r['tasks']} jobs in flight: CPU "
                 f"{g['tick_cpu_s_median']:.3f}s/tick; scheduler calls/tick "
                 f"{g['scheduler_calls_per_tick']}; peak RSS server "
                 f"{g['server_peak_rss_mb']:.0f} MB, reconciler "
                 f"{g['reconciler_peak_rss_mb']:.0f} MB")
    return lines


def save(result: dict) -> None:
    """Into benchmarks/results/throughput-<time>.json, with the machine's facts."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = REPO / "benchmarks" / "results" / f"throughput-{stamp}.json"
    path.write_text(json.dumps({"machine": machine_facts(), **result}, indent=1, default=str))
    print(f"written to {path.relative_to(REPO)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[1000])
    parser.add_argument("--payloads", choices=["container", "worker"], nargs="*",
                        default=["worker"], help="raw loops to run first (see raw_loop)")
    parser.add_argument("--raw-only", action="store_true",
                        help="only the raw loops (e.g. to check the suite's 10,000-task reference)")
    args = parser.parse_args()
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
    tmp = Path(tempfile.mkdtemp(prefix="funnel-throughput-", dir="/var/tmp"))
    dbs = DatabaseFactory(tmp)
    for n in args.tasks:
        if args.raw_only:
            raws = raw_loops(n, tmp, tuple(args.payloads))
            print("\n".join(raw_line(n, payload, raw) for payload, raw in raws.items()))
            save({"tasks": n, "raw": raws})
            continue
        result = measure(n, tmp, dbs, tuple(args.payloads))
        print("\n".join(summary_lines(result)))
        save(result)


if __name__ == "__main__":
    main()
