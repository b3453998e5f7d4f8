"""Submitting QUEUED tasks' jobs, for the reconciler: the tasks claimed (their documents
read in the same transaction) a thousand at a time, their new task dirs written meanwhile
(by a helper process beside the reconciler in a burst: gateway/reconcile/dir_writer.py),
the backend's submissions (several at once where the backend allows it), the jobs
recorded a thousand a transaction as they come. A refusal fails its task only; an
unreachable scheduler gives the claim back for the next tick. Which QUEUED tasks, each
tick: gateway/reconcile/quotas.py (owners in turn, within limits.per_owner).

Two parts: WorkerLaunch (what each job's worker is given: its argv, and the files the
gateway puts in its task dir) and the Submitter, which the reconciler makes in its
constructor over the store's reconciler_queries, the backend, its in-flight index, its
event tails and its task writer (gateway/reconcile/core.py).
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from funnel_hpc.backends import arrays, files
from funnel_hpc.backends.array_script import shared_inputs
from funnel_hpc.backends.base import Backend, BackendError, SubmitRequest
from funnel_hpc.core import json_text, worker_tokens
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
from funnel_hpc.gateway.reconcile.dir_writer import (
    WRITER_MIN,
    DirWriter,
    Result,
    TickDirs,
    error_of,
)
from funnel_hpc.gateway.reconcile.event_tail import archive_events
from funnel_hpc.gateway.reconcile.index import InFlightIndex
from funnel_hpc.gateway.reconcile.quotas import FairShare
from funnel_hpc.gateway.store.placement import OwnerGroups
from funnel_hpc.gateway.store.reconciler_queries import ReconcilerQueries
from funnel_hpc.gateway.store.tasks import now_rfc3339

log = logging.getLogger(LOGGER_NAME)
LIST_SWEEP_SECONDS = 3600.0  # how often old job array task lists are looked for
CLAIM_BATCH = 1000  # tasks read and claimed a transaction (the first ones' dirs go at once)
RECORD_BATCH = 1000  # submitted jobs recorded a transaction, as their units settle


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
        texts = {TASK_FILE: json_text.dumps({**task, "owner": row.owner})}
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


@dataclass
class _Tick:
    """One tick's submission: the rows claimed (by index: their task dirs, requests and
    outcomes), their tasks and stored logs, and what is to be recorded or given back."""

    stats: TickStats
    rows: list[Any] = field(default_factory=list)
    tasks: dict[str, dict] = field(default_factory=dict)
    stored_logs: dict[str, list] = field(default_factory=dict)
    directories: list[Path] = field(default_factory=list)
    requests: list[SubmitRequest] = field(default_factory=list)
    outcomes: list[Any] = field(default_factory=list)
    recorded: list[tuple[str, str, list]] = field(default_factory=list)
    deferred: list[tuple[str, int, int]] = field(default_factory=list)
    # each row's array key (None: a job of its own); the backend asked once per distinct
    # array_script.shared_inputs: 10,000 tasks of one header render one key
    keys: list[str | None] = field(default_factory=list)
    key_of_inputs: dict[tuple[Any, ...], str | None | Exception] = field(default_factory=dict)


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
        self._work_path = Path(launch.work_dir)
        self.threads = max(1, threads)
        self._pool: ThreadPoolExecutor | None = None
        policy = QuotaPolicy(per_owner, OwnerGroups()) if per_owner is not None else None
        self.fair_share = FairShare(policy, queries, backend.name)
        self._next_list_sweep = time.monotonic() + LIST_SWEEP_SECONDS
        self._dir_writer = DirWriter()  # started by the first tick with many new dirs

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        self._dir_writer.close()

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
        """Submit the jobs of QUEUED tasks: claimed CLAIM_BATCH at a time, each batch's
        requests and array keys made (its dirs written meanwhile), the backend's submissions
        (several at once where the backend allows it), each unit's outcome settled as it
        comes and recorded RECORD_BATCH at a time."""
        if not rows:
            return
        tick = _Tick(stats)
        if len(rows) >= WRITER_MIN and not self.backend.makes_task_dir:
            self._dir_writer.start()
        dirs = TickDirs(tick.directories.__getitem__,
                        lambda i: self.launch.texts(tick.rows[i], tick.tasks[tick.rows[i].id]),
                        self._dir_writer)
        for at in range(0, len(rows), CLAIM_BATCH):
            first = len(tick.rows)
            tick.rows += self._claim(rows[at:at + CLAIM_BATCH], tick)
            claimed = range(first, len(tick.rows))
            tick.directories += [self.launch.task_dir(tick.rows[i].id) for i in claimed]
            # the usual first attempts' dirs (new, the gateway's files in them), written
            # from now on (gateway/reconcile/dir_writer.py)
            if not self.backend.makes_task_dir:
                dirs.add([i for i in claimed if tick.rows[i].attempt < 1])
            tick.requests += [self._request(tick.rows[i], tick.tasks[tick.rows[i].id],
                                            tick.directories[i]) for i in claimed]
            tick.outcomes += [None] * len(claimed)
            if self.backend.array_max > 1:
                for i in claimed:
                    self._array_key(tick, i)
            dirs.pump()  # the helper kept busy while the next batch is claimed
        self._map_submit(tick, dirs)
        if tick.deferred:
            self.queries.release_claims(tick.deferred)
        self._record(tick)

    def _settle(self, tick: _Tick, indexes: list[int]) -> None:
        """What became of these rows' submissions: a job (recorded RECORD_BATCH at a time,
        its event tail started), a refusal (the task fails) or an unreachable scheduler
        (the claim given back at the end of the tick)."""
        for i in indexes:
            row, outcome = tick.rows[i], tick.outcomes[i]
            attempt = row.attempt + 1
            logs = attempt_logs(tick.stored_logs.get(row.id), attempt)
            if isinstance(outcome, BackendError) and outcome.transient:
                # scheduler unreachable: give the claim back, retry next tick
                log.warning("submission of task %s deferred: %s", row.id, outcome)
                tick.deferred.append((row.id, row.attempt, row.event_seq))
                tick.stats.unreachable = str(outcome)
            elif isinstance(outcome, Exception):
                self._submission_failed(row, logs, outcome, tick.stats)
            else:
                logs[-1].setdefault("metadata", {}).update(
                    {"backend": self.backend.name, "job_id": str(outcome),
                     "attempt": str(attempt)})
                tick.recorded.append((row.id, str(outcome), logs))
                self.tails.start(row, len(tick.tasks[row.id]["executors"]), new_attempt=True,
                                 directory=tick.directories[i])
        if len(tick.recorded) >= RECORD_BATCH:
            self._record(tick)

    def _record(self, tick: _Tick) -> None:
        if tick.recorded:
            self.queries.record_submissions(tick.recorded)
            tick.stats.submitted += len(tick.recorded)
            tick.recorded = []

    def _claim(self, rows: list[Any], tick: _Tick) -> list[Any]:
        """The rows claimed for submission, their tasks and stored logs (read in the
        claim's transaction) added to the tick's: a task deleted, canceled or claimed
        elsewhere meanwhile is not. Claimed before their dirs are touched: only one
        submitter (even with two reconcilers at once), and a restart sees the claims."""
        found = self.queries.claim_with_tasks([(row.id, row.attempt + 1) for row in rows])
        for task_id, (task, logs) in found.items():
            tick.tasks[task_id] = task
            tick.stored_logs[task_id] = logs
        for row in rows:
            if row.id not in found:
                self.index.recheck(row.id)  # canceled or claimed elsewhere meanwhile
        return [row for row in rows if row.id in found]

    def _prepare_task_dir(self, row: Any, task: dict, directory: Path,
                          written: Result) -> None:
        """task.json (and the worker's token) in the task dir, made ours and private first:
        files.py's writes follow no symlink a user may have left there. `written`: what
        TickDirs made of the dir (None: a new one, written; THERE: the careful way here;
        an errno: that error). A backend that makes_task_dir writes them itself when the
        job starts (_map_submit hands them over); only an earlier attempt's dir is taken
        back and its event logs archived."""
        if self.backend.makes_task_dir:
            if row.attempt >= 1:
                if directory.is_dir():
                    files.private_dir(directory)
                archive_events(directory, row.attempt)
            return
        if isinstance(written, tuple):
            raise error_of(written, directory)
        if written is None:
            return  # the usual first attempt: the dir is new
        files.private_dir(directory)
        archive_events(directory, row.attempt)
        for name, text in self.launch.texts(row, task).items():
            files.write_private(directory, name, text)

    def _map_submit(self, tick: _Tick, dirs: TickDirs) -> None:
        """The backend's submission of each row: its job id, or the exception raised
        (an OSError of its task dir: that task only), settled unit by unit as they
        complete. Rows whose jobs would get the same header go as one array job
        (array_max at most, where the backend has arrays); the others one job each. Each
        unit goes once its task dirs are written; where the backend allows several
        submissions at once, a unit's goes in a thread while the next unit's dirs are
        written."""
        pool = None
        if self.threads > 1 and self.backend.parallel_submit:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="submit")
            pool = self._pool
        units = self._units(tick)
        self._settle(tick, [i for i, outcome in enumerate(tick.outcomes) if outcome is not None])
        pending: deque[tuple[list[int], Future[None] | None]] = deque()
        for unit in units:
            dirs.wait_for(unit)
            ready = []
            for i in unit:
                try:
                    self._prepare_task_dir(tick.rows[i], tick.tasks[tick.rows[i].id],
                                           tick.directories[i], dirs.result(i))
                except OSError as exc:  # this task's dir only (disk full, a planted dir)
                    tick.outcomes[i] = exc
                    continue
                ready.append(i)
            if ready and pool is not None:
                future = pool.submit(self._submit_unit, ready, tick.requests, tick.outcomes)
                pending.append((unit, future))
            else:
                if ready:
                    self._submit_unit(ready, tick.requests, tick.outcomes)
                pending.append((unit, None))
            while pending and (pending[0][1] is None or pending[0][1].done()):
                self._settle(tick, self._done(pending.popleft()))
        dirs.finish()
        while pending:
            self._settle(tick, self._done(pending.popleft()))

    @staticmethod
    def _done(entry: tuple[list[int], Future[None] | None]) -> list[int]:
        unit, future = entry
        if future is not None:
            future.result()
        return unit

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

    def _request(self, row: Any, task: dict, directory: Path) -> SubmitRequest:
        return SubmitRequest(task_id=row.id, task=task, task_dir=directory,
                             worker_argv=self.launch.argv(directory),
                             backend_parameters=_lower_keys(task), owner=row.owner,
                             worker_token=self.launch.token(row.id),
                             gateway_files=self.launch.file_names(),
                             files=(self.launch.texts(row, task)
                                    if self.backend.makes_task_dir else {}))

    def _array_key(self, tick: _Tick, i: int) -> None:
        """Row i's array key (called for the rows in order), asked of the backend once per
        distinct shared_inputs; a key the backend refuses to make is that row's outcome
        (it is not submitted)."""
        request = tick.requests[i]
        inputs = shared_inputs(request, self._work_path)
        if inputs not in tick.key_of_inputs:
            try:
                tick.key_of_inputs[inputs] = self.backend.array_key(request)
            except (BackendError, OSError, ValueError) as exc:
                tick.key_of_inputs[inputs] = exc
        key = tick.key_of_inputs[inputs]
        if isinstance(key, Exception):
            tick.outcomes[i] = key
            key = None
        tick.keys.append(key)

    def _units(self, tick: _Tick) -> list[list[int]]:
        """Indexes of the tick's rows, grouped: equal array keys together (array_max at
        most a unit), each other row alone; a row with an outcome already (its key
        refused) in none."""
        if self.backend.array_max <= 1:
            return [[i] for i in range(len(tick.rows))]
        groups: dict[str, list[int]] = {}
        units: list[list[int]] = []
        for i, key in enumerate(tick.keys):
            if tick.outcomes[i] is not None:
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
