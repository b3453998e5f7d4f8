"""Submitting QUEUED tasks' jobs, for the reconciler: one read of the task documents, one
claim transaction, the backend's submissions (several at once where the backend allows
it), one record transaction per tick. A refusal fails its task only; an unreachable
scheduler gives the claim back for the next tick.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from funnel_hpc.backends import files
from funnel_hpc.backends.base import BackendError, SubmitRequest
from funnel_hpc.core import worker_tokens
from funnel_hpc.core.states import State
from funnel_hpc.gateway.reconcile.core import (
    LOGGER_NAME,
    TASK_FILE,
    WORKER_CONFIG_FILE,
    ReconcilerCore,
    TickStats,
    attempt_logs,
    task_dir,
    worker_command,
)
from funnel_hpc.gateway.reconcile.event_tail import EventTail, archive_events
from funnel_hpc.gateway.store.tasks import now_rfc3339

log = logging.getLogger(LOGGER_NAME)


class Submission(ReconcilerCore):
    """The reconciler's batched submission of new jobs."""

    def _submit_batch(self, rows: list[Any], stats: TickStats) -> None:
        """Submit the jobs of QUEUED tasks: one read, one claim transaction, the backend's
        submissions (several at once where the backend allows it), one record transaction."""
        if not rows:
            return
        tasks = self.service.full_tasks([row.id for row in rows])
        rows = [row for row in rows if row.id in tasks]
        stored_logs = self.service.stored_logs([row.id for row in rows])
        # claim the tasks before touching their dirs: only one submitter (even with two
        # reconcilers at once), and a restart sees the claims
        claimed = self.service.claim_for_submission([(row.id, row.attempt + 1) for row in rows])
        for row in rows:
            if row.id not in claimed:
                self.index.recheck(row.id)  # canceled or claimed elsewhere meanwhile
        rows = [row for row in rows if row.id in claimed]
        prepared = []
        for row in rows:
            try:
                self._prepare_task_dir(row, tasks[row.id])
            except OSError as exc:  # this task's directory only (disk full, a planted dir)
                logs = attempt_logs(stored_logs.get(row.id), row.attempt + 1)
                self._submission_failed(row, logs, exc, stats)
                continue
            prepared.append(row)
        rows = prepared
        outcomes = self._map_submit(rows, tasks)
        recorded: list[tuple[str, str, list]] = []
        deferred: list[tuple[str, int, int]] = []
        for row, outcome in zip(rows, outcomes, strict=True):
            attempt = row.attempt + 1
            logs = attempt_logs(stored_logs.get(row.id), attempt)
            if isinstance(outcome, BackendError) and outcome.transient:
                # scheduler unreachable: give the claim back, retry next tick
                log.warning("submission of task %s deferred: %s", row.id, outcome)
                deferred.append((row.id, row.attempt, row.event_seq))
            elif isinstance(outcome, Exception):
                self._submission_failed(row, logs, outcome, stats)
            else:
                logs[-1].setdefault("metadata", {}).update(
                    {"backend": self.backend.name, "job_id": str(outcome),
                     "attempt": str(attempt)})
                recorded.append((row.id, str(outcome), logs))
                self.tails[row.id] = EventTail(task_dir(self.config, row.id),
                                               len(tasks[row.id]["executors"]),
                                               self.backend.job_uid(row.owner))
        if deferred:
            self.service.release_claims(deferred)
        if recorded:
            self.service.record_submissions(recorded)
            stats.submitted += len(recorded)

    def _prepare_task_dir(self, row: Any, task: dict) -> None:
        """task.json (and the worker's token) in the task dir, made ours and private first:
        files.py's writes follow no symlink a user may have left there. A backend that
        makes_task_dir writes them itself when the job starts (_map_submit hands them
        over); only an earlier attempt's dir is taken back and its event logs archived."""
        directory = task_dir(self.config, row.id)
        if self.backend.makes_task_dir:
            if row.attempt >= 1:
                if directory.is_dir():
                    files.private_dir(directory)
                archive_events(directory, row.attempt)
            return
        files.private_dir(directory)
        archive_events(directory, row.attempt)
        for name, text in self._gateway_texts(row, task).items():
            files.write_private(directory, name, text)

    def _gateway_texts(self, row: Any, task: dict) -> dict[str, str]:
        """The files the gateway puts in a task dir (name -> text): task.json, with the
        owner riding along (users cannot set it: the API drops, or with strict_fields
        refuses, fields the TES model lacks) so a root worker opens file:// paths as that
        user (worker/storage/owner_access.py); the worker's token; the owner's worker config."""
        texts = {TASK_FILE: json.dumps({**task, "owner": row.owner})}
        if self.worker_key is not None:
            texts[worker_tokens.TOKEN_FILE] = worker_tokens.token_for(self.worker_key, row.id)
        if self.owner_config is not None:  # the owner's worker reads this one
            texts[WORKER_CONFIG_FILE] = self.owner_config
        return texts

    def _gateway_files(self) -> tuple[str, ...]:
        """What _prepare_task_dir writes in each task dir."""
        return (TASK_FILE, *((worker_tokens.TOKEN_FILE,) if self.worker_key is not None else ()),
                *((WORKER_CONFIG_FILE,) if self.owner_config is not None else ()))

    def _map_submit(self, rows: list[Any], tasks: dict[str, dict]) -> list[Any]:
        """backend.submit for each row: the job id, or the exception it raised."""
        def one(row: Any) -> Any:
            directory = task_dir(self.config, row.id)
            task = tasks[row.id]
            token = (worker_tokens.token_for(self.worker_key, row.id)
                     if self.worker_key is not None else None)
            request = SubmitRequest(task_id=row.id, task=task, task_dir=directory,
                                    worker_argv=self._worker_argv(directory),
                                    backend_parameters=_lower_keys(task), owner=row.owner,
                                    worker_token=token, gateway_files=self._gateway_files(),
                                    files=(self._gateway_texts(row, task)
                                           if self.backend.makes_task_dir else {}))
            try:
                job_id = self.backend.submit(request)
            except (BackendError, OSError, ValueError) as exc:
                # a refusal is the scheduler answering: only "unreachable" is a failed call
                self._count("submit", ok=not getattr(exc, "transient", False))
                return exc
            except Exception as exc:
                log.exception("task %s: %s submit raised", row.id, self.backend.name)
                self._count("submit", ok=False)
                return exc
            self._count("submit", ok=True)
            return job_id

        if self.submit_threads > 1 and self.backend.parallel_submit and len(rows) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.submit_threads,
                                                thread_name_prefix="submit")
            return list(self._pool.map(one, rows))
        return [one(row) for row in rows]

    def _submission_failed(self, row: Any, logs: list, exc: Exception, stats: TickStats) -> None:
        logs[-1]["gateway_logs"].append(f"{now_rfc3339()} submission to {self.backend.name} "
                                        f"failed: {exc}")
        self._transition(row, State.QUEUED, State.SYSTEM_ERROR, logs=logs, job_id=None)
        stats.finished += 1

    def _worker_argv(self, directory: Path) -> list[str]:
        config = directory / WORKER_CONFIG_FILE if self.owner_config is not None \
            else self.worker_config
        argv = [*worker_command(self.config), "--task-file", str(directory / TASK_FILE),
                "--workdir", self.config.work_dir, "--config", str(config)]
        if self.pass_server_url:
            argv += ["--server", self.config.server.public_url]
        return argv


def _lower_keys(task: dict) -> dict[str, str]:
    params = (task.get("resources") or {}).get("backend_parameters") or {}
    return {str(k).lower(): str(v) for k, v in params.items()}
