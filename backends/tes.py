"""tes: forward tasks to another TES 1.1 server (POST /tasks, :cancel, a tagged list walk).

Submit: the FULL task minus what is the gateway's own (id, state, logs, creation_time),
its tags plus three of ours: the gateway's tag (``tag_key``: ``tag_value``, default a
random id kept in ``<work_dir>/tes-gateway-id``), the local task id and a submission
nonce; ``backend_parameters`` pass through the admin's allow-list (TES key -> the
remote's key). The remote's task id is the job id. Before the POST the nonce, after it
the remote id go into the task's event log (metadata), so ``recover`` finds the remote
task of a submission the gateway died in (tags: gateway, task id, nonce) and never
submits twice.

Poll: ONE walk over ``GET /tasks?view=BASIC`` filtered by the gateway's tag, page by page
(``page_size``), stopping once every asked job was seen; a job not listed is LOST only
when ``GET /tasks/{id}`` answers 404. Remote states map to job states by STATE_MAP. The
news of a job whose BASIC view changed (state, executors started or ended, outputs) is
written to the task's event log (backends/tes_events.py), from its FULL view when the job
ended or an executor ended (BASIC lacks stdout, stderr and system logs): the reconciler
folds that log like a worker's, in the same tick, so a COMPLETE remote task ends COMPLETE
here with its executor logs and outputs. A terminal job is reported only once its log
holds the end (else UNKNOWN, asked again). Cost per tick: ceil(tasks listed / page_size)
calls (in-flight tasks are usually the newest, listed first), plus one GET per job that
ended (1,000 trivial tasks: 1,000 GETs in all).

Cancel: ``POST /tasks/{id}:cancel``; a remote task that is unknown (404) or already ended
is fine. Admission (``check_task``): inputs and outputs must be URLs the remote can reach
(file:// and bare paths are refused at POST).

The remote is not trusted: its answers are bounded (tes_client.py), type-checked, its ids
checked before they go into a URL path, its tasks mapped to local ones only through this
gateway's own records (a task's event log names its remote id), and nothing it says
becomes a path.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlparse

from funnel_hpc.backends import files
from funnel_hpc.backends.base import Backend, BackendError, JobState, JobStatus, SubmitRequest
from funnel_hpc.backends.templating import TemplateValueError, map_backend_parameters
from funnel_hpc.backends.tes_client import REMOTE_ID, RemoteError, TesClient
from funnel_hpc.backends.tes_events import EVENTS_FILE, RemoteEventLog, as_list, last_attempt
from funnel_hpc.core.config import TesOptions

log = logging.getLogger(__name__)

# TES task state -> common job state
STATE_MAP: dict[str, JobState] = {
    "QUEUED": JobState.PENDING,
    "INITIALIZING": JobState.PENDING,
    "RUNNING": JobState.RUNNING,
    "PAUSED": JobState.RUNNING,    # judgement call: started, not finished
    "COMPLETE": JobState.COMPLETED,
    "EXECUTOR_ERROR": JobState.FAILED,
    "SYSTEM_ERROR": JobState.FAILED,
    "CANCELED": JobState.CANCELLED,
    # judgement call: the remote stops it; a local task not being canceled then ends
    # SYSTEM_ERROR ("stopped outside the gateway") at once instead of waiting for it
    "CANCELING": JobState.CANCELLED,
    "PREEMPTED": JobState.PREEMPTED,
    "UNKNOWN": JobState.UNKNOWN,   # TES's own "the server does not know now"
}
FINISHED_REMOTE = frozenset(state for state, job in STATE_MAP.items() if job.finished)

TASK_TAG = "funnel-hpc-task-id"          # the local task id, on every forwarded task
SUBMISSION_TAG = "funnel-hpc-submission"  # the submission's nonce (recover)
# metadata keys of the task's event log (they show in its logs[].metadata)
REMOTE_ID_KEY, REMOTE_URL_KEY, SUBMISSION_KEY = "remote_id", "remote_url", "tes_submission"
GATEWAY_ID_FILE = "tes-gateway-id"        # in the work dir: the default tag_value
TASK_FILE = "task.json"                   # written by the gateway in each task dir
NOT_FORWARDED = ("id", "state", "logs", "creation_time")
TASK_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # local task ids (gateway/store/tasks.py)
GATEWAY_ID = re.compile(r"[0-9a-f]{32}")
PARAMETER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")
MAX_PAGES = 1000         # of one walk (a remote answering tokens forever stops here)
MAX_TASK_FILE = 64 << 20


def gateway_id(work_dir: Path) -> str:
    """The gateway's random id, made once in <work_dir>/tes-gateway-id (mode 600); the
    replicas of one gateway share the work dir, hence the id. Made whole under a temporary
    name and linked in, so a replica starting at the same time reads one id or the other,
    never a part."""
    path = work_dir / GATEWAY_ID_FILE
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        made = work_dir / f".{GATEWAY_ID_FILE}.{secrets.token_hex(8)}"
        fd = os.open(made, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, (secrets.token_hex(16) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(made, path)
        except FileExistsError:
            pass  # another replica's came first: theirs is the id
        finally:
            os.unlink(made)
        text = path.read_text().strip()
    if not GATEWAY_ID.fullmatch(text):
        raise ValueError(f"{path}: not a gateway id (32 hex digits); set "
                         "backend.tes.tag_value or restore the file")
    return text


class Progress(NamedTuple):
    """What in a BASIC view says there is news to write."""

    state: Any
    attempts: int
    started: int   # executors started
    ended: int     # executors ended
    outputs: int


QUEUED = Progress("QUEUED", 0, 0, 0, 0)  # a task just submitted


def progress(remote: dict[str, Any]) -> Progress:
    attempt = last_attempt(remote)
    executors = [entry for entry in as_list(attempt.get("logs")) if isinstance(entry, dict)]
    return Progress(remote.get("state"), len(as_list(remote.get("logs"))),
                    sum(1 for entry in executors if entry.get("start_time")),
                    sum(1 for entry in executors if entry.get("end_time")),
                    len(as_list(attempt.get("outputs"))))


def _tags(remote: dict[str, Any]) -> dict[str, Any]:
    tags = remote.get("tags")
    return tags if isinstance(tags, dict) else {}


class TesBackend(Backend):
    """Forwards tasks to another TES server and writes their event logs from its answers."""

    kind = "tes"
    parallel_submit = True  # one HTTP session per thread

    options: TesOptions

    def __init__(self, options: TesOptions, work_dir: Path,
                 on_change: Callable[[], None] | None = None, name: str | None = None):
        super().__init__(options, work_dir, on_change, name)
        if not options.tag_key:
            raise ValueError("backend.tes.tag_key: must not be empty")
        if not 1 <= options.page_size <= 2047:
            raise ValueError("backend.tes.page_size: must be between 1 and 2047 (TES)")
        self.client = TesClient(options)
        self.tag = (options.tag_key, options.tag_value or gateway_id(work_dir))
        self.page_size = options.page_size
        self._lock = threading.Lock()
        self._logs: dict[str, RemoteEventLog] = {}  # job id -> its task's event log
        self._seen: dict[str, Progress] = {}  # job id -> the progress written

    # ---- admission ----

    @classmethod
    def check_task(cls, task: dict[str, Any]) -> str | None:
        """file:// URLs (and bare paths) name this host's files: the remote cannot reach them."""
        for kind in ("inputs", "outputs"):
            for index, item in enumerate(task.get(kind) or []):
                if not isinstance(item, dict) or (kind == "inputs" and "content" in item):
                    continue
                url = str(item.get("url") or "")
                if url.startswith("/") or urlparse(url).scheme.lower() in ("file", ""):
                    return (f"{kind}.{index}.url: file:// URLs cannot reach the remote TES "
                            "server this task is forwarded to (use a URL it can reach: s3://, "
                            "gs://, https://, ftp://, or an input's content)")
        return None

    # ---- submit ----

    def remote_task(self, request: SubmitRequest, nonce: str) -> dict[str, Any]:
        """The task document POSTed to the remote (no call made)."""
        body = {key: value for key, value in request.task.items() if key not in NOT_FORWARDED}
        body["tags"] = {**(request.task.get("tags") or {}), self.tag[0]: self.tag[1],
                        TASK_TAG: request.task_id, SUBMISSION_TAG: nonce}
        resources = dict(request.task.get("resources") or {})
        if resources.get("backend_parameters"):
            try:
                mapped = map_backend_parameters(request.backend_parameters,
                                                self.options.backend_parameters,
                                                PARAMETER_NAME, "a TES backend_parameters key")
            except TemplateValueError as exc:
                raise BackendError(str(exc)) from None
            resources["backend_parameters"] = dict(mapped)
        if resources:
            body["resources"] = resources
        return body

    def submit(self, request: SubmitRequest) -> str:
        if not TASK_ID.fullmatch(request.task_id):
            raise BackendError(f"tes: {request.task_id!r} is not a task id")
        events = RemoteEventLog(self.work_dir, request.task_id,
                                len(request.task.get("executors") or []))
        held = events.fold.task_log["metadata"]
        nonce = held.get(SUBMISSION_KEY) if not held.get(REMOTE_ID_KEY) else None
        if nonce:  # this attempt was POSTed before and the answer lost (the remote went
            # away): adopt the remote task if the POST made one, never make a second
            found = self._find(request.task_id, nonce)
            if found:
                return self._record(events, found)
        else:
            nonce = secrets.token_hex(8)
            try:  # before the POST: recover then knows this attempt may have a remote task
                events.note({SUBMISSION_KEY: nonce, REMOTE_URL_KEY: self.client.url})
            except OSError as exc:
                raise BackendError(f"tes: cannot write the event log of {request.task_id}: "
                                   f"{exc.strerror or exc}") from None
        answer = self.client.call("POST", "/tasks", body=self.remote_task(request, nonce))
        remote_id = answer.get("id")
        if not isinstance(remote_id, str) or not REMOTE_ID.fullmatch(remote_id):
            raise BackendError("tes POST /tasks: the answer holds no usable task id: "
                               f"{str(remote_id)[:80]!r}")
        return self._record(events, remote_id)

    def _record(self, events: RemoteEventLog, remote_id: str) -> str:
        """The remote id in the task's event log (what maps it to the task from now on)."""
        with self._lock:
            other = self._logs.get(remote_id)
        if other is not None and other.task_id != events.task_id:
            raise BackendError(f"tes: the remote gave task {events.task_id} the id "
                               f"{remote_id} of task {other.task_id}'s remote task")
        try:
            events.note({REMOTE_ID_KEY: remote_id})
        except OSError as exc:
            self._cancel_quietly(remote_id)
            raise BackendError(f"tes: cannot record remote task {remote_id}: "
                               f"{exc.strerror or exc}") from None
        with self._lock:
            self._logs[remote_id] = events
            self._seen[remote_id] = QUEUED
        return remote_id

    def _find(self, task_id: str, nonce: str) -> str | None:
        """The remote task of a submission, by its tags (gateway, task id, nonce); None
        when the remote has none. BackendError(transient=True) when it could not be asked."""
        wanted = {self.tag[0]: self.tag[1], TASK_TAG: task_id, SUBMISSION_TAG: nonce}
        params = {"view": "BASIC", "tag_key": list(wanted), "tag_value": list(wanted.values())}
        try:
            answer = self.client.call("GET", "/tasks", params=params)
        except BackendError as exc:  # could not ask: not "no such task" (base.py)
            raise BackendError(str(exc), transient=True) from None
        # the tags checked here too: a server that ignores tag filters lists everything
        found = [item["id"] for item in as_list(answer.get("tasks"))
                 if isinstance(item, dict) and isinstance(item.get("id"), str)
                 and REMOTE_ID.fullmatch(item["id"])
                 and all(_tags(item).get(key) == value for key, value in wanted.items())]
        if len(found) > 1:
            log.warning("tes: task %s has %d remote tasks for one submission: %s",
                        task_id, len(found), ", ".join(found))
        return found[0] if found else None

    def _cancel_quietly(self, remote_id: str) -> None:
        try:
            self.cancel(remote_id)
        except BackendError as exc:
            log.warning("tes: remote task %s left behind: %s", remote_id, exc)

    # ---- cancel ----

    def cancel(self, job_id: str) -> None:
        if not REMOTE_ID.fullmatch(job_id):
            return  # not an id this backend made: nothing to stop
        try:
            self.client.call("POST", self.client.task_path(job_id) + ":cancel", body={})
        except RemoteError as exc:
            if exc.transient or exc.status in (401, 403):
                raise
            if exc.status == 404:
                return  # the remote does not know it (any more): nothing to stop
            # some servers refuse to cancel an ended task: fine when it has ended
            state = self.client.call("GET", self.client.task_path(job_id),
                                     params={"view": "MINIMAL"}).get("state")
            if state not in FINISHED_REMOTE:
                raise

    # ---- poll ----

    def poll(self, job_ids: list[str]) -> dict[str, JobStatus]:
        wanted = {str(job_id) for job_id in job_ids}
        try:
            listed = self._walk(wanted)
        except BackendError as exc:
            return {job_id: JobStatus(JobState.UNKNOWN, str(exc)) for job_id in wanted}
        except Exception as exc:  # poll never raises (backends/base.py): logged, UNKNOWN
            log.exception("tes: the task walk failed")
            return {job_id: JobStatus(JobState.UNKNOWN, f"tes: {exc}") for job_id in wanted}
        statuses: dict[str, JobStatus] = {}
        for job_id in sorted(wanted):
            try:
                statuses[job_id] = self._status(job_id, listed.get(job_id))
            except Exception as exc:  # one job's trouble stays its own (logged)
                log.exception("tes: job %s", job_id)
                statuses[job_id] = JobStatus(JobState.UNKNOWN, f"tes: {exc}")
        # no on_change: the logs are written inside the tick, before the reconciler reads
        # them (a wake-up made it tick again at once and walk the remote for nothing)
        return statuses

    def _walk(self, wanted: set[str]) -> dict[str, dict[str, Any]]:
        """BASIC views of the wanted jobs among the gateway's tagged tasks, page by page
        until all were seen or the pages end."""
        params: dict[str, Any] = {"view": "BASIC", "tag_key": self.tag[0],
                                  "tag_value": self.tag[1], "page_size": self.page_size}
        found: dict[str, dict[str, Any]] = {}
        tokens: set[str] = set()
        for _ in range(MAX_PAGES):
            answer = self.client.call("GET", "/tasks", params=params)
            tasks = answer.get("tasks")
            for item in tasks if isinstance(tasks, list) else []:
                job_id = item.get("id") if isinstance(item, dict) else None
                if isinstance(job_id, str) and job_id in wanted and job_id not in found:
                    found[job_id] = item
            token = answer.get("next_page_token")
            if not token or not isinstance(token, str) or token in tokens or not tasks \
                    or len(found) == len(wanted):
                break
            tokens.add(token)
            params["page_token"] = token
        return found

    def _status(self, job_id: str, remote: dict[str, Any] | None) -> JobStatus:
        """The job's state, its news written to its task's event log first."""
        if remote is None:
            if not REMOTE_ID.fullmatch(job_id):
                return JobStatus(JobState.LOST, "tes: not a remote task id")
            try:
                remote = self.client.call("GET", self.client.task_path(job_id),
                                          params={"view": "BASIC"})
            except RemoteError as exc:
                if exc.status == 404:
                    with self._lock:
                        self._forget(job_id)
                    return JobStatus(JobState.LOST, f"tes: {self.client.url} no longer "
                                     f"knows task {job_id} (404)")
                return JobStatus(JobState.UNKNOWN, str(exc))
            if remote.get("id") != job_id:
                return JobStatus(JobState.UNKNOWN, f"tes: GET /tasks/{job_id} answered "
                                 "another task")
        state = remote.get("state")
        job_state = STATE_MAP.get(state) if isinstance(state, str) else None
        if job_state is None:
            log.warning("tes: task %s: the remote state %.40r is not a TES state", job_id, state)
            return JobStatus(JobState.UNKNOWN, f"tes: remote state {str(state)[:40]!r} is "
                             "not a TES state")
        seen, before = progress(remote), self._seen.get(job_id)
        if before == seen:
            return JobStatus(job_state, self._reason(job_id, state))
        events = self._events_of(job_id, remote)
        if events is None:
            return JobStatus(JobState.UNKNOWN, f"tes: remote task {job_id} is not one this "
                             "gateway submitted (its tags name no task of ours that has it)")
        if events.fold.terminal:  # written before (asked again): nothing more to fetch
            return JobStatus(job_state, self._reason(job_id, state))
        # the FULL view only for what BASIC lacks: the end's system logs, ended executors'
        # stdout and stderr; a start is written from BASIC
        full = job_state.finished or seen.ended > (before.ended if before else 0)
        if full:
            try:
                remote = self._full(job_id, remote)
            except BackendError as exc:  # asked again next tick: an end is reported only
                # once the log holds it
                return JobStatus(JobState.UNKNOWN if job_state.finished else job_state,
                                 str(exc))
            state = remote.get("state")  # the FULL view's: the task may have moved
            job_state = STATE_MAP.get(state) if isinstance(state, str) else None
            if job_state is None:
                return JobStatus(JobState.UNKNOWN, f"tes: remote state {str(state)[:40]!r} "
                                 "is not a TES state")
        try:
            events.update(remote, {REMOTE_ID_KEY: job_id, REMOTE_URL_KEY: self.client.url},
                          ends=full)
        except OSError as exc:
            log.warning("tes: task %s: its event log cannot be written: %s",
                        events.task_id, exc)
            return JobStatus(JobState.UNKNOWN if job_state.finished else job_state,
                             f"tes: the event log of task {events.task_id} cannot be "
                             f"written: {exc}")
        with self._lock:
            if job_state.finished:
                self._forget(job_id)  # not polled again (a retry gets a new job)
            else:
                self._seen[job_id] = progress(remote)
        return JobStatus(job_state, self._reason(job_id, state))

    def _reason(self, job_id: str, state: Any) -> str:
        return f"tes: {state} (task {job_id} at {self.client.url})"

    def _full(self, job_id: str, basic: dict[str, Any]) -> dict[str, Any]:
        """The FULL view of the job; the BASIC one with a note when the remote's FULL
        answer is unusable (too long, not JSON, another task's): the task still ends."""
        try:
            full = self.client.call("GET", self.client.task_path(job_id),
                                    params={"view": "FULL"})
            if full.get("id") != job_id:
                raise BackendError(f"tes GET /tasks/{job_id}: answered another task")
            return full
        except BackendError as exc:
            if exc.transient:
                raise
            note = f"the remote's FULL view could not be used: {exc}"
            attempt = {**last_attempt(basic), "system_logs": [note]}
            logs = basic.get("logs")
            logs = logs if isinstance(logs, list) else []
            return {**basic, "logs": [*logs[:-1], attempt]}

    def _events_of(self, job_id: str, remote: dict[str, Any]) -> RemoteEventLog | None:
        """The event log of the job's task: known since submit or recover, else (a
        restarted gateway) the task its tags name, when that task's log says it
        submitted exactly this remote task."""
        with self._lock:
            events = self._logs.get(job_id)
        if events is not None:
            return events
        tags = _tags(remote)
        task_id = tags.get(TASK_TAG)
        if tags.get(self.tag[0]) != self.tag[1] or not isinstance(task_id, str) \
                or not TASK_ID.fullmatch(task_id):
            return None
        if not (self.work_dir / task_id).is_dir():
            return None
        events = RemoteEventLog(self.work_dir, task_id, self._executors(task_id))
        if events.fold.task_log["metadata"].get(REMOTE_ID_KEY) != job_id:
            return None
        with self._lock:
            self._logs[job_id] = events
        return events

    def _executors(self, task_id: str) -> int | None:
        """The task's executor count, from the task.json the gateway wrote."""
        try:
            work_fd = files.open_work_dir(self.work_dir)
            try:
                dir_fd = files.open_subdir(work_fd, task_id)
            finally:
                os.close(work_fd)
            try:
                opened = files.open_owned(dir_fd, TASK_FILE, os.geteuid())
            finally:
                os.close(dir_fd)
            if opened is None:
                return None
            fd, info = opened
            try:
                task = json.loads(os.pread(fd, min(info.st_size, MAX_TASK_FILE), 0))
            finally:
                os.close(fd)
        except (OSError, ValueError):
            return None
        executors = task.get("executors") if isinstance(task, dict) else None
        return len(executors) if isinstance(executors, list) else None

    def _forget(self, job_id: str) -> None:
        self._logs.pop(job_id, None)
        self._seen.pop(job_id, None)

    # ---- recover ----

    def recover(self, task_id: str, task_dir: Path,
                owner: str | None = None) -> str | None:
        """The remote task of this attempt's submission: its id from the event log when
        the gateway recorded it, else the task tagged with the attempt's nonce; None when
        the attempt never reached the POST or the remote has no such task."""
        if not TASK_ID.fullmatch(task_id) or not (task_dir / EVENTS_FILE).is_file():
            return None  # archived per attempt: no log, no submission of this attempt
        events = RemoteEventLog(self.work_dir, task_id, self._executors(task_id))
        held = events.fold.task_log["metadata"]
        remote_id, nonce = held.get(REMOTE_ID_KEY), held.get(SUBMISSION_KEY)
        if isinstance(remote_id, str) and REMOTE_ID.fullmatch(remote_id):
            with self._lock:
                self._logs[remote_id] = events
            return remote_id
        found = self._find(task_id, nonce) if nonce else None
        if found is None:
            return None
        try:
            return self._record(events, found)
        except BackendError as exc:
            raise BackendError(str(exc), transient=True) from None

    def close(self) -> None:
        self.client.close()
