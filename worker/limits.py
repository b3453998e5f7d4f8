"""A task's cpu_cores and ram_gb enforced where no scheduler does it (the local backend).

`worker.limit_resources`: `auto` enforces them when the worker is not inside a scheduler's
job (none of SCHEDULER_VARS is set: Slurm, Grid Engine, PBS, LSF, HTCondor and AWS Batch
enforce their own), `always`, or `never`. ram_gb becomes RLIMIT_AS (address space: a program
that reserves much more than it uses may fail) and cpu_cores a CPU affinity of that many of
the worker's CPUs. Both are applied by wrapping the engine in util-linux `prlimit` and
`taskset` (exec'd: no preexec_fn in a threaded worker) and pass through bwrap and proot to
the executor and its children. Cost: two short execs per executor, only when limited.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # not typing's: importing typing costs every worker start
if TYPE_CHECKING:
    from collections.abc import Mapping

MODES = ("auto", "always", "never")
SCHEDULER_VARS = ("SLURM_JOB_ID", "JOB_ID", "PBS_JOBID", "LSB_JOBID", "_CONDOR_JOB_AD",
                  "AWS_BATCH_JOB_ID")
MIN_BYTES = 64 << 20  # below this not even the engine starts: a task asking less gets this


class LimitError(ValueError):
    """worker.limit_resources is not one of MODES."""


def wrap(argv: list[str], resources: Mapping[str, object], mode: str, task_id: str,
         environ: Mapping[str, str] = os.environ) -> tuple[list[str], str | None]:
    """argv under the task's limits, and a note for the system logs (None: no limit)."""
    if mode not in MODES:
        raise LimitError(f"worker.limit_resources must be one of {MODES}, not {mode!r}")
    if mode == "never" or (mode == "auto" and any(environ.get(v) for v in SCHEDULER_VARS)):
        return argv, None
    prefix: list[str] = []
    said: list[str] = []
    ram_gb = _number(resources.get("ram_gb"))
    if ram_gb:
        limit = max(int(ram_gb * (1 << 30)), MIN_BYTES)
        prefix += ["prlimit", f"--as={limit}", "--"]
        said.append(f"address space {limit} bytes")
    cores = int(_number(resources.get("cpu_cores")) or 0)
    cpus = sorted(os.sched_getaffinity(0))
    if 0 < cores < len(cpus):
        # spread tasks over the CPUs by their id, so that two tasks rarely share one
        start = sum(task_id.encode()) % len(cpus)
        chosen = sorted(cpus[(start + i) % len(cpus)] for i in range(cores))
        prefix += ["taskset", "--cpu-list", ",".join(map(str, chosen))]
        said.append(f"CPUs {','.join(map(str, chosen))}")
    if not prefix:
        return argv, None
    return prefix + argv, "limits (worker.limit_resources): " + ", ".join(said)


def _number(value: object) -> float | None:
    if not isinstance(value, (str, int, float)):
        return None  # float() takes nothing else that a task's JSON can hold
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None
