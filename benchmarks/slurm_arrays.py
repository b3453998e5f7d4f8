"""Job arrays on real Slurm: submission, controller RPCs, QUEUED -> COMPLETE (issue #29).

Run: .venv/bin/python benchmarks/slurm_arrays.py [--tasks 10000] [--rpc-tasks 1000]
                                                 [--skip-complete]

Three measurements, each with its reference taken in the same run:

1. Submission of N tasks, jobs held (`begin: now+1hour`). Gateway: N tasks created over
   HTTP first (not timed), then the reconciler (in this process, `backend.slurm.array_max`
   1000, `reconciler.submit_per_tick` N: what a site expecting bursts of N sets) ticks
   until every task has its element id: reading, claiming, writing each task's files,
   one `sbatch --array` per 1,000 tasks, recording; against the raw array below, 3
   rounds in turn, the median round's ratio (the loop is held against that round's
   gateway). Context: the same with
   `submit_per_tick` 1000, ticks back to back, each polling the jobs of the ticks
   before (squeue of up to N-1000 jobs), as the raw references do not. References
   on the same worker command: a raw loop of one `sbatch` per job (its rate on a sample,
   each job's task file written as it goes) and a raw `sbatch --array` (the N task files
   and the task list written, then one `sbatch --array` per 1,000).
2. Controller work: slurmctld's RPC counts (`sdiag`, by message type, less its own
   REQUEST_STATS_INFO) over submitting 1,000 held tasks and 5 reconciler ticks with them
   in flight, with arrays against `array_max: 1` (one job per task, as before).
3. N trivial tasks QUEUED -> COMPLETE with arrays (benchmarks/slurm_throughput.py's
   gateway run with array_max 1000) against a raw `sbatch --array` of the same worker
   jobs (held, released, waited for).
Everything runs on partition `bench` of scripts/setup/30-slurm.sh; every job is canceled
at the end of each part.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import slurm_throughput as throughput  # noqa: E402
from benchmarks.machine import machine_facts  # noqa: E402
from funnel_hpc.core import config as config_mod  # noqa: E402
from funnel_hpc.gateway.reconcile.reconciler import worker_command, write_worker_config  # noqa: E402
from tests.server_helpers import DatabaseFactory, worker_image_config  # noqa: E402

ARRAY_MAX = 1000
PARTITION = throughput.PARTITION
HOLD = throughput.HOLD
RPC_LINE = re.compile(r"\s*([A-Z_]+)\s+\(\s*\d+\)\s+count:(\d+)")
TARGET_LOOP = 10.0       # submission with arrays >= 10x the one-sbatch-per-job loop
TARGET_RAW_ARRAY = 0.8   # ... and >= 0.8x a raw sbatch --array of the same worker command
TARGET_RPCS = 1 / 20     # controller RPCs with arrays <= 1/20 of one job per task
TARGET_COMPLETE = 0.8    # QUEUED -> COMPLETE rate >= 0.8x the raw array's
ROUNDS = 3               # submission: gateway and raw array in turn, the median round's ratio


def sbatch(script: str, cwd: Path) -> str:
    out = subprocess.run(["sbatch", "--parsable"], input=script, text=True, check=True,
                         capture_output=True, cwd=cwd).stdout
    return out.strip().split(";")[0]


def cancel_named(name: str) -> None:
    subprocess.run(["scancel", "-n", name], check=False, capture_output=True)


def cancel_ids(job_ids: list[str]) -> None:
    bases = sorted({j.split("_")[0] for j in job_ids})
    for i in range(0, len(bases), 500):
        subprocess.run(["scancel", *bases[i:i + 500]], check=False, capture_output=True)


def worker_setup(work: Path) -> tuple[list[str], Path]:
    """The worker command line the reconciler submits, and its config file."""
    config = config_mod.load(environ={}, overrides={
        "work_dir": str(work), "worker": {"container_driver": "bwrap", **worker_image_config()}})
    return worker_command(config), write_worker_config(config)


def write_task(work: Path, task_id: str) -> Path:
    task_dir = work / task_id
    task_dir.mkdir(parents=True, exist_ok=True)
    (task_dir / "task.json").write_text(json.dumps({**throughput.TRIVIAL, "id": task_id}))
    return task_dir


def header(name: str, extra: str = "") -> str:
    return (f"#!/bin/sh\n#SBATCH --job-name={name}\n#SBATCH --partition={PARTITION}\n"
            f"#SBATCH --output=/dev/null\n#SBATCH --begin={HOLD}\n{extra}")


def raw_loop_submission(sample: int, work: Path) -> dict:
    """One held sbatch per job, each job's task file written as it goes."""
    command, config = worker_setup(work)
    name = f"rawloop{sample}"
    start = time.perf_counter()
    ids = []
    for i in range(sample):
        task_dir = write_task(work, f"loop{i:05d}")
        argv = [*command, "--task-file", str(task_dir / "task.json"), "--workdir", str(work),
                "--config", str(config)]
        ids.append(sbatch(header(name) + "exec " + shlex.join(argv) + "\n", work))
    seconds = time.perf_counter() - start
    cancel_named(name)
    return {"jobs": sample, "seconds": seconds, "rate_per_s": sample / seconds}


def array_script(name: str, size: int, task_list: Path, work: Path, command: list[str],
                 config: Path) -> str:
    """What a hand-written array of the same worker jobs looks like: element i runs the
    worker on the task of line i of the list."""
    return header(name, f"#SBATCH --array=0-{size - 1}\n") + (
        f"id=$(sed -n \"$((SLURM_ARRAY_TASK_ID + 1))p\" {shlex.quote(str(task_list))})\n"
        f"exec {shlex.join(command)} --task-file {shlex.quote(str(work))}/\"$id\"/task.json "
        f"--workdir {shlex.quote(str(work))} --config {shlex.quote(str(config))}\n")


def raw_array_submit(n: int, work: Path, name: str) -> tuple[list[str], float]:
    """N task files, the task lists and one held sbatch --array per ARRAY_MAX: (array job
    ids, seconds)."""
    command, config = worker_setup(work)
    os.sync()  # neither side pays for the other's writes (nor the task creation's)
    start = time.perf_counter()
    ids = []
    for first in range(0, n, ARRAY_MAX):
        size = min(ARRAY_MAX, n - first)
        task_ids = [f"arr{i:05d}" for i in range(first, first + size)]
        for task_id in task_ids:
            write_task(work, task_id)
        task_list = work / f"list{first}"
        task_list.write_text("".join(f"{t}\n" for t in task_ids))
        ids.append(sbatch(array_script(name, size, task_list, work, command, config), work))
    return ids, time.perf_counter() - start


def gateway_held(n: int, work: Path, db_url: str, array_max: int, ticks: int = 5,
                 sdiag: bool = False, per_tick: int = ARRAY_MAX) -> dict:
    """N held tasks submitted by an in-process reconciler (ticks back to back), then
    `ticks` ticks with all in flight; everything canceled. With sdiag, slurmctld's RPC
    counts over the submission and those ticks."""
    with throughput.held_gateway(n, work, db_url, {"array_max": array_max},
                                 per_tick=per_tick) as gateway:
        service, reconciler = gateway.service, gateway.reconciler
        before = rpc_counts(reset=True) if sdiag else {}
        os.sync()  # the N tasks' creation written back before the timing starts
        start = time.perf_counter()
        submitted = 0
        while submitted < n:
            submitted += reconciler.tick().submitted
        seconds = time.perf_counter() - start
        for _ in range(ticks):
            reconciler.tick()
        after = rpc_counts() if sdiag else {}
        job_ids = [row.job_id for row in service.reconciler_queries.active_rows()]
    cancel_ids(job_ids)
    rpcs = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
    return {"tasks": n, "array_max": array_max, "submit_seconds": seconds,
            "rate_per_s": n / seconds, "jobs": len({j.split("_")[0] for j in job_ids}),
            "rpcs": rpcs, "rpc_total": sum(rpcs.values())}


def rpc_counts(reset: bool = False) -> dict[str, int]:
    """slurmctld's RPC counts by message type (sdiag), its own stats requests left out;
    with reset, zeroed first (root or SlurmUser only)."""
    if reset:
        subprocess.run(["sdiag", "--reset"], check=True, capture_output=True)
    out = subprocess.run(["sdiag"], check=True, capture_output=True, text=True).stdout
    section = out.split("by message type", 1)[1].split("by user", 1)[0]
    counts = {m.group(1): int(m.group(2)) for m in RPC_LINE.finditer(section)}
    counts.pop("REQUEST_STATS_INFO", None)
    counts.pop("REQUEST_STATS_RESET", None)
    return counts


def submission(n: int, tmp: Path, dbs: DatabaseFactory, sample: int = 500,
               rounds: int = ROUNDS) -> dict:
    """The gateway's one tick of N against the raw array, `rounds` times in turn (the
    ratio is the median round's: one round swung 0.46-0.61x on this disk), then the
    context run in ticks of ARRAY_MAX and the one-sbatch-per-job loop."""
    pairs = []
    for r in range(rounds):
        # the gateway first: the references' canceled jobs stay in squeue for MinJobAge,
        # and the gateway's poll would read them (its account's jobs) as a site's would
        # not (its one tick polls nothing: no job is in flight before it)
        gateway = gateway_held(n, tmp / f"gw-submit{r}", dbs.new("sqlite"), ARRAY_MAX,
                               ticks=1, per_tick=n)
        ids, raw_seconds = raw_array_submit(n, tmp / f"rawarray{r}", f"rawarray{n}r{r}")
        cancel_ids(ids)
        pairs.append({"gateway": gateway, "raw_array": {"seconds": raw_seconds,
                                                        "rate_per_s": n / raw_seconds,
                                                        "arrays": len(ids)},
                      "ratio": gateway["rate_per_s"] * raw_seconds / n})
    middle = sorted(pairs, key=lambda pair: pair["ratio"])[len(pairs) // 2]
    # context: the same at submit_per_tick ARRAY_MAX, each tick also polling the jobs
    # submitted by the ticks before
    ticked = gateway_held(n, tmp / "gw-ticked", dbs.new("sqlite"), ARRAY_MAX, ticks=1)
    loop = raw_loop_submission(min(sample, n), tmp / "loop")
    gateway, raw = middle["gateway"], middle["raw_array"]
    return {"tasks": n, "loop": loop, "raw_array": raw, "gateway": gateway,
            "rounds": [{"gateway_s": p["gateway"]["submit_seconds"],
                        "raw_array_s": p["raw_array"]["seconds"], "ratio": p["ratio"]}
                       for p in pairs],
            "gateway_ticks_of_array_max": ticked,
            "ratio_loop": gateway["rate_per_s"] / loop["rate_per_s"],
            "ratio_raw_array": middle["ratio"]}


def controller(n: int, tmp: Path, dbs: DatabaseFactory) -> dict:
    single = gateway_held(n, tmp / "gw-rpc1", dbs.new("sqlite"), 1, sdiag=True)
    arrays = gateway_held(n, tmp / "gw-rpcN", dbs.new("sqlite"), ARRAY_MAX, sdiag=True)
    return {"tasks": n, "one_job_each": single, "arrays": arrays,
            "ratio": arrays["rpc_total"] / max(1, single["rpc_total"])}


def raw_array_complete(n: int, work: Path) -> dict:
    name = f"rawarrayrun{n}"
    start = time.perf_counter()
    ids, submit_seconds = raw_array_submit(n, work, name)
    for array_id in ids:
        subprocess.run(["scontrol", "update", f"JobId={array_id}", "StartTime=now"],
                       check=True, capture_output=True)
    relaunched = 0
    progress: list[tuple[float, int]] = []  # as the gateway run's, about every 2 s
    while left := throughput.jobs_left(name):
        elapsed = time.perf_counter() - start
        if not progress or elapsed - progress[-1][0] >= 2:
            progress.append((round(elapsed, 1), n - left))
        relaunched += throughput.start_waiting_again()
        time.sleep(0.5)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rate_per_s": n / seconds, "submit_seconds": submit_seconds,
            "released_after_launch_failure": relaunched, "progress": progress}


def complete(n: int, tmp: Path, dbs: DatabaseFactory) -> dict:
    raw = raw_array_complete(n, tmp / "rawrun")
    gateway = throughput.gateway_run(n, tmp / "gw-run", dbs.new("sqlite"),
                                     slurm={"array_max": ARRAY_MAX})
    rate = n / gateway["seconds"]
    return {"tasks": n, "raw_array": raw, "gateway": gateway, "rate_per_s": rate,
            "ratio": rate / raw["rate_per_s"],
            "all_complete": gateway["states"].get("COMPLETE", 0) == n}


def measure(n: int, rpc_tasks: int, with_complete: bool = True) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="funnel-arrays-", dir="/var/tmp"))
    dbs = DatabaseFactory(tmp)
    try:
        result = {"submission": submission(n, tmp, dbs),
                  "controller": controller(rpc_tasks, tmp, dbs)}
        if with_complete:
            result["complete"] = complete(n, tmp, dbs)
        return result
    finally:  # its jobs are done or canceled by now: their dirs go (2 GB at 10,000)
        dbs.drop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def suite_rows(quick: bool, per_job_rate: float | None = None) -> tuple[list[dict], dict]:
    """benchmarks/suite.py's `arrays` rows and the raw figures. per_job_rate: the
    throughput section's rate for the same number of tasks one job each, when it ran."""
    n, rpc_tasks = (1000, 300) if quick else (10_000, 1000)
    r = measure(n, rpc_tasks)
    s, c = r["submission"], r["controller"]
    rows = [
        {"figure": f"submission of {n:,} tasks with arrays (jobs held)",
         "measured": f"{s['gateway']['rate_per_s']:.0f} tasks/s in {s['gateway']['jobs']} "
                     f"array jobs",
         "reference": f"raw one-sbatch-per-job loop {s['loop']['rate_per_s']:.0f} jobs/s",
         "ratio": s["ratio_loop"], "target": f">= {TARGET_LOOP:.0f}x",
         "met": s["ratio_loop"] >= TARGET_LOOP},
        {"figure": f"submission of {n:,} tasks with arrays, against a raw array",
         "measured": f"{s['gateway']['rate_per_s']:.0f} tasks/s (median of "
                     f"{len(s['rounds'])} rounds: "
                     + ", ".join(f"{r['ratio']:.2f}x" for r in s["rounds"]) + ")",
         "reference": f"raw sbatch --array of the same worker command, task files "
                      f"written {s['raw_array']['rate_per_s']:.0f} tasks/s",
         "ratio": s["ratio_raw_array"], "target": f">= {TARGET_RAW_ARRAY}x",
         "met": s["ratio_raw_array"] >= TARGET_RAW_ARRAY},
        {"figure": f"submission of {n:,} tasks with arrays in ticks of {ARRAY_MAX:,}",
         "measured": f"{s['gateway_ticks_of_array_max']['rate_per_s']:.0f} tasks/s "
                     f"(each tick also polls the jobs in flight)",
         "reference": f"one tick of {n:,} (above) {s['gateway']['rate_per_s']:.0f} tasks/s",
         "ratio": s["gateway_ticks_of_array_max"]["rate_per_s"] / s["gateway"]["rate_per_s"],
         "target": "context", "met": None},
        {"figure": f"slurmctld RPCs for {c['tasks']:,} tasks submitted and polled 5 times",
         "measured": f"{c['arrays']['rpc_total']} with arrays",
         "reference": f"{c['one_job_each']['rpc_total']} one job per task",
         "ratio": c["ratio"], "target": "<= 0.05x (1/20)", "met": c["ratio"] <= TARGET_RPCS},
    ]
    if "complete" in r:
        k = r["complete"]
        met = k["all_complete"] and k["ratio"] >= TARGET_COMPLETE and (
            per_job_rate is None or k["rate_per_s"] >= per_job_rate)
        raw_rate = k["raw_array"]["rate_per_s"]
        reference = f"raw sbatch --array of the same worker jobs {raw_rate:.1f}/s"
        if per_job_rate is not None:
            reference += f"; one job per task (throughput section) {per_job_rate:.1f}/s"
        rows.append({"figure": f"{n:,} trivial tasks QUEUED->COMPLETE on Slurm with arrays",
                     "measured": f"{k['gateway']['seconds']:.0f} s, {k['rate_per_s']:.1f}/s, "
                                 f"{'all' if k['all_complete'] else 'NOT all'} COMPLETE",
                     "reference": reference, "ratio": k["ratio"],
                     "target": f">= {TARGET_COMPLETE}x, and not below one job per task",
                     "met": met})
    return rows, r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--rpc-tasks", type=int, default=1000)
    parser.add_argument("--skip-complete", action="store_true")
    args = parser.parse_args()
    r = measure(args.tasks, args.rpc_tasks, not args.skip_complete)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = REPO / "benchmarks" / "results" / f"arrays-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine_facts(), **r}, indent=1, default=str))
    s, c = r["submission"], r["controller"]
    print(f"submission of {args.tasks}: gateway {s['gateway']['rate_per_s']:.0f}/s, loop "
          f"{s['loop']['rate_per_s']:.0f}/s ({s['ratio_loop']:.1f}x), raw array "
          f"{s['raw_array']['rate_per_s']:.0f}/s ({s['ratio_raw_array']:.2f}x); in ticks of "
          f"{ARRAY_MAX}: {s['gateway_ticks_of_array_max']['rate_per_s']:.0f}/s")
    print(f"RPCs for {c['tasks']}: arrays {c['arrays']['rpc_total']} {c['arrays']['rpcs']}; "
          f"one job each {c['one_job_each']['rpc_total']} ({c['ratio']:.3f}x)")
    if "complete" in r:
        k = r["complete"]
        print(f"QUEUED->COMPLETE {args.tasks}: gateway {k['rate_per_s']:.1f}/s, raw array "
              f"{k['raw_array']['rate_per_s']:.1f}/s ({k['ratio']:.2f}x)")
    print(f"written to {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
