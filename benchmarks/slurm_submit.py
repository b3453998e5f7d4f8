"""SlurmBackend.submit vs a raw `sbatch --parsable` loop, and scheduler calls per poll.

Run: .venv/bin/python benchmarks/slurm_submit.py [N]   (default N=200)

1. submit N trivial jobs through SlurmBackend.submit (render the template, write
   <task_dir>/slurm.sh, sbatch) and N raw `sbatch --parsable` calls of the same
   script, interleaved; report both total times and their ratio;
2. with those 2N jobs in flight, poll 1, N/2 and N of them: scheduler commands
   and wall time per poll (the commands must not grow with N);
3. cancel everything.
Jobs are held with --begin=now+1hour so the machine is not flooded and every
job stays in flight. Needs the single-node Slurm from scripts/setup/30-slurm.sh.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from funnel_hpc.backends.base import SubmitRequest  # noqa: E402
from funnel_hpc.backends.slurm import SlurmBackend, parse_job_id  # noqa: E402
from funnel_hpc.core import config as config_mod  # noqa: E402

HOLD = {"begin": "now+1hour"}


def request(tmp: Path, i: int) -> SubmitRequest:
    task_id = f"bench{i:05d}"
    task_dir = tmp / task_id
    task_dir.mkdir()
    (task_dir / "task.json").write_text(json.dumps({"id": task_id}))
    return SubmitRequest(task_id=task_id, task={"id": task_id, "name": "bench"},
                         task_dir=task_dir, worker_argv=["/bin/true"], backend_parameters=HOLD)


def cancel_all(job_ids: list[str]) -> None:
    for start in range(0, len(job_ids), 500):
        subprocess.run(["scancel", *job_ids[start:start + 500]], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", nargs="?", type=int, default=200, help="jobs per side (200)")
    args = parser.parse_args()
    n = args.n
    if not shutil.which("sbatch"):
        sys.exit("sbatch not found: run scripts/setup/30-slurm.sh")

    config = config_mod.load(environ={})
    backend = SlurmBackend(config.backend.slurm, Path(config.work_dir))
    tmp = Path(tempfile.mkdtemp(prefix="funnel-slurm-submit-"))
    ours: list[str] = []
    raw: list[str] = []
    try:
        requests = [request(tmp, i) for i in range(n)]
        # warm-up: template compiled, sbatch binaries in the page cache
        warm = backend.submit(request(tmp, n))
        cancel_all([warm])

        # interleaved (backend, raw, backend, raw...) so slurmctld's growing queue
        # and cache warmth weigh on both sides alike
        script = backend.render_script(requests[0])
        calls = backend.runner.calls
        backend_s = raw_s = 0.0
        for req in requests:
            start = time.perf_counter()
            ours.append(backend.submit(req))
            middle = time.perf_counter()
            done = subprocess.run(["sbatch", "--parsable"], input=script, capture_output=True,
                                  text=True, check=True)
            raw.append(parse_job_id(done.stdout))
            backend_s += middle - start
            raw_s += time.perf_counter() - middle
        submit_calls = backend.runner.calls - calls

        backend.accounting_enabled()  # the one-time probe, outside the measured polls
        polls = []
        for size in sorted({1, max(1, n // 2), n}):
            calls = backend.runner.calls
            start = time.perf_counter()
            statuses = backend.poll(ours[:size])
            polls.append({"jobs": size, "scheduler_calls": backend.runner.calls - calls,
                          "seconds": round(time.perf_counter() - start, 4),
                          "states": sorted({s.state.value for s in statuses.values()})})
    finally:
        cancel_all(ours + raw)
        backend.close()
        shutil.rmtree(tmp, ignore_errors=True)

    result = {
        "jobs": n,
        "backend_submit_s": round(backend_s, 3),
        "raw_sbatch_s": round(raw_s, 3),
        "ratio": round(backend_s / raw_s, 3),
        "backend_ms_per_job": round(1000 * backend_s / n, 2),
        "raw_ms_per_job": round(1000 * raw_s / n, 2),
        "scheduler_calls_per_submit": submit_calls / n,
        "jobs_in_flight_during_polls": 2 * n,
        "polls": polls,
        "calls_per_poll_constant": len({p["scheduler_calls"] for p in polls}) == 1,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
