"""Submitting QUEUED tasks' jobs, for the reconciler: one read of the task documents, one
claim transaction, the backend's submissions (several at once where the backend allows
it), one record transaction per tick. A refusal fails its task only; an unreachable
scheduler gives the claim back for the next tick. Which QUEUED tasks, each tick:
gateway/reconcile/quotas.py (owners in turn, within limits.per_owner).

Two parts: WorkerLaunch (what each job's worker is given: its argv, and the files the
gateway puts in its task dir) and the Submitter, which the reconciler makes in its
constructor over the store's reconciler_queries, the backend, its in-flight index, its
event tails and its task writer (gateway/reconcile/core.py).
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from funnel_hpc.backends import arrays, files
from funnel_hpc.backends.array_script import shared_inputs
from funnel_hpc.backends.base import Backend, BackendError, SubmitRequest
from funnel_hpc.core import worker_tokens
from funnel_hpc.core.config import BackendOptions, Config, PerOwnerSection
from funnel_hpc.core.quotas import QuotaPolicy
from funnel_hpc.core.states import State
from funnel_hpc.gateway.ops import metrics
from funnel_hpc.gateway.reconcile import owner_worker
from funnel_hpc.gateway.reconcile.core import (
    LOGGER_NAME,
    TASK_FILE,
    WORKER_CONFIG_FILE,
    EventTails,
    TaskWriter,
    TickStats,
    attempt_logs,
    worker_command,
    write_worker_config,
)
from funnel_hpc.gateway.reconcile.event_tail import archive_events
from funnel_hpc.gateway.reconcile.index import InFlightIndex
from funnel_hpc.gateway.reconcile.quotas import FairShare
from funnel_hpc.gateway.store.placement import OwnerGroups
from funnel_hpc.gateway.store.reconciler_queries import ReconcilerQueries
from funnel_hpc.gateway.store.tasks import now_rfc3339

log = logging.getLogger(LOGGER_NAME)
LIST_SWEEP_SECONDS = 3600.0  # how often old job array task lists are looked for


class WorkerLaunch:
    """What the gateway hands each job's worker: its argv, and the files it writes in the
    task dir (task.json, the worker's token, the owner's worker config)."""

    def __init__(self, work_dir: str, command: list[str], worker_config: Path, *,
                 owner_config: str | None = None, worker_key: bytes | None = None,
                 server_url: str | None = None):
        self.work_dir = work_dir
        self._work_path = Path(work_dir)
        self.command = command
        self.worker_config = worker_config  # <work_dir>/worker-config.json
        # jobs run as their owners: each task dir gets this (no site secret in it)
        self.owner_config = owner_config
        # with auth on, each worker gets a token for its own task (core/worker_tokens.py)
        self.worker_key = worker_key
        self.server_url = server_url  # reconciler.pass_server_url: the workers report here

    @classmethod
    def from_config(cls, config: Config, pass_server_url: bool,
                    options: BackendOptions | None = None) -> WorkerLaunch:
        """Writes the worker config (once per start); with jobs run as their owners, checks
        now (not per task) that the worker command runs for an unprivileged user."""
        worker_config = write_worker_config(config)
        owner_config: str | None = None
        if owner_worker.runs_as_owners(config, options):  # options: the instance's
            owner_worker.check_worker_command(worker_command(config))
            owner_config = json.dumps(owner_worker.owner_sections(config, options))
        worker_key = (worker_tokens.load_key(config.work_dir)
                      if config.auth.mode != "none" else None)
        return cls(config.work_dir, worker_command(config), worker_config,
                   owner_config=owner_config, worker_key=worker_key,
                   server_url=config.server.public_url if pass_server_url else None)

    def task_dir(self, task_id: str) -> Path:
        return self._work_path / task_id

    def token(self, task_id: str) -> str | None:
        return (worker_tokens.token_for(self.worker_key, task_id)
                if self.worker_key is not None else None)

    def texts(self, row: Any, task: dict) -> dict[str, str]:
        """The files the gateway puts in a task dir (name -> text): task.json, with the
        owner riding along (users cannot set it: the API drops, or with strict_fields
        refuses, fields the TES model lacks) so a root worker opens file:// paths as that
        user (worker/storage/owner_access.py); the worker's token; the owner's worker config."""
        texts = {TASK_FILE: json.dumps({**task, "owner": row.owner})}
        token = self.token(row.id)
        if token is not None:
            texts[worker_tokens.TOKEN_FILE] = token
        if self.owner_config is not None:  # the owner's worker reads this one
            texts[WORKER_CONFIG_FILE] = self.owner_config
        return texts

    def file_names(self) -> tuple[str, ...]:
        """The names texts() writes in each task dir."""
        return (TASK_FILE, *((worker_tokens.TOKEN_FILE,) if self.worker_key is not None else ()),
                *((WORKER_CONFIG_FILE,) if self.owner_config is not None else ()))

    def argv(self, directory: Path) -> list[str]:
        config = f"{directory}/{WORKER_CONFIG_FILE}" if self.owner_config is not None \
            else str(self.worker_config)
        argv = [*self.command, "--task-file", f"{directory}/{TASK_FILE}",
                "--workdir", self.work_dir, "--config", config]
        if self.server_url is not None:
            argv += ["--server", self.server_url]
        return argv


class Submitter:
    """The reconciler's batched submission of new jobs."""

    def __init__(self, queries: ReconcilerQueries, backend: Backend, index: InFlightIndex,
                 tails: EventTails, writer: TaskWriter, launch: WorkerLaunch,
                 threads: int = 1, per_owner: PerOwnerSection | None = None):
        """`per_owner`: limits.per_owner (None: owners in turn, no limits)."""
        self.queries = queries
        self.backend = backend
        self.index = index
        self.tails = tails
        self.writer = writer
        self.launch = launch
        self.threads = max(1, threads)
        self._pool: ThreadPoolExecutor | None = None
        policy = QuotaPolicy(per_owner, OwnerGroups()) if per_owner is not None else None
        self.fair_share = FairShare(policy, queries, backend.name)
        self._next_list_sweep = time.monotonic() + LIST_SWEEP_SECONDS

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    def submit_next(self, limit: int, stats: TickStats) -> None:
        """Submit up to `limit` of the QUEUED tasks without a job: owners in turn, within
        their limits.per_owner (gateway/reconcile/quotas.py)."""
        self.submit_batch(self.fair_share.pick(self.index.unsubmitted, limit), stats)
        if self.backend.array_max > 1 and time.monotonic() >= self._next_list_sweep:
            self._next_list_sweep = time.monotonic() + LIST_SWEEP_SECONDS
            try:  # job arrays' task lists older than arrays.KEEP_SECONDS
                arrays.remove_older_than(Path(self.launch.work_dir))
            except OSError as exc:
                log.warning("old job array task lists not removed: %s", exc)

    def submit_batch(self, rows: list[Any], stats: TickStats) -> None:
        """Submit the jobs of QUEUED tasks: one read, one claim transaction, the backend's
        submissions (several at once where the backend allows it), one record transaction."""
        if not rows:
            return
        found = self.queries.tasks_and_logs([row.id for row in rows])
        rows = [row for row in rows if row.id in found]
        tasks = {task_id: task for task_id, (task, _) in found.items()}
        stored_logs = {task_id: logs for task_id, (_, logs) in found.items()}
        # claim the tasks before touching their dirs: only one submitter (even with two
        # reconcilers at once), and a restart sees the claims
        claimed = self.queries.claim_for_submission([(row.id, row.attempt + 1) for row in rows])
        for row in rows:
            if row.id not in claimed:
                self.index.recheck(row.id)  # canceled or claimed elsewhere meanwhile
        rows = [row for row in rows if row.id in claimed]
        requests = [self._request(row, tasks[row.id]) for row in rows]
        outcomes = self._map_submit(rows, tasks, requests)
        recorded: list[tuple[str, str, list]] = []
        deferred: list[tuple[str, int, int]] = []
        for row, request, outcome in zip(rows, requests, outcomes, strict=True):
            attempt = row.attempt + 1
            logs = attempt_logs(stored_logs.get(row.id), attempt)
            if isinstance(outcome, BackendError) and outcome.transient:
                # scheduler unreachable: give the claim back, retry next tick
                log.warning("submission of task %s deferred: %s", row.id, outcome)
                deferred.append((row.id, row.attempt, row.event_seq))
                stats.unreachable = str(outcome)
            elif isinstance(outcome, Exception):
                self._submission_failed(row, logs, outcome, stats)
            else:
                logs[-1].setdefault("metadata", {}).update(
                    {"backend": self.backend.name, "job_id": str(outcome),
                     "attempt": str(attempt)})
                recorded.append((row.id, str(outcome), logs))
                self.tails.start(row, len(tasks[row.id]["executors"]), new_attempt=True,
                                 directory=request.task_dir)
        if deferred:
            self.queries.release_claims(deferred)
        if recorded:
            self.queries.record_submissions(recorded)
            stats.submitted += len(recorded)

    def _prepare_task_dir(self, row: Any, task: dict, directory: Path) -> None:
        """task.json (and the worker's token) in the task dir, made ours and private first:
        files.py's writes follow no symlink a user may have left there. A backend that
        makes_task_dir writes them itself when the job starts (_map_submit hands them
        over); only an earlier attempt's dir is taken back and its event logs archived."""
        if self.backend.makes_task_dir:
            if row.attempt >= 1:
                if directory.is_dir():
                    files.private_dir(directory)
                archive_events(directory, row.attempt)
            return
        texts = self.launch.texts(row, task)
        if row.attempt < 1 and files.new_private_dir(directory, texts):
            return  # the usual first attempt: the dir is new
        files.private_dir(directory)
        archive_events(directory, row.attempt)
        for name, text in texts.items():
            files.write_private(directory, name, text)

    def _map_submit(self, rows: list[Any], tasks: dict[str, dict],
                    requests: list[SubmitRequest]) -> list[Any]:
        """The backend's submission of each row: its job id, or the exception raised
        (an OSError of its task dir: that task only). Rows whose jobs would get the same
        header go as one array job (array_max at most, where the backend has arrays);
        the others one job each. Each unit's task dirs are written just before it goes;
        where the backend allows several submissions at once, a unit's goes in a thread
        while the next unit's dirs are written."""
        outcomes: list[Any] = [None] * len(rows)
        pool = None
        if self.threads > 1 and self.backend.parallel_submit:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="submit")
            pool = self._pool
        pending = []
        for unit in self._units(requests, outcomes):
            ready = []
            for i in unit:
                try:
                    self._prepare_task_dir(rows[i], tasks[rows[i].id], requests[i].task_dir)
                except OSError as exc:  # this task's dir only (disk full, a planted dir)
                    outcomes[i] = exc
                    continue
                ready.append(i)
            if not ready:
                continue
            if pool is None:
                self._submit_unit(ready, requests, outcomes)
            else:
                pending.append(pool.submit(self._submit_unit, ready, requests, outcomes))
        for future in pending:
            future.result()
        return outcomes

    def _submit_unit(self, unit: list[int], requests: list[SubmitRequest],
                     outcomes: list[Any]) -> None:
        """One job (a unit of one) or one array job; each index's outcome set."""
        try:
            if len(unit) == 1:
                ids = [self.backend.submit(requests[unit[0]])]
            else:
                ids = self.backend.submit_array([requests[i] for i in unit])
                if len(ids) != len(unit):
                    raise BackendError(f"{self.backend.name} returned {len(ids)} element "
                                       f"ids for an array of {len(unit)}")
        except (BackendError, OSError, ValueError) as exc:
            # a refusal is the scheduler answering: only "unreachable" is a failed call
            self._count(ok=not getattr(exc, "transient", False))
            for i in unit:
                outcomes[i] = exc
            return
        except Exception as exc:
            log.exception("tasks %s: %s submit raised",
                          ", ".join(requests[i].task_id for i in unit), self.backend.name)
            self._count(ok=False)
            for i in unit:
                outcomes[i] = exc
            return
        self._count(ok=True)
        for i, job_id in zip(unit, ids, strict=True):
            outcomes[i] = job_id

    def _request(self, row: Any, task: dict) -> SubmitRequest:
        directory = self.launch.task_dir(row.id)
        return SubmitRequest(task_id=row.id, task=task, task_dir=directory,
                             worker_argv=self.launch.argv(directory),
                             backend_parameters=_lower_keys(task), owner=row.owner,
                             worker_token=self.launch.token(row.id),
                             gateway_files=self.launch.file_names(),
                             files=(self.launch.texts(row, task)
                                    if self.backend.makes_task_dir else {}))

    def _units(self, requests: list[SubmitRequest], outcomes: list[Any]) -> list[list[int]]:
        """Indexes of requests, grouped: equal array keys together (array_max at most a
        unit), each other request alone. A key the backend refuses to make is that
        request's outcome (and it is not submitted). Keys are asked once per distinct
        array_script.shared_inputs: 10,000 tasks of one header render one key."""
        if self.backend.array_max <= 1:
            return [[i] for i in range(len(requests))]
        groups: dict[str, list[int]] = {}
        units: list[list[int]] = []
        # the backend renders one key per distinct shared_inputs (Backend.array_key)
        keys: dict[tuple[Any, ...], str | None | Exception] = {}
        work_dir = Path(self.launch.work_dir)
        for i, request in enumerate(requests):
            inputs = shared_inputs(request, work_dir)
            if inputs not in keys:
                try:
                    keys[inputs] = self.backend.array_key(request)
                except (BackendError, OSError, ValueError) as exc:
                    keys[inputs] = exc
            key = keys[inputs]
            if isinstance(key, Exception):
                outcomes[i] = key
                continue
            if key is None:
                units.append([i])
            else:
                groups.setdefault(key, []).append(i)
        size = self.backend.array_max
        for members in groups.values():
            units += [members[at:at + size] for at in range(0, len(members), size)]
        return units

    def _count(self, ok: bool) -> None:
        metrics.count_scheduler_call(self.backend.name, "submit", ok)

    def _submission_failed(self, row: Any, logs: list, exc: Exception, stats: TickStats) -> None:
        logs[-1]["gateway_logs"].append(f"{now_rfc3339()} submission to {self.backend.name} "
                                        f"failed: {exc}")
        self.writer.transition(row, State.QUEUED, State.SYSTEM_ERROR, logs=logs, job_id=None)
        stats.finished += 1


def _lower_keys(task: dict) -> dict[str, str]:
    params = (task.get("resources") or {}).get("backend_parameters") or {}
    return {str(k).lower(): str(v) for k, v in params.items()}
