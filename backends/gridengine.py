"""Grid Engine (SGE, Son of Grid Engine, OGS): DRMAA 1.0 (mode drmaa) or qsub/qstat/qdel (mode cli).

The job script is rendered from ``templates/gridengine.sh.j2`` (or the
admin's ``backend.gridengine.template``), written to ``<task_dir>/gridengine.sh``
(chmod +x) and is the job's command. Its ``#$`` lines carry every job option
(name ``funnel-<task id>``, output/error files in the task dir, ``-pe`` for
cpus > 1, the memory resource per slot, ``-q`` from the first zone, the
allow-listed backend_parameters). In mode cli ``qsub`` reads them from the
script; in mode drmaa the same lines, joined, are the native specification, so
both modes submit the same job.

Mode drmaa (default). The Python ``drmaa`` package over a DRMAA 1.0 C library
(``drmaa_library``; Grid Engine's by default, but slurm-drmaa, pbs-drmaa and
other DRMAA 1.0 libraries work the same way when their native specification
accepts the template's lines: point ``template`` at a site template written for
that scheduler). The library runs in ONE long-lived helper process
(``python -m funnel_hpc.backends.gridengine drmaa-agent``) that holds the one DRMAA
session and answers JSON lines on its stdin/stdout, because:

- Debian's libdrmaa links libjemalloc, which cannot be dlopen()ed into a
  running Python ("cannot allocate memory in static TLS block"): the helper is
  started with ``GLIBC_TUNABLES=glibc.rtld.optional_static_tls=...``;
- a DRMAA session is per process and its C library is not thread-safe; the
  helper keeps it away from the gateway's threads (one request at a time).

DRMAA has no batch status call: a poll is ONE request to the helper, which
calls ``jobStatus`` once per job over its session (in-process library calls,
no external commands). Jobs that ended are reaped with ``wait(id, 0)``, which
gives the exit status, the signal and whether the job was aborted; that result
is kept (a reaped job is unknown to DRMAA afterwards). A job the session does
not know (submitted by an earlier gateway process and already gone, or never
existed) is LOST: the reconciler then trusts the worker's event log.

Mode cli. ``qsub -terse`` submits (several at once: ``parallel_submit``),
``qdel`` cancels and a poll is ONE ``qstat -xml -s prsz`` whatever the number of
jobs: pending, running, suspended and the last ``finished_jobs`` (qmaster
setting) finished "zombie" jobs. Grid Engine's qstat gives no exit status and
forgets a job some time after it ends.

Finished jobs, both modes. A job that ended (qstat state ``z``, or no longer
listed; in mode drmaa, one the DRMAA session does not know, e.g. after a
gateway restart) is looked up in Grid Engine's accounting file (accounting(5),
``backend.gridengine.accounting_file``, by default
``$SGE_ROOT/$SGE_CELL/common/accounting``): COMPLETED when ``failed`` and
``exit_status`` are 0, else FAILED with both in the reason. The file is read
incrementally (only the lines appended since the previous poll: no command, one
read per poll, and only when some job has ended; the first read goes through
the whole file once). qmaster writes it with a delay (``reporting_params
flush_time``, 15 s by default), so a job not found there yet, or a site without
accounting, is LOST (CANCELLED when this backend cancelled it): the worker's
event log tells how it ended.

Cancel: DRMAA ``control(id, TERMINATE)`` / ``qdel id``; a job that is gone
already is not an error. ``recover`` looks the job up by name in ``qstat``
(both modes, when qstat is installed; zombies included), then in the
accounting file.

Config (``backend.gridengine``): mode, template, drmaa_library, sge_root,
sge_cell, queue, parallel_environment, memory_resource, backend_parameters
(TES key -> qsub option), site, command_timeout, static_tls, accounting_file.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from funnel_hpc.backends.base import Backend, BackendError, JobState, JobStatus, SubmitRequest
from funnel_hpc.backends.commands import LocalRunner, Result, job_environment
from funnel_hpc.backends.templating import render, script_variables

DEFAULT_LIBRARY = "/usr/lib/gridengine-drmaa/lib/libdrmaa.so.1.0"

# DRMAA 1.0 job states (drmaa.JobState values) -> common job states.
# "done" and "failed" are refined from the reaped job's exit (see finished_status).
DRMAA_STATE_MAP: dict[str, JobState] = {
    "undetermined": JobState.UNKNOWN,
    "queued_active": JobState.PENDING,
    "system_on_hold": JobState.PENDING,
    "user_on_hold": JobState.PENDING,
    "user_system_on_hold": JobState.PENDING,
    "running": JobState.RUNNING,
    "system_suspended": JobState.RUNNING,
    "user_suspended": JobState.RUNNING,
    "user_system_suspended": JobState.RUNNING,
    "done": JobState.COMPLETED,
    "failed": JobState.FAILED,
}

# qstat state letters -> common job states; the first letter of this list found in
# a job's state string wins (Eqw: error, needs a person; dr: being deleted, still running).
QSTAT_STATE_LETTERS: tuple[tuple[str, JobState], ...] = (
    ("E", JobState.FAILED),
    ("r", JobState.RUNNING),
    ("t", JobState.RUNNING),
    ("s", JobState.RUNNING),
    ("S", JobState.RUNNING),
    ("T", JobState.RUNNING),
    ("R", JobState.PENDING),
    ("h", JobState.PENDING),
    ("q", JobState.PENDING),
    ("w", JobState.PENDING),
)

# qstat's state of a finished job kept by qmaster (finished_jobs), "zombie"
ZOMBIE = "z"
# accounting(5): colon-separated fields; these are the ones read here
ACCT_NAME, ACCT_NUMBER, ACCT_FAILED, ACCT_EXIT = 4, 5, 11, 12

SCRIPT_NAME = "gridengine.sh"
# finished statuses kept for jobs DRMAA has reaped (oldest dropped beyond this)
MAX_REMEMBERED = 10000


def map_qstat_state(letters: str) -> JobState:
    for letter, state in QSTAT_STATE_LETTERS:
        if letter in letters:
            return state
    return JobState.UNKNOWN


def native_specification(script: str) -> str:
    """The `#$` option lines of a rendered script, as one DRMAA native specification."""
    return " ".join(line[2:].strip() for line in script.splitlines() if line.startswith("#$"))


def parse_qstat_xml(text: str) -> dict[str, tuple[str, str]]:
    """`qstat -xml` -> {job id: (state letters, job name)}."""
    jobs: dict[str, tuple[str, str]] = {}
    for job in ET.fromstring(text).iter("job_list"):
        number = (job.findtext("JB_job_number") or "").strip()
        if number:
            jobs[number] = ((job.findtext("state") or "").strip(),
                            (job.findtext("JB_name") or "").strip())
    return jobs


@dataclass
class AccountingRecord:
    job_id: str
    name: str
    failed: int       # 0, or Grid Engine's failure code (accounting(5), "failed")
    exit_status: int  # the job script's exit status (128 + N: killed by signal N)

    def status(self) -> JobStatus:
        reason = f"accounting: failed={self.failed} exit={self.exit_status}"
        if self.failed == 0 and self.exit_status == 0:
            return JobStatus(JobState.COMPLETED, reason)
        return JobStatus(JobState.FAILED, reason)


class AccountingFile:
    """Grid Engine's accounting file, read incrementally: each refresh reads only the
    lines appended since the previous one (from the start again if the file shrank:
    rotated). Records of funnel-hpc jobs (named funnel-...) are kept, the newest
    MAX_REMEMBERED."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.by_id: dict[str, AccountingRecord] = {}

    def refresh(self) -> bool:
        """Read what was appended; False when there is no accounting file."""
        try:
            size = self.path.stat().st_size
            if size < self.offset:
                self.offset = 0
            if size == self.offset:
                return True
            with self.path.open("rb") as fh:
                fh.seek(self.offset)
                data = fh.read(size - self.offset)
        except OSError:
            return False
        end = data.rfind(b"\n") + 1  # whole lines only: a line being written waits
        for line in data[:end].decode(errors="replace").splitlines():
            record = parse_accounting_line(line)
            if record is not None and record.name.startswith("funnel-"):
                self.by_id.pop(record.job_id, None)  # a newer record of the same job wins
                self.by_id[record.job_id] = record
        while len(self.by_id) > MAX_REMEMBERED:
            self.by_id.pop(next(iter(self.by_id)))
        self.offset += end
        return True

    def newest_named(self, name: str) -> AccountingRecord | None:
        named = [r for r in self.by_id.values() if r.name == name]
        return max(named, key=lambda r: int(r.job_id)) if named else None


def parse_accounting_line(line: str) -> AccountingRecord | None:
    """One accounting(5) line, or None for comments and lines that do not parse."""
    if not line or line.startswith("#"):
        return None
    fields = line.split(":")
    try:
        return AccountingRecord(job_id=str(int(fields[ACCT_NUMBER])), name=fields[ACCT_NAME],
                                failed=int(fields[ACCT_FAILED]),
                                exit_status=int(fields[ACCT_EXIT]))
    except (IndexError, ValueError):
        return None


def finished_status(raw_state: str, info: dict[str, Any] | None, cancelled: bool,
                    wait_error: str = "") -> JobStatus:
    """A DRMAA job that ended ("done"/"failed"), from its reaped JobInfo (a dict)."""
    if cancelled:
        return JobStatus(JobState.CANCELLED, f"drmaa: {raw_state}, terminated by funnel-hpc")
    if info is None:  # e.g. deleted before it ran: no usage information
        return JobStatus(JobState.CANCELLED if raw_state == "failed" else JobState.LOST,
                         f"drmaa: {raw_state}, no exit information ({wait_error})")
    if info.get("wasAborted"):
        return JobStatus(JobState.CANCELLED, f"drmaa: {raw_state}, aborted (deleted by qdel "
                                             "or the scheduler before it could end)")
    if info.get("hasSignal"):
        return JobStatus(JobState.FAILED, f"drmaa: {raw_state}, killed by signal "
                                          f"{info.get('terminatedSignal')}")
    code = info.get("exitStatus")
    if info.get("hasExited") and code == 0:
        return JobStatus(JobState.COMPLETED, "drmaa: done exit=0")
    return JobStatus(JobState.FAILED, f"drmaa: {raw_state} exit={code}")


# ---------------------------------------------------------------- the DRMAA helper process

def agent_main() -> int:
    """`python -m funnel_hpc.backends.gridengine drmaa-agent`: one DRMAA session, JSON lines in and out."""
    import drmaa  # DRMAA_LIBRARY_PATH is in this process's environment

    session = drmaa.Session()
    session.initialize()
    cancelled: set[str] = set()
    print(json.dumps({"ok": True, "result": str(session.drmsInfo)}), flush=True)
    for line in sys.stdin:
        try:
            request = json.loads(line)
            result = _agent_call(drmaa, session, cancelled, request)
            reply = {"ok": True, "result": result}
        except Exception as exc:  # noqa: BLE001 - every error goes back to the caller
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                     "invalid_job": isinstance(exc, drmaa.errors.InvalidJobException)}
        print(json.dumps(reply), flush=True)
    session.exit()
    return 0


def _agent_call(drmaa: Any, session: Any, cancelled: set[str], request: dict) -> Any:
    op = request["op"]
    if op == "submit":
        template = session.createJobTemplate()
        try:
            template.remoteCommand = request["command"]
            template.workingDirectory = request["workdir"]
            template.nativeSpecification = request["native"]
            return session.runJob(template)
        finally:
            session.deleteJobTemplate(template)
    if op == "cancel":
        session.control(request["id"], drmaa.JobControlAction.TERMINATE)
        cancelled.add(request["id"])
        return None
    if op == "status":
        return {job_id: _agent_status(drmaa, session, cancelled, job_id)
                for job_id in request["ids"]}
    raise ValueError(f"unknown op {op!r}")


def _agent_status(drmaa: Any, session: Any, cancelled: set[str], job_id: str) -> dict:
    try:
        raw = str(session.jobStatus(job_id))
    except drmaa.errors.InvalidJobException:
        return {"state": JobState.LOST.value,
                "reason": "drmaa: this session does not know the job (ended before the "
                          "gateway's DRMAA session started, or never existed)"}
    except drmaa.errors.DrmaaException as exc:
        return {"state": JobState.UNKNOWN.value, "reason": f"drmaa jobStatus failed: {exc}"}
    if raw not in ("done", "failed"):
        state = DRMAA_STATE_MAP.get(raw, JobState.UNKNOWN)
        return {"state": state.value, "reason": f"drmaa: {raw}"}
    info, error = None, ""
    try:
        info = session.wait(job_id, drmaa.Session.TIMEOUT_NO_WAIT)._asdict()
        info.pop("resourceUsage", None)
    except Exception as exc:  # noqa: BLE001 - e.g. "no usage information" for deleted jobs
        error = str(exc)
    status = finished_status(raw, info, job_id in cancelled, error)
    cancelled.discard(job_id)
    return {"state": status.state.value, "reason": status.reason, "final": True}


class DrmaaAgent:
    """Client side of the helper process: started on first use, restarted if it died."""

    def __init__(self, env: dict[str, str], timeout: float):
        self.env, self.timeout = env, timeout
        self._proc: subprocess.Popen | None = None
        self._stderr: Any = None
        self._lock = threading.Lock()
        self.requests = 0

    def _start(self) -> subprocess.Popen:
        # stderr into a file: a chatty library must not block on a full pipe
        self._stderr = tempfile.TemporaryFile(mode="w+")
        proc = subprocess.Popen([sys.executable, "-m", "funnel_hpc.backends.gridengine", "drmaa-agent"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=self._stderr, text=True, env=self.env)
        hello = self._read(proc)
        if not hello.get("ok"):
            raise BackendError(f"DRMAA session failed: {hello.get('error')}", transient=True)
        return proc

    def _read(self, proc: subprocess.Popen) -> dict:
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(self.timeout)
        line = result[0] if result else ""
        if not line:
            proc.kill()
            self._stderr.seek(0)
            err = self._stderr.read() if not reader.is_alive() else "(no answer in time)"
            raise BackendError(f"DRMAA helper died: {err.strip()[-500:]}", transient=True)
        return json.loads(line)

    def call(self, request: dict) -> dict:
        with self._lock:
            self.requests += 1
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()
            try:
                self._proc.stdin.write(json.dumps(request) + "\n")
                self._proc.stdin.flush()
            except OSError as exc:
                self._proc = None
                raise BackendError(f"DRMAA helper gone: {exc}", transient=True) from None
            try:
                return self._read(self._proc)
            except BackendError:
                self._proc = None
                raise

    def close(self) -> None:
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.stdin.close()
                try:
                    self._proc.wait(5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
            self._proc = None


# ---------------------------------------------------------------- the backend

class GridEngineBackend(Backend):
    name = "gridengine"

    def __init__(self, options: dict[str, Any], config: dict[str, Any]):
        super().__init__(options, config)
        self.mode = str(options.get("mode") or "drmaa")
        if self.mode not in ("drmaa", "cli"):
            raise ValueError(f"backend.gridengine.mode must be drmaa or cli, not {self.mode!r}")
        self.template = options.get("template") or "gridengine.sh.j2"
        self.supported_parameters = frozenset(
            k.lower() for k in (options.get("backend_parameters") or {}))
        timeout = float(options.get("command_timeout", 60))
        self.env = self._environment()
        self.runner = LocalRunner(timeout, env=self.env)
        self.agent = DrmaaAgent(self.env, timeout) if self.mode == "drmaa" else None
        # qsub processes are independent; the DRMAA helper answers one request at a time
        self.parallel_submit = self.mode == "cli"
        self._finished: dict[str, JobStatus] = {}  # reaped by DRMAA, or cancelled in cli mode
        self.accounting = AccountingFile(Path(
            options.get("accounting_file")
            or Path(self.env["SGE_ROOT"]) / self.env["SGE_CELL"] / "common" / "accounting"))

    def _environment(self) -> dict[str, str]:
        env = job_environment()  # without the gateway's FUNNEL_ configuration
        env["SGE_ROOT"] = str(self.options.get("sge_root") or env.get("SGE_ROOT")
                              or "/var/lib/gridengine")
        env["SGE_CELL"] = str(self.options.get("sge_cell") or env.get("SGE_CELL") or "default")
        env["DRMAA_LIBRARY_PATH"] = str(self.options.get("drmaa_library") or DEFAULT_LIBRARY)
        static_tls = int(self.options.get("static_tls", 4096) or 0)
        if static_tls and "GLIBC_TUNABLES" not in env:
            env["GLIBC_TUNABLES"] = f"glibc.rtld.optional_static_tls={static_tls}"
        return env

    # ---- commands (mode cli, recover) ----

    def _run(self, argv: list[str], input: str | None = None) -> Result:
        return self.runner.run(argv, input=input)

    # ---- submit / cancel ----

    def script_variables(self, request: SubmitRequest) -> dict[str, Any]:
        variables = script_variables(request, self.options)
        ram_mb, cpus = variables["ram_mb"], variables["cpus"]
        variables.update(
            parallel_environment=str(self.options.get("parallel_environment") or ""),
            memory_resource=str(self.options.get("memory_resource") or ""),
            mem_per_slot_mb=int(math.ceil(ram_mb / cpus)) if ram_mb else None,
        )
        return variables

    def render_script(self, request: SubmitRequest) -> str:
        return render(self.template, self.script_variables(request))

    def submit(self, request: SubmitRequest) -> str:
        try:
            script = self.render_script(request)
        except ValueError as exc:
            raise BackendError(f"cannot render the Grid Engine script: {exc}") from None
        path = request.task_dir / SCRIPT_NAME
        path.write_text(script)
        path.chmod(0o755)
        if self.mode == "cli":
            result = self._run(["qsub", "-terse", str(path)])
            job_id = result.stdout.strip().split(".")[0]
            if result.returncode != 0 or not job_id.isdigit():
                raise BackendError(f"qsub failed ({result.returncode}): "
                                   f"{(result.stderr or result.stdout).strip()[:500]}",
                                   transient=result.returncode in (124, 127))
            return job_id
        reply = self.agent.call({"op": "submit", "command": str(path),
                                 "workdir": str(request.task_dir),
                                 "native": native_specification(script)})
        if not reply["ok"]:
            raise BackendError(f"DRMAA runJob failed: {reply['error'][:500]}")
        return str(reply["result"])

    def cancel(self, job_id: str) -> None:
        job_id = str(job_id)
        if job_id in self._finished:
            return
        if self.mode == "cli":
            result = self._run(["qdel", job_id])
            text = result.stderr + result.stdout
            if result.returncode == 0:
                self._remember(job_id, JobStatus(JobState.CANCELLED, "qdel by funnel-hpc"))
            elif "does not exist" not in text:
                raise BackendError(f"qdel {job_id} failed: {text.strip()[:300]}",
                                   transient=result.returncode in (124, 127))
            return
        reply = self.agent.call({"op": "cancel", "id": job_id})
        if not reply["ok"] and not reply.get("invalid_job"):
            raise BackendError(f"DRMAA control({job_id}, TERMINATE) failed: "
                               f"{reply['error'][:300]}")

    def _remember(self, job_id: str, status: JobStatus) -> None:
        self._finished[job_id] = status
        while len(self._finished) > MAX_REMEMBERED:
            self._finished.pop(next(iter(self._finished)))

    # ---- poll ----

    def poll(self, job_ids: list[str]) -> dict[str, JobStatus]:
        wanted = [str(j) for j in dict.fromkeys(job_ids)]
        out = {j: self._finished[j] for j in wanted if j in self._finished}
        ask = [j for j in wanted if j not in out]
        if not ask:
            return out
        if self.mode == "cli":
            out.update(self._poll_qstat(ask))
            return out
        try:
            reply = self.agent.call({"op": "status", "ids": ask})
        except BackendError as exc:
            return {**out, **{j: JobStatus(JobState.UNKNOWN, str(exc)) for j in ask}}
        if not reply["ok"]:
            reason = f"DRMAA status failed: {reply['error'][:300]}"
            return {**out, **{j: JobStatus(JobState.UNKNOWN, reason) for j in ask}}
        for job_id, answer in reply["result"].items():
            status = JobStatus(JobState(answer["state"]), answer["reason"])
            if answer.get("final"):
                self._remember(job_id, status)
            out[job_id] = status
        ended = [j for j in ask if out[j].state == JobState.LOST]
        out.update(self._accounted(ended, {j: out[j] for j in ended}))
        return out

    def _accounted(self, job_ids: list[str], otherwise: dict[str, JobStatus]
                   ) -> dict[str, JobStatus]:
        """Jobs that ended: their accounting record's status, else otherwise[job id]."""
        if not job_ids or not self.accounting.refresh():
            return otherwise
        out = {}
        for job_id in job_ids:
            record = self.accounting.by_id.get(job_id)
            if record is None:
                out[job_id] = otherwise[job_id]
                continue
            out[job_id] = record.status()
            self._remember(job_id, out[job_id])
        return out

    def _qstat(self) -> dict[str, tuple[str, str]] | str:
        """This user's jobs (pending, running, suspended, recently finished) from one
        `qstat -xml -s prsz`, or the error text."""
        result = self._run(["qstat", "-xml", "-s", "prsz"])
        if result.returncode != 0:
            return f"qstat failed: {(result.stderr or result.stdout).strip()[:300]}"
        try:
            return parse_qstat_xml(result.stdout)
        except ET.ParseError as exc:
            return f"qstat printed unreadable XML: {exc}"

    def _poll_qstat(self, job_ids: list[str]) -> dict[str, JobStatus]:
        jobs = self._qstat()
        if isinstance(jobs, str):
            return {j: JobStatus(JobState.UNKNOWN, jobs) for j in job_ids}
        out: dict[str, JobStatus] = {}
        ended: dict[str, JobStatus] = {}
        for job_id in job_ids:
            letters = jobs[job_id][0] if job_id in jobs else ""
            if letters == ZOMBIE:
                ended[job_id] = JobStatus(JobState.LOST, "qstat: finished (z), no accounting "
                                                         "record (yet)")
            elif job_id in jobs:
                out[job_id] = JobStatus(map_qstat_state(letters), f"qstat: {letters}")
            else:
                ended[job_id] = JobStatus(JobState.LOST, "qstat no longer lists this job "
                                                         "(Grid Engine forgets jobs that "
                                                         "ended) and accounting has no record")
        out.update(self._accounted(list(ended), ended))
        return out

    def recover(self, task_id: str, task_dir: Path) -> str | None:
        """The newest job named funnel-<task id>: in qstat (zombies too), else in accounting."""
        name = f"funnel-{task_id}"
        jobs = self._qstat()
        if not isinstance(jobs, str):
            ids = [j for j, (_, job_name) in jobs.items() if job_name == name]
            if ids:
                return max(ids, key=int)
        if self.accounting.refresh():
            record = self.accounting.newest_named(name)
            if record is not None:
                return record.job_id
        return None

    def close(self) -> None:
        if self.agent is not None:
            self.agent.close()


if __name__ == "__main__":
    if sys.argv[1:] == ["drmaa-agent"]:
        sys.exit(agent_main())
    sys.exit("usage: python -m funnel_hpc.backends.gridengine drmaa-agent")
