"""Slurm through slurmrestd (backend.slurm.mode: rest): submit, list, cancel over HTTP.

The same jobs as CLI mode, without a process per command: ``submit`` posts the rendered
script with the job properties its #SBATCH header asks for (backends/slurm_rest_script.py:
slurmrestd 22.05 does not read the header itself), ``jobs`` is ONE GET of the jobs list
giving the rows ``squeue -r --me -t all`` would (backends/slurm_rest_jobs.py), ``cancel``
one DELETE. The OpenAPI version is the newest of SUPPORTED_VERSIONS the daemon serves,
read once from its /openapi/v3 document. All requests share one kept-open connection
(backends/slurm_rest_http.py). SlurmBackend uses it in mode rest through RestLink
(backends/slurm_link.py).

Errors are BackendError, transient when slurmrestd cannot be reached or says slurmctld
cannot (the Slurm error numbers and words below), as CLI mode's ``commands.failure``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from funnel_hpc.backends.base import BackendError
from funnel_hpc.backends.commands import job_environment
from funnel_hpc.backends.slurm_rest_http import Answer, RestTransport, default_user
from funnel_hpc.backends.slurm_rest_jobs import JobRow, parse_jobs
from funnel_hpc.backends.slurm_rest_script import job_properties

if TYPE_CHECKING:
    from funnel_hpc.backends.slurm_rest_tokens import OwnerTokens
    from funnel_hpc.core.config import SlurmRestOptions

# OpenAPI plugin versions this client speaks, newest first (Debian 12's slurmrestd 22.05
# serves v0.0.36-v0.0.38; v0.0.36 names the output property differently, v0.0.39 of
# Slurm 23.02 changed the shape of most fields: neither is spoken here)
SUPPORTED_VERSIONS = ("v0.0.38", "v0.0.37")
OPENAPI_PATH = "/openapi/v3"
_SERVED = re.compile(r"/slurm/(v\d+\.\d+\.\d+)/")

# an id a path may carry: a job, or an array element (no "/", "?", "..")
JOB_ID = re.compile(r"\d+(?:_\d+)?")

# Slurm error numbers (slurm_errno.h) of "slurmctld could not be reached": connection,
# send, receive and shutdown errors of the protocol layer and of slurmctld's connection,
# socket timeouts
UNREACHABLE_ERRNOS = frozenset({1001, 1002, 1003, 1004, 1800, 1801, 1802, 1803, 1804,
                                5004, 5005})
# of which: slurmctld closed the connection ("Zero Bytes were transmitted or received"),
# also its answer to a JWT it refuses (measured: slurmrestd 22.05 passes tokens on)
CLOSED_ERRNO = 5005
# and its words, as the command-line tools print them too (CLI mode's, slurm_link.py)
UNREACHABLE_WORDS = ("Unable to contact slurm controller", "Socket timed out",
                     "Connection refused", "Zero Bytes were transmitted",
                     "Communication connection failure")
# a job slurmctld no longer knows, or one that already ended: cancel has nothing to do
GONE_ERRNOS = frozenset({2017, 2021, 2084})  # invalid job id, already done, finished
GONE_WORDS = ("Invalid job id specified", "already completing or completed",
              "Job has already finished")
# the one state a withdraw cancels in (as scancel --state=PENDING)
PENDING = "PENDING"


def _errnos(answer: Answer) -> set[int]:
    numbers = set()
    for error in answer.errors():
        for key in ("error_number", "error_code"):
            if isinstance(error.get(key), int):
                numbers.add(error[key])
    return numbers


def failure(what: str, answer: Answer) -> BackendError:
    """The BackendError of a refused request: "slurmrestd <what> failed (<status>): <words>",
    transient when slurmctld could not be reached or the gateway's own credentials were
    refused (401: a token expired or forged, the wrong account), which is no task's
    fault: its submission waits, and the instance's health row says why."""
    words = answer.words()
    transient = answer.status == 401 or bool(_errnos(answer) & UNREACHABLE_ERRNOS) or any(
        phrase in words for phrase in UNREACHABLE_WORDS)
    if answer.status == 401:
        words += (" (rest_auth/local accepts only the uid slurmrestd runs as; with "
                  "rest_auth/jwt, check backend.slurm.rest.user and token_file)")
    elif CLOSED_ERRNO in _errnos(answer):
        words += (" (slurmctld closed the connection: with rest_auth/jwt, what it does "
                  "for a token it does not accept, expired or signed with another key)")
    return BackendError(f"slurmrestd {what} failed ({answer.status}): {words}",
                        transient=transient)


def _gone(answer: Answer) -> bool:
    return bool(_errnos(answer) & GONE_ERRNOS) or any(
        phrase in answer.words() for phrase in GONE_WORDS)


def _checked_id(job_id: str) -> str:
    job_id = str(job_id)
    if not JOB_ID.fullmatch(job_id):
        raise BackendError(f"not a Slurm job id: {job_id[:40]!r}")
    return job_id


class SlurmRestClient:
    """Submit, list and cancel Slurm jobs through one slurmrestd."""

    def __init__(self, transport: RestTransport, user: str,
                 environment: Mapping[str, str] | None = None, cwd: str | None = None,
                 version: str | None = None, owner_tokens: OwnerTokens | None = None):
        self.transport = transport
        self.user = user  # the gateway's account: its token's
        # submit_as_owner (rest_auth/jwt): each owner's jobs submitted with the owner's
        # token, and `jobs` lists every user's (as squeue -j would)
        self.owner_tokens = owner_tokens
        # what sbatch would give the job: the gateway's environment without FUNNEL_
        # variables, and its working directory (the script's --chdir wins)
        self.environment = dict(job_environment() if environment is None else environment)
        self.cwd = cwd or os.getcwd()
        self._version = version  # the OpenAPI version; None: discovered on first use

    @classmethod
    def from_options(cls, rest: SlurmRestOptions,
                     owner_tokens: OwnerTokens | None = None) -> SlurmRestClient:
        """The client backend.slurm.rest describes (checked at load by core/config.py)."""
        user = rest.user or default_user()
        transport = RestTransport(socket_path="" if rest.url else rest.socket, url=rest.url,
                                  token_file=rest.token_file, user=user,
                                  timeout=rest.timeout)
        return cls(transport, user, owner_tokens=owner_tokens)

    @property
    def calls(self) -> int:
        """Requests sent (as a command runner's `calls`)."""
        return self.transport.requests

    # ---- the API version ----

    @property
    def version(self) -> str:
        if self._version is None:
            self._version = self.discover()
        return self._version

    def discover(self) -> str:
        """The newest supported OpenAPI version the daemon serves, from its /openapi/v3
        document. BackendError: transient when unreachable, else naming what it serves."""
        answer = self.transport.request("GET", OPENAPI_PATH)
        if answer.status != 200 or not isinstance(answer.body, dict):
            raise failure("openapi", answer)
        paths = answer.body.get("paths")
        paths = paths if isinstance(paths, dict) else {}
        for version in SUPPORTED_VERSIONS:
            if {f"/slurm/{version}/jobs", f"/slurm/{version}/job/submit"} <= set(paths):
                return version
        served = sorted({m.group(1) for path in paths for m in [_SERVED.match(path)] if m})
        raise BackendError(f"slurmrestd at {self.transport.where} serves OpenAPI "
                           f"{', '.join(served) or 'no Slurm version'}; this client speaks "
                           f"{', '.join(SUPPORTED_VERSIONS)} (load one with slurmrestd -s)")

    def _path(self, rest: str) -> str:
        return f"/slurm/{self.version}/{rest}"

    # ---- submit ----

    def submit(self, script: str, environment: Mapping[str, str] | None = None,
               owner: str | None = None) -> str:
        """Submit a rendered script (a job array when its header has --array); return the
        job id (an array's job id). owner: submitted as that account, with its token
        (owner_tokens). BackendError naming a header option REST mode cannot map, or
        slurmrestd's words."""
        acting = None
        if owner is not None:
            if self.owner_tokens is None:
                raise BackendError("REST mode submits as another account only with "
                                   "submit_as_owner and rest.url (rest_auth/jwt)")
            acting = (owner, self.owner_tokens.token(owner))
        properties = job_properties(script)
        properties.setdefault("current_working_directory", self.cwd)
        properties["environment"] = dict(self.environment if environment is None
                                         else environment)
        answer = self.transport.request("POST", self._path("job/submit"),
                                        {"script": script, "job": properties}, acting)
        job_id = answer.body.get("job_id") if isinstance(answer.body, dict) else None
        # a 200 may carry errors that are notes ("Job is in held state..."): the id counts
        if answer.status == 200 and isinstance(job_id, int) and not isinstance(job_id, bool):
            return str(job_id)
        if answer.status == 401 and owner is not None and self.owner_tokens is not None:
            self.owner_tokens.forget(owner)  # revoked or a new key: minted anew next time
        error = failure("submit", answer)
        if answer.status == 400:  # "Failure during parsing": say what was sent
            error.args = (f"{error} (job properties: {', '.join(sorted(properties))})",)
        raise error

    # ---- list ----

    def jobs(self) -> list[JobRow]:
        """This user's jobs and array elements (with owner_tokens: every user's), one row
        each, from ONE GET of the jobs list (finished ones while slurmctld keeps them:
        MinJobAge)."""
        answer = self.transport.request("GET", self._path("jobs"))
        if answer.status != 200:
            # transient whatever the words: slurmrestd 22.05 answers a controller that is
            # down with "Failed while looking for jobs" alone (measured), and a list that
            # could not be read is never "no such job" (recover's contract)
            error = failure("jobs", answer)
            error.transient = True
            raise error
        return parse_jobs(answer.body, None if self.owner_tokens else self.user)

    def job(self, job_id: str) -> JobRow | None:
        """The row of one job or element, or None when slurmctld does not know it. An
        element is looked up through its array's job id: slurmrestd finds "123_4" only
        once slurmctld has split it out of the array's pending rest (measured)."""
        array_id = _checked_id(job_id).partition("_")[0]
        answer = self.transport.request("GET", self._path(f"job/{array_id}"))
        if answer.status != 200:
            if _gone(answer):
                return None
            raise failure(f"job {job_id}", answer)
        rows = [row for row in parse_jobs(answer.body) if row.job_id == job_id]
        return rows[0] if rows else None

    # ---- cancel ----

    def cancel(self, job_id: str) -> None:
        """Cancel a job, an array (its job id: every element) or one element ("123_4").
        Nothing happens, and no error, for a job that ended or that slurmctld forgot."""
        answer = self.transport.request("DELETE", self._path(f"job/{_checked_id(job_id)}"))
        if answer.status != 200 and not _gone(answer):
            raise failure(f"cancel {job_id}", answer)

    def withdraw(self, job_id: str) -> bool:
        """Cancel the job only if it has not started (scancel --state=PENDING), in three
        requests with no window: hold it (a held job cannot start; a running one goes on),
        read its state, then cancel it if it is PENDING or release it again if it started
        before the hold. True when it was cancelled; False when it runs, ended or is gone."""
        job_id = _checked_id(job_id)
        held = self.transport.request("POST", self._path(f"job/{job_id}"), {"hold": True})
        # an array element's update answers 200 with "job array update failed" even when
        # it held the element, and 200 with "Job has already finished" when it ended: the
        # state read next is the truth
        if _gone(held):
            return False
        if held.status != 200:
            raise failure(f"hold {job_id}", held)
        row = self.job(job_id)
        if row is None:
            return False
        if row.state == PENDING:
            self.cancel(job_id)
            return True
        released = self.transport.request("POST", self._path(f"job/{job_id}"),
                                          {"hold": False})
        if released.status != 200 and not _gone(released):
            raise failure(f"release {job_id}", released)
        return False

    def close(self) -> None:
        self.transport.close()
