"""A task's resources as limits this worker enforces: what, how, and the tmpfs bound.

`worker.limit_resources`: `auto` enforces them when the worker is not inside a scheduler's
job (none of SCHEDULER_VARS is set: Slurm, Grid Engine, PBS, LSF, HTCondor and AWS Batch
enforce their own with their cgroups), `always`, or `never`. Enforced, a root worker puts
each bwrap/proot/charliecloud executor in the task's cgroup (worker/cgroups.py): ram_gb is
its memory limit (tmpfs pages included, no swap), cpu_cores a CFS quota plus a cpuset of
that many CPUs (the task cannot widen it), `worker.max_pids` its process limit; disk_gb is
RLIMIT_FSIZE plus a walk of the task's files (worker/disk.py). Without a cgroup (the worker
is not root, no hierarchy) ram_gb is RLIMIT_AS and cpu_cores a CPU affinity, through
util-linux `prlimit` and `taskset` (exec'd: no preexec_fn in a threaded worker).
Every tmpfs of a bwrap sandbox is bounded by `worker.tmpfs_mb` (and by ram_gb when
enforced) in every case, under a scheduler too.

Cost: nothing per executor with a cgroup beyond its start (worker/cgroups.py); two short
execs per executor without one, only when limited.
"""

from __future__ import annotations

import os

from funnel_hpc.worker.cgroups import Limits

TYPE_CHECKING = False  # not typing's: importing typing costs every worker start
if TYPE_CHECKING:
    from collections.abc import Mapping

    from funnel_hpc.core.config import WorkerSection

MODES = ("auto", "always", "never")
SCHEDULER_VARS = ("SLURM_JOB_ID", "JOB_ID", "PBS_JOBID", "LSB_JOBID", "_CONDOR_JOB_AD",
                  "AWS_BATCH_JOB_ID")
MIN_BYTES = 64 << 20  # below this not even the engine starts: a task asking less gets this
DEFAULT_TMPFS_MB = 1024
DEFAULT_DISK_CHECK_SECONDS = 2.0


class LimitError(ValueError):
    """A worker.* limit setting is invalid (the message names the key)."""


class Plan:
    """What of a task's resources this worker enforces (None: nothing of that kind)."""

    def __init__(self, enforce: bool, tmpfs_bytes: int, ram_bytes: int | None = None,
                 cores: float | None = None, cpus: tuple[int, ...] | None = None,
                 pids_max: int | None = None, disk_bytes: int | None = None,
                 disk_check_seconds: float = DEFAULT_DISK_CHECK_SECONDS):
        self.enforce = enforce  # False: under a scheduler's job, or limit_resources never
        self.tmpfs_bytes = tmpfs_bytes  # each tmpfs of the sandbox, always
        self.ram_bytes = ram_bytes
        self.cores = cores
        self.cpus = cpus  # that many of the worker's CPUs, spread by task id
        self.pids_max = pids_max
        self.disk_bytes = disk_bytes
        self.disk_check_seconds = disk_check_seconds

    def cgroup_limits(self) -> Limits:
        return Limits(self.ram_bytes, self.cores, self.cpus, self.pids_max)

    def describe(self) -> str:
        """The limits, in words, for the system logs."""
        said = []
        if self.ram_bytes:
            said.append(f"memory {self.ram_bytes} bytes")
        if self.cores:
            said.append(f"CPU time {self.cores:g} CPUs")
        if self.cpus:
            said.append(f"CPUs {','.join(map(str, self.cpus))}")
        if self.pids_max:
            said.append(f"processes {self.pids_max}")
        if self.disk_bytes:
            said.append(f"disk {self.disk_bytes} bytes (resources.disk_gb)")
        said.append(f"tmpfs {self.tmpfs_bytes} bytes each")
        return ", ".join(said)

    def rlimit_argv(self, argv: list[str]) -> tuple[list[str], str | None]:
        """Without a cgroup: argv under RLIMIT_AS/RLIMIT_FSIZE and a CPU affinity, and a note
        for the system logs (None: nothing to limit)."""
        if not self.enforce:
            return argv, None
        prefix: list[str] = []
        said: list[str] = []
        rlimits = []
        if self.ram_bytes:
            rlimits.append(f"--as={self.ram_bytes}")
            said.append(f"address space {self.ram_bytes} bytes")
        if self.disk_bytes:
            rlimits.append(f"--fsize={self.disk_bytes}")
            said.append(f"file size {self.disk_bytes} bytes")
        if rlimits:
            prefix += ["prlimit", *rlimits, "--"]
        if self.cpus:
            prefix += ["taskset", "--cpu-list", ",".join(map(str, self.cpus))]
            said.append(f"CPUs {','.join(map(str, self.cpus))}")
        if not prefix:
            return argv, None
        return prefix + argv, "limits (worker.limit_resources): " + ", ".join(said)


def plan(resources: Mapping[str, object], worker: WorkerSection, task_id: str,
         environ: Mapping[str, str] = os.environ) -> Plan:
    """The task's Plan under this worker's settings; LimitError names a bad setting."""
    mode = worker.limit_resources
    if mode not in MODES:
        raise LimitError(f"worker.limit_resources must be one of {MODES}, not {mode!r}")
    tmpfs_bytes = _setting("tmpfs_mb", worker.tmpfs_mb, minimum=1) << 20
    enforce = mode == "always" or (mode == "auto"
                                   and not any(environ.get(v) for v in SCHEDULER_VARS))
    if not enforce:
        return Plan(False, tmpfs_bytes)
    ram_gb = _number(resources.get("ram_gb"))
    ram_bytes = max(int(ram_gb * (1 << 30)), MIN_BYTES) if ram_gb else None
    if ram_bytes:
        tmpfs_bytes = min(tmpfs_bytes, ram_bytes)
    cores = _number(resources.get("cpu_cores"))
    available = sorted(os.sched_getaffinity(0))
    cpus = None
    if cores and cores < len(available):
        # spread tasks over the CPUs by their id, so that two tasks rarely share one
        start = sum(task_id.encode()) % len(available)
        count = max(1, int(-(-cores // 1)))
        cpus = tuple(sorted(available[(start + i) % len(available)] for i in range(count)))
    else:
        cores = None
    disk_gb = _number(resources.get("disk_gb"))
    max_pids = _setting("max_pids", worker.max_pids, minimum=0)
    check = worker.disk_check_seconds
    if not 0 < check <= 60:
        raise LimitError(f"worker.disk_check_seconds must be a number of seconds in (0, 60], "
                         f"not {check!r}")
    return Plan(True, tmpfs_bytes, ram_bytes, cores, cpus, max_pids or None,
                int(disk_gb * (1 << 30)) if disk_gb else None, check)


def _setting(key: str, value: int, minimum: int) -> int:
    if value < minimum:
        raise LimitError(f"worker.{key} must be a whole number >= {minimum}, not {value!r}")
    return value


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None  # float() takes nothing else that a task's JSON can hold
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 and number == number and number != float("inf") else None
