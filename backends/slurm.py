"""Slurm: sbatch to submit, scancel to cancel, one squeue (and at most one sacct) per poll.

The submission script is rendered from ``templates/slurm.sh.j2`` (or the
admin's ``backend.slurm.template``), written to ``<task_dir>/slurm.sh`` and
given to ``sbatch --parsable`` on standard input, so the same path works over
SSH (``backend.slurm.ssh.host``) with a work dir shared with the login node.

A poll lists this user's jobs with one ``squeue --me -t all`` (not ``-j``:
squeue refuses a list holding ids it has forgotten, and the argv would grow with
the number of jobs); jobs that already left slurmctld's memory (MinJobAge) are
looked up with one ``sacct`` call when accounting is enabled (probed once). A
job neither knows is LOST: the reconciler then trusts the worker's event log,
and fails the task if that log has no end either. So a poll costs one scheduler
command, two when some jobs are gone and accounting is on.

``JobStatus.reason`` carries what Slurm said, e.g.
``squeue: FAILED exit=3:0 reason=NonZeroExitCode``.
"""

from __future__ import annotations

import re
import shutil

from funnel_hpc.backends.base import Backend, BackendError, JobState, JobStatus, SubmitRequest
from funnel_hpc.backends.commands import make_runner
from funnel_hpc.backends.templating import render, script_variables

# Slurm job states (squeue %T, sacct State) -> common job states
STATE_MAP: dict[str, JobState] = {
    "PENDING": JobState.PENDING,
    "CONFIGURING": JobState.PENDING,
    "REQUEUED": JobState.PENDING,
    "REQUEUE_FED": JobState.PENDING,
    "REQUEUE_HOLD": JobState.PENDING,
    "RESV_DEL_HOLD": JobState.PENDING,
    "SUSPENDED": JobState.RUNNING,
    "RUNNING": JobState.RUNNING,
    "COMPLETING": JobState.RUNNING,
    "RESIZING": JobState.RUNNING,
    "SIGNALING": JobState.RUNNING,
    "STAGE_OUT": JobState.RUNNING,
    "STOPPED": JobState.RUNNING,
    "COMPLETED": JobState.COMPLETED,
    "FAILED": JobState.FAILED,
    "TIMEOUT": JobState.FAILED,
    "NODE_FAIL": JobState.FAILED,
    "OUT_OF_MEMORY": JobState.FAILED,
    "BOOT_FAIL": JobState.FAILED,
    "DEADLINE": JobState.FAILED,
    "SPECIAL_EXIT": JobState.FAILED,
    "PREEMPTED": JobState.FAILED,
    "REVOKED": JobState.CANCELLED,
    "CANCELLED": JobState.CANCELLED,
}


UNIX_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")

# what Slurm's client commands print when slurmctld cannot be reached
UNREACHABLE = ("Unable to contact slurm controller", "Socket timed out",
               "Connection refused", "Zero Bytes were transmitted", "timed out after",
               "Communication connection failure", "ssh ")


def unreachable(result) -> bool:
    text = result.stderr + result.stdout
    return result.returncode in (124, 255) or any(marker in text for marker in UNREACHABLE)


def parse_job_id(text: str) -> str:
    """`sbatch --parsable` prints `jobid` or `jobid;cluster`."""
    job_id = text.strip().splitlines()[-1].split(";")[0].strip() if text.strip() else ""
    if not job_id.isdigit():
        raise BackendError(f"sbatch printed no job id: {text.strip()[:200]!r}")
    return job_id


def exit_code(raw: str) -> str:
    """squeue's exit_code is a wait status (768 = exit 3); show it as sacct does: code:signal."""
    try:
        status = int(raw)
    except ValueError:
        return raw
    return f"{status >> 8}:{status & 0x7F}"


def map_state(raw: str) -> JobState:
    # sacct shows e.g. "CANCELLED by 0"
    return STATE_MAP.get(raw.split()[0] if raw else "", JobState.UNKNOWN)


class SlurmBackend(Backend):
    name = "slurm"
    parallel_submit = True  # each submit is its own sbatch (over SSH: one at a time)

    def __init__(self, options: dict, config: dict):
        super().__init__(options, config)
        self.runner = make_runner(options.get("ssh"), float(options.get("command_timeout", 60)))
        self.template = options.get("template") or "slurm.sh.j2"
        self.supported_parameters = frozenset(
            k.lower() for k in (options.get("backend_parameters") or {}))
        self._accounting: bool | None = None

    # ---- submit / cancel ----

    def render_script(self, request: SubmitRequest) -> str:
        return render(self.template, script_variables(request, self.options))

    def _as_owner(self, request: SubmitRequest) -> list[str]:
        """`sudo -n -u OWNER --` when jobs are submitted as their owners, else nothing."""
        if not self.options.get("submit_as_owner"):
            return []
        owner = request.owner or ""
        if not UNIX_USER.match(owner):
            raise BackendError(f"cannot submit as owner {owner!r}: not a Unix user name "
                               "(backend.slurm.submit_as_owner needs authenticated users)")
        try:  # the worker runs as the owner: its task dir must be the owner's
            for path in (request.task_dir, *request.task_dir.iterdir()):
                shutil.chown(path, user=owner)
            request.task_dir.chmod(0o700)
        except (LookupError, OSError) as exc:
            raise BackendError(f"cannot hand the task dir to {owner!r}: {exc}") from None
        return ["sudo", "-n", "-u", owner, "--"]

    def submit(self, request: SubmitRequest) -> str:
        try:
            script = self.render_script(request)
        except ValueError as exc:
            raise BackendError(f"cannot render the Slurm script: {exc}") from None
        path = request.task_dir / "slurm.sh"
        path.write_text(script)
        prefix = self._as_owner(request)
        result = self.runner.run([*prefix, "sbatch", "--parsable"], input=script)
        if result.returncode != 0:
            raise BackendError(f"sbatch failed ({result.returncode}): "
                               f"{(result.stderr or result.stdout).strip()[:500]}",
                               transient=unreachable(result))
        return parse_job_id(result.stdout)

    def cancel(self, job_id: str) -> None:
        result = self.runner.run(["scancel", str(job_id)])
        if result.returncode != 0 and "already completing or completed" not in result.stderr \
                and "Invalid job id" not in result.stderr:
            raise BackendError(f"scancel {job_id} failed: {result.stderr.strip()[:300]}",
                               transient=unreachable(result))

    def recover(self, task_id: str, task_dir) -> str | None:
        result = self.runner.run(["squeue", "-h", *self._whose_jobs(), "-t", "all", "-n",
                                  f"funnel-{task_id}", "-o", "%i"])
        ids = [line.strip() for line in result.stdout.splitlines() if line.strip().isdigit()]
        return ids[-1] if result.returncode == 0 and ids else None

    # ---- poll ----

    def _whose_jobs(self) -> list[str]:
        """squeue's user filter: this account's jobs, or all when jobs run as their owners."""
        return [] if self.options.get("submit_as_owner") else ["--me"]

    def poll(self, job_ids: list[str]) -> dict[str, JobStatus]:
        wanted = {str(j) for j in job_ids}
        if not wanted:
            return {}
        result = self.runner.run(["squeue", "-h", *self._whose_jobs(), "-t", "all",
                                  "-O", "JobID:|,State:|,exit_code:|,Reason:"])
        if result.returncode != 0:
            reason = f"squeue failed: {(result.stderr or result.stdout).strip()[:300]}"
            return {j: JobStatus(JobState.UNKNOWN, reason) for j in wanted}
        found: dict[str, JobStatus] = {}
        for line in result.stdout.splitlines():
            parts = [p.strip() for p in line.split("|", 3)]
            if len(parts) == 4 and parts[0] in wanted:
                job_id, state, code, reason = parts
                found[job_id] = JobStatus(map_state(state), f"squeue: {state} "
                                          f"exit={exit_code(code)} reason={reason}")
        missing = sorted(wanted - set(found))
        if missing and self.accounting_enabled():
            found.update(self._sacct(missing))
        where = "not in squeue, not in sacct" if self._accounting else \
            "not in squeue; no accounting"
        for job_id in wanted - set(found):
            found[job_id] = JobStatus(JobState.LOST, f"Slurm no longer knows this job ({where})")
        return found

    def accounting_enabled(self) -> bool:
        """Does sacct answer here? Probed once; an unclear answer is asked again later."""
        if self._accounting is None:
            probe = self.runner.run(["sacct", "-n", "-X", "-P", "-o", "JobID", "-j", "1"])
            text = probe.stderr + probe.stdout
            if "disabled" in text or probe.returncode == 127:
                self._accounting = False
            elif probe.returncode == 0:
                self._accounting = True
            else:
                return False
        return self._accounting

    def _sacct(self, job_ids: list[str]) -> dict[str, JobStatus]:
        result = self.runner.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State,ExitCode,Reason",
                                  "-j", ",".join(job_ids)])
        if result.returncode != 0:
            # not LOST: that would fail the tasks; ask again next poll
            reason = f"sacct failed: {(result.stderr or result.stdout).strip()[:300]}"
            return {j: JobStatus(JobState.UNKNOWN, reason) for j in job_ids}
        out: dict[str, JobStatus] = {}
        for line in result.stdout.splitlines():
            parts = line.split("|", 3)
            if len(parts) >= 3 and parts[0] in job_ids:
                state = map_state(parts[1])
                out[parts[0]] = JobStatus(state, f"sacct: {parts[1]} exit={parts[2]} "
                                                 f"reason={parts[3] if len(parts) > 3 else ''}")
        return out

    def close(self) -> None:
        self.runner.close()
