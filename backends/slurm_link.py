"""How SlurmBackend talks to slurmctld (backend.slurm.mode): CliLink or RestLink.

SlurmBackend decides what to submit, which element is which task and what a state means;
a link only carries its questions to slurmctld and brings back the facts as JobRow rows
(backends/slurm_rest_jobs.py: the id, Slurm's state, "code:signal", the reason, name, user):

- ``CliLink`` (mode cli): the commands sbatch, squeue -r, scancel, scontrol and sacct through
  a Runner (here or over SSH). A poll is one squeue, plus one sacct when jobs have left
  slurmctld's memory and accounting answers.
- ``RestLink`` (mode rest): slurmrestd through SlurmRestClient (backends/slurm_rest.py), one
  kept-open connection and no process (with submit_as_owner, over rest_auth/jwt only: one
  ``scontrol token`` per owner every 15 minutes). A poll is ONE GET of the jobs list; there is
  no sacct (slurmrestd 22.05 serves no slurmdbd plugin here), so a job gone from the list is
  LOST and the worker's event log decides.

Errors are BackendError from both (commands.failure, slurm_rest.failure): `rows` and
`job_ids_named` raise when slurmctld could not be asked, never answer "no such job" then.
"""

from __future__ import annotations

from pwd import struct_passwd
from typing import Protocol

from funnel_hpc.backends.base import BackendError
from funnel_hpc.backends.commands import Result, Runner, failure
from funnel_hpc.backends.slurm_arrays import ELEMENT_ID, JOB_ID, expand
from funnel_hpc.backends.slurm_rest import UNREACHABLE_WORDS, SlurmRestClient
from funnel_hpc.backends.slurm_rest_jobs import JobRow, wait_status

# what Slurm's client commands print when slurmctld cannot be reached (slurmrestd's
# errors carry the same words)
UNREACHABLE = UNREACHABLE_WORDS
# a job scancel/scontrol has nothing to do to: ended, or forgotten
ENDED = ("already completing or completed", "Invalid job id")
WITHDRAW_COMMENT = "funnel-withdraw"  # set on an element being withdrawn (see withdraw)
# squeue -j with one id slurmctld no longer knows (with several, it lists the known ones)
FORGOTTEN_ID = "Invalid job id specified"
# -r: one array element a line (pending ranges too), JobArrayID 123_4 or 125
SQUEUE_COLUMNS = ["-r", "-O", "JobArrayID:|,State:|,exit_code:|,Reason:"]
# an owner's jobs' PATH in REST mode (sudo's secure_path on Debian)
OWNER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class SlurmLink(Protocol):
    """The questions SlurmBackend asks slurmctld, whatever carries them."""

    runner: Runner   # the commands' runner (REST mode: none is ever run)
    source: str      # the word a poll's reasons start with: squeue, slurmrestd

    def submit(self, script: str, owner: struct_passwd | None, what: str) -> str:
        """Submit a rendered script as the gateway's account, or as owner's
        (submit_as_owner: the account the owner policy gave); its job id."""

    def rows(self, wanted: set[str]) -> list[JobRow]:
        """The rows slurmctld lists for the wanted jobs (CLI: those only; REST: maybe more)."""

    def finished(self, missing: list[str]) -> tuple[list[JobRow], str]:
        """Rows of jobs slurmctld forgot, from accounting, and where was looked (for LOST)."""

    def cancel(self, job_id: str) -> None: ...

    def withdraw(self, job_id: str) -> None:
        """Cancel the job (one element, never its siblings) only if it has not started."""

    def job_ids_named(self, job_name: str, user: str | None) -> list[str]:
        """Job ids (an array's job id for its elements) of the jobs of that name of this
        account, or of `user`, in any state slurmctld still lists."""

    def live_names(self, names: list[str]) -> set[str] | None:
        """Which of these job names slurmctld still lists; None when it cannot be asked."""

    def close(self) -> None: ...


def owner_environment(owner: struct_passwd) -> dict[str, str]:
    """What `sudo -u OWNER` gives sbatch in CLI mode (the account's home, shell and
    names, a fixed PATH), for the owner's jobs in REST mode: nothing of the gateway's."""
    return {"PATH": OWNER_PATH, "HOME": owner.pw_dir, "SHELL": owner.pw_shell,
            "USER": owner.pw_name, "LOGNAME": owner.pw_name, "LANG": "C.UTF-8"}


def _id_order(job_id: str) -> tuple[int, int]:
    """123 before 123_0 before 123_10."""
    match = ELEMENT_ID.fullmatch(job_id)
    return (int(match.group(1)), int(match.group(2)) + 1) if match else (int(job_id), 0)


def parse_job_id(text: str) -> str:
    """`sbatch --parsable` prints `jobid` or `jobid;cluster`."""
    job_id = text.strip().splitlines()[-1].split(";")[0].strip() if text.strip() else ""
    if not job_id.isdigit():
        raise BackendError(f"sbatch printed no job id: {text.strip()[:200]!r}")
    return job_id


class CliLink:
    """slurmctld through Slurm's commands (backend.slurm.mode: cli)."""

    source = "squeue"

    def __init__(self, runner: Runner, as_owner: bool):
        self.runner = runner
        # jobs run as their owners: a poll names the jobs (squeue -j) rather than list
        # every user's jobs on the cluster, and recover asks for the owner's (-u OWNER)
        self.as_owner = as_owner
        self.accounting: bool | None = None

    def submit(self, script: str, owner: struct_passwd | None, what: str) -> str:
        prefix = ["sudo", "-n", "-u", owner.pw_name, "--"] if owner is not None else []
        result = self.runner.run([*prefix, "sbatch", "--parsable"], input=script)
        if result.returncode != 0:
            raise failure(what, result, UNREACHABLE)
        return parse_job_id(result.stdout)

    def _squeue(self, wanted: set[str]) -> Result:
        if not self.as_owner:
            return self.runner.run(["squeue", "-h", "--me", "-t", "all", *SQUEUE_COLUMNS])
        ids = sorted((j for j in wanted if JOB_ID.fullmatch(j)), key=_id_order)
        if not ids:
            return Result(0, "", "")
        result = self.runner.run(["squeue", "-h", "-t", "all", "-j", ",".join(ids),
                                  *SQUEUE_COLUMNS])
        if result.returncode != 0 and len(ids) == 1 and FORGOTTEN_ID in result.stderr:
            return Result(0, "", "")  # the one job is gone: LOST or in sacct
        return result

    def rows(self, wanted: set[str]) -> list[JobRow]:
        result = self._squeue(wanted)
        if result.returncode != 0:
            raise BackendError(f"squeue failed ({result.returncode}): "
                               f"{(result.stderr or result.stdout).strip()[:300]}")
        found = []
        for line in result.stdout.splitlines():
            # the account's other jobs (thousands of ended ones, for MinJobAge) are passed
            # over at their first column
            if line.split("|", 1)[0].strip() not in wanted:
                continue
            parts = [p.strip() for p in line.split("|", 3)]
            if len(parts) == 4:
                job_id, state, code, reason = parts
                found.append(JobRow(job_id, state, wait_status(code), reason, "", ""))
        return found

    def accounting_enabled(self) -> bool:
        """Does sacct answer here? Probed once; an unclear answer is asked again later."""
        if self.accounting is None:
            probe = self.runner.run(["sacct", "-n", "-X", "-P", "-o", "JobID", "-j", "1"])
            text = probe.stderr + probe.stdout
            if "disabled" in text or probe.returncode == 127:
                self.accounting = False
            elif probe.returncode == 0:
                self.accounting = True
            else:
                return False
        return self.accounting

    def finished(self, missing: list[str]) -> tuple[list[JobRow], str]:
        if not self.accounting_enabled():
            return [], "not in squeue; no accounting"
        result = self.runner.run(["sacct", "-n", "-X", "-P", "-o",
                                  "JobID,State,ExitCode,Reason", "-j", ",".join(missing)])
        if result.returncode != 0:  # not LOST: that would fail the tasks; ask again
            raise BackendError(f"sacct failed: {(result.stderr or result.stdout).strip()[:300]}")
        found = []
        for line in result.stdout.splitlines():
            parts = line.split("|", 3)
            if len(parts) < 3:
                continue
            reason = parts[3] if len(parts) > 3 else ""
            # a pending range: each of its elements
            found += [JobRow(job_id, parts[1], parts[2], reason, "", "")
                      for job_id in expand(parts[0])]
        return found, "not in squeue, not in sacct"

    def cancel(self, job_id: str) -> None:
        result = self.runner.run(["scancel", str(job_id)])
        if result.returncode != 0 and not any(words in result.stderr for words in ENDED):
            raise failure(f"scancel {job_id}", result, UNREACHABLE)

    def withdraw(self, job_id: str) -> None:
        """scancel --state=PENDING: slurmctld cancels the job only while it waits. An
        element first gets its own record (scontrol update of its Comment): measured on
        Slurm 22.05, `scancel --state=PENDING 123_4` while elements 0-9 still wait as one
        record cancels all ten."""
        if ELEMENT_ID.fullmatch(str(job_id)):
            split = self.runner.run(["scontrol", "update", f"JobId={job_id}",
                                     f"Comment={WITHDRAW_COMMENT}"])
            said = split.stderr + split.stdout
            if split.returncode != 0:
                if any(words in said for words in ("Invalid job id", "already completing",
                                                   "already finished")):
                    return  # gone or ended: nothing waits to withdraw
                raise failure(f"scontrol update JobId={job_id}", split, UNREACHABLE)
        result = self.runner.run(["scancel", "--state=PENDING", str(job_id)])
        if result.returncode != 0 and not any(words in result.stderr for words in ENDED):
            raise failure(f"scancel --state=PENDING {job_id}", result, UNREACHABLE)

    def job_ids_named(self, job_name: str, user: str | None) -> list[str]:
        whose = ["-u", user] if user else ["--me"]
        result = self.runner.run(["squeue", "-h", *whose, "-t", "all", "-n", job_name,
                                  "-o", "%F|%u"])
        if result.returncode != 0:  # not "no such job": we could not ask
            error = failure("squeue", result, UNREACHABLE)
            error.transient = True
            raise error
        ids = []
        for line in result.stdout.splitlines():
            job_id, _, job_user = (part.strip() for part in line.partition("|"))
            if job_id.isdigit() and (user is None or job_user == user):
                ids.append(job_id)
        return ids

    def live_names(self, names: list[str]) -> set[str] | None:
        result = self.runner.run(["squeue", "-h", *([] if self.as_owner else ["--me"]),
                                  "-t", "all", "-n", ",".join(names), "-o", "%j"])
        if result.returncode != 0:
            return None
        return {line.strip() for line in result.stdout.splitlines()}

    def close(self) -> None:
        self.runner.close()


class RestLink:
    """slurmctld through slurmrestd (backend.slurm.mode: rest): no process per call."""

    source = "slurmrestd"

    def __init__(self, rest: SlurmRestClient, runner: Runner):
        self.rest = rest
        self.runner = runner  # never run: kept so `calls` shows REST mode forks nothing

    def submit(self, script: str, owner: struct_passwd | None, what: str) -> str:
        if owner is None:
            return self.rest.submit(script)
        # with the owner's token (rest_auth/jwt), and the environment sudo gives sbatch in
        # CLI mode rather than the gateway's own
        return self.rest.submit(script, owner_environment(owner), owner=owner.pw_name)

    def rows(self, wanted: set[str]) -> list[JobRow]:
        return self.rest.jobs()

    def finished(self, missing: list[str]) -> tuple[list[JobRow], str]:
        return [], "not in slurmrestd's jobs list; no accounting in REST mode"

    def cancel(self, job_id: str) -> None:
        self.rest.cancel(job_id)

    def withdraw(self, job_id: str) -> None:
        """Hold, read, cancel if PENDING else release (SlurmRestClient.withdraw): the
        DELETE names the one element, which cancels that element only (measured:
        tests/backends/test_slurm_arrays.py, both modes)."""
        self.rest.withdraw(job_id)

    def job_ids_named(self, job_name: str, user: str | None) -> list[str]:
        # user None: the client lists its own user's jobs only
        return [row.job_id.partition("_")[0] for row in self.rest.jobs()
                if row.name == job_name and row.job_id.partition("_")[0].isdigit()
                and (user is None or row.user == user)]

    def live_names(self, names: list[str]) -> set[str] | None:
        try:
            rows = self.rest.jobs()
        except BackendError:
            return None
        return {row.name for row in rows} & set(names)

    def close(self) -> None:
        self.rest.close()
        self.runner.close()
