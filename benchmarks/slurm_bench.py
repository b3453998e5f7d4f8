"""Gateway vs raw Slurm, measured side by side in one run.

Run: .venv/bin/python benchmarks/slurm_bench.py [--tasks 1000] [--latency-runs 5]

1. end-to-end latency of a trivial task through the gateway (HTTP create -> COMPLETE,
   reconciler tick 0.25 s) vs raw `sbatch` of the same worker command, its event log
   watched every 5 ms; and on the
   local backend vs running the worker directly;
2. time to submit N tasks through the reconciler vs a raw `sbatch` loop of the same script
   (jobs held with --begin so the machine is not flooded, then cancelled);
3. scheduler commands and CPU seconds per reconciler tick with N jobs in flight.
Needs the single-node Slurm from scripts/setup/30-slurm.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from funnel_hpc.backends.slurm import SlurmBackend  # noqa: E402
from funnel_hpc.core import config as config_mod  # noqa: E402
from funnel_hpc.core.events import read_event_log  # noqa: E402
from funnel_hpc.gateway.reconcile.reconciler import Reconciler  # noqa: E402
from funnel_hpc.gateway.web.app import make_service  # noqa: E402
from tests.server_helpers import DatabaseFactory, ServerProcess, worker_image_config  # noqa: E402

TRIVIAL = {"executors": [{"image": "busybox", "command": ["true"]}]}


def gateway_latency(backend: str, tmp: Path, dbs: DatabaseFactory, runs: int) -> list[float]:
    server = ServerProcess(tmp / f"lat-{backend}", dbs.new("sqlite"), reconcile=True, overrides={
        "backend": {"name": backend}, "reconciler": {"interval_seconds": 0.25},
        "worker": {"container_driver": "bwrap"}}).start()
    try:
        out = []
        session = requests.Session()
        for _ in range(runs + 1):
            start = time.perf_counter()
            task_id = session.post(server.api + "/tasks", json=TRIVIAL, timeout=10).json()["id"]
            while session.get(f"{server.api}/tasks/{task_id}", timeout=10).json()["state"] \
                    not in ("COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR"):
                time.sleep(0.005)
            out.append(time.perf_counter() - start)
        return out[1:]  # first run warms caches (driver probe)
    finally:
        server.stop()


def worker_argv(task_file: Path, work: Path) -> list[str]:
    """The worker as the gateway starts it, with the same container driver."""
    config = work / "worker-config.yaml"
    config.write_text(json.dumps({"worker": {"container_driver": "bwrap",
                                             **worker_image_config()}}))  # YAML reads JSON
    return [sys.executable, "-m", "funnel_hpc.worker", "run", "--task-file", str(task_file),
            "--workdir", str(work), "--config", str(config)]


def raw_latency(kind: str, tmp: Path, runs: int) -> list[float]:
    work = tmp / f"raw-{kind}"
    work.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(runs + 1):
        task_file = work / f"t{i}.json"
        task_file.write_text(json.dumps({"id": f"raw{kind}{i}", **TRIVIAL}))
        argv = worker_argv(task_file, work)
        start = time.perf_counter()
        if kind == "slurm":
            # sbatch, then watch the worker's event log every 5 ms, as the gateway side's
            # client polls the API (`sbatch --wait` polls Slurm at growing intervals, up
            # to 10 s, which measured its polling rather than the job)
            script = "#!/bin/bash\n#SBATCH --output=/dev/null\nexec " + " ".join(argv) + "\n"
            subprocess.run(["sbatch", "--parsable"], input=script, text=True,
                           check=True, capture_output=True, cwd=work)
            events = work / f"raw{kind}{i}" / "events.jsonl"
            while not read_event_log(events).terminal:
                time.sleep(0.005)
        else:
            subprocess.run(argv, check=True, capture_output=True, cwd=REPO)
        out.append(time.perf_counter() - start)
    return out[1:]


def submit_and_tick(tmp: Path, dbs: DatabaseFactory, n: int) -> dict:
    config = config_mod.load(environ={}, overrides={
        "work_dir": str(tmp / "many"), "database": {"url": dbs.new("sqlite")},
        "backend": {"name": "slurm"}, "reconciler": {"submit_per_tick": n}})
    service = make_service(config)
    backend = SlurmBackend(config.backend.slurm, Path(config.work_dir))
    reconciler = Reconciler(service, backend, config)
    held = {**TRIVIAL, "resources": {"backend_parameters": {"begin": "now+1hour"}}}
    for _ in range(n):
        service.create(held)
    backend.accounting_enabled()
    start = time.perf_counter()
    stats = reconciler.tick()
    gateway_submit = time.perf_counter() - start
    assert stats.submitted == n, stats
    ticks = []
    for _ in range(3):
        calls = backend.runner.calls
        cpu = time.process_time()
        wall = time.perf_counter()
        reconciler.tick()
        ticks.append({"calls": backend.runner.calls - calls, "cpu_s": time.process_time() - cpu,
                      "wall_s": time.perf_counter() - wall})
    job_ids = [r.job_id for r in service.reconciler_queries.active_rows()]
    subprocess.run(["scancel", *job_ids], check=False)

    script = "#!/bin/bash\n#SBATCH --output=/dev/null\n#SBATCH --begin=now+1hour\nexec true\n"
    raw_ids = []
    start = time.perf_counter()
    for _ in range(n):
        raw_ids.append(subprocess.run(["sbatch", "--parsable"], input=script, text=True,
                                      capture_output=True, check=True).stdout.strip())
    raw_submit = time.perf_counter() - start
    subprocess.run(["scancel", *raw_ids], check=False)
    return {"tasks": n, "gateway_submit_s": gateway_submit, "raw_sbatch_loop_s": raw_submit,
            "submit_ratio": gateway_submit / raw_submit,
            "gateway_rate_per_s": n / gateway_submit, "raw_rate_per_s": n / raw_submit,
            "scheduler_calls_per_tick": [t["calls"] for t in ticks],
            "tick_cpu_s": [round(t["cpu_s"], 4) for t in ticks],
            "tick_wall_s": [round(t["wall_s"], 4) for t in ticks]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--latency-runs", type=int, default=5)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="funnel-slurm-bench-"))
    dbs = DatabaseFactory(tmp)
    r: dict = {}
    for kind in ("slurm", "local"):
        gw = statistics.median(gateway_latency(kind, tmp, dbs, args.latency_runs))
        raw = statistics.median(raw_latency(kind, tmp, args.latency_runs))
        r[f"{kind}_gateway_latency_s"], r[f"{kind}_raw_latency_s"] = gw, raw
        r[f"{kind}_latency_ratio"] = gw / raw
    r.update(submit_and_tick(tmp, dbs, args.tasks))
    stamp = datetime.now(UTC)
    out_dir = REPO / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"slurm-{stamp:%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps({"date": stamp.isoformat(), "cpus": os.cpu_count(),
                               "results": r}, indent=2))
    print("Slurm / local backend benchmark (medians)")
    print(f"  trivial task on Slurm: gateway {r['slurm_gateway_latency_s']:.2f}s  raw sbatch "
          f"{r['slurm_raw_latency_s']:.2f}s  ratio {r['slurm_latency_ratio']:.2f}")
    print(f"  trivial task locally:  gateway {r['local_gateway_latency_s']:.2f}s  worker directly "
          f"{r['local_raw_latency_s']:.2f}s  ratio {r['local_latency_ratio']:.2f}")
    print(f"  submit {r['tasks']} tasks: reconciler {r['gateway_submit_s']:.1f}s "
          f"({r['gateway_rate_per_s']:.0f}/s)  raw sbatch loop {r['raw_sbatch_loop_s']:.1f}s "
          f"({r['raw_rate_per_s']:.0f}/s)  ratio {r['submit_ratio']:.2f}")
    print(f"  per reconciler tick at {r['tasks']} jobs in flight: scheduler calls "
          f"{r['scheduler_calls_per_tick']}, CPU {r['tick_cpu_s']} s")
    print(f"  written to {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
