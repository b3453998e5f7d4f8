"""Overflow: a QUEUED task leaves its backend instance for the next one its routing rule
names (`overflow: [...]`), when its instance is unhealthy (its scheduler calls failed
reconciler.overflow_after_failed_polls ticks in a row) or its job has waited PENDING
longer than the rule's max_queue_wait.

The safety rule: a task moves only when its job here is confirmed gone. The reconciler
of its current instance withdraws the job (Backend.withdraw: Slurm cancels it only while
it is pending) and waits; a later poll that shows the job canceled or gone (not completed
or failed: those ran), with no event of its worker in the task dir, confirms it, and one
compare-and-set UPDATE (still QUEUED, still this instance, still that job) hands the
task to the next instance with no job. A task that never got a job here (its
submissions failed) moves at once by the same UPDATE. An unreachable scheduler confirms
nothing, and an unhealthy instance withdraws nothing: the task stays. A worker that
started anyway wins: the task stays too. Attempts go forward along the route (instance,
then its overflow list in order), never back to an instance the task's logs say it tried.

Cost when no rule names an overflow from this instance: nothing. Otherwise, per tick, a
pass over this instance's QUEUED rows, one read of the documents and logs of the tasks
first considered (their routes are kept), and at most reconciler.submit_per_tick
withdrawals (one scheduler call each) or moves (one UPDATE each).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from funnel_hpc.backends.base import Backend, BackendError, JobState, JobStatus
from funnel_hpc.core.config import Config
from funnel_hpc.core.routing import Router, Unroutable
from funnel_hpc.core.states import State
from funnel_hpc.gateway.ops import metrics
from funnel_hpc.gateway.reconcile.core import (
    LOGGER_NAME,
    SUBMITTING,
    EventTails,
    LookAgain,
    TaskWriter,
    attempt_logs,
)
from funnel_hpc.gateway.reconcile.index import InFlightIndex
from funnel_hpc.gateway.store.placement import OwnerGroups
from funnel_hpc.gateway.store.reconciler_queries import ReconcilerQueries
from funnel_hpc.gateway.store.tasks import now_rfc3339

log = logging.getLogger(LOGGER_NAME)

QUEUED = State.QUEUED.value
# what confirms a withdrawn job gone without having run (with no event of its worker):
# canceled, or no longer known; COMPLETED, FAILED and the others mean it ran
GONE_UNSTARTED = frozenset({JobState.CANCELLED, JobState.LOST})


@dataclass(frozen=True)
class Chain:
    """A task's route as overflow needs it: the instances in order, its wait, and the
    instances its logs say it tried (each attempt's metadata.backend)."""

    instances: tuple[str, ...]
    max_queue_wait: float | None
    tried: frozenset[str]


@dataclass
class Withdrawal:
    """A job withdrawn for overflow, waiting for the scheduler to confirm it gone."""

    job_id: str
    target: str
    why: str


class Overflow:
    """One instance's overflow: which of its QUEUED tasks leave, and moving them."""

    def __init__(self, queries: ReconcilerQueries, backend: Backend, index: InFlightIndex,
                 tails: EventTails, writer: TaskWriter, look_again: LookAgain,
                 config: Config):
        self.queries = queries
        self.backend = backend
        self.index = index
        self.tails = tails
        self.writer = writer
        self.look_again = look_again
        self.failed_ticks_needed = max(1, config.reconciler.overflow_after_failed_polls)
        # scheduler calls (withdrawals) and moves a tick makes at most
        self.per_tick = max(1, config.reconciler.submit_per_tick)
        self.router: Router = config.router()
        self.groups = OwnerGroups()  # as at POST (gateway/store/placement.py)
        self.instances = frozenset(config.backends)
        name = backend.name
        # does any rule send tasks on from this instance? (else this costs nothing)
        self.enabled = queries.instance is not None and any(
            name in (rule.backend, *rule.overflow)[:-1] for rule in self.router.rules)
        self.failed_ticks = 0
        self.withdrawing: dict[str, Withdrawal] = {}
        self._chains: dict[str, Chain | None] = {}
        self._pending_since: dict[str, tuple[str, float]] = {}  # task -> (job, monotonic)

    # ---- health ----

    def note_tick(self) -> None:
        """After a tick: one more failed tick if this instance's last scheduler call
        failed (its poll, or a submission when it had nothing to poll), else none."""
        if self.backend.name in metrics.backend_failing():
            self.failed_ticks += 1
        else:
            self.failed_ticks = 0

    @property
    def unhealthy(self) -> bool:
        return self.failed_ticks >= self.failed_ticks_needed

    # ---- one tick ----

    def step(self, statuses: dict[str, JobStatus]) -> int:
        """Confirm the withdrawals under way, start new ones; the tasks moved.

        Unhealthy: only the tasks that never got a job here move (an accepted job cannot
        be confirmed gone by a failing scheduler, and asking it would wait out its
        timeouts); healthy: jobs PENDING past their max_queue_wait are withdrawn."""
        if not self.enabled:
            return 0
        moved = self._confirm(statuses)
        queued = [row for row in self.index.rows.values()
                  if row.state == QUEUED and row.job_id != SUBMITTING
                  and row.id not in self.withdrawing]
        now = time.monotonic()
        self._note_pending(queued, now)
        unhealthy = self.unhealthy
        candidates = ([row for row in queued if row.job_id is None] if unhealthy else
                      [row for row in queued if self._waited(row, now) is not None])
        if not candidates:
            return moved
        candidates = sorted(candidates, key=lambda row: row.seq)
        self._load_chains(candidates)
        budget = self.per_tick
        for row in candidates:
            chain = self._chains.get(row.id)
            if chain is None:
                continue
            if unhealthy:
                why = f"its scheduler failing for {self.failed_ticks} ticks"
            else:
                waited = self._waited(row, now)
                if chain.max_queue_wait is None or waited is None \
                        or waited < chain.max_queue_wait:
                    continue
                why = f"{_minutes(waited)} queued"
            target = self._next(chain)
            if target is None:
                continue
            if budget <= 0:
                break  # the rest next tick
            budget -= 1
            if row.job_id is None:  # never accepted here: nothing to confirm
                moved += self._move(row, None, Withdrawal("", target, why))
            else:
                self._withdraw(row, Withdrawal(row.job_id, target, why))
        return moved

    def holds(self, task_id: str) -> bool:
        """Whether the task's job is being withdrawn (its job state is overflow's)."""
        return task_id in self.withdrawing

    # ---- parts ----

    def _note_pending(self, queued: list[Any], now: float) -> None:
        """Since when each QUEUED task's job is known here (this reconciler's first sight
        of it: a restart starts the clock again, later, never sooner)."""
        seen = self._pending_since
        present = set()
        for row in queued:
            if row.job_id:
                present.add(row.id)
                known = seen.get(row.id)
                if known is None or known[0] != row.job_id:
                    seen[row.id] = (row.job_id, now)
        for task_id in [task_id for task_id in seen if task_id not in present]:
            del seen[task_id]
            self._chains.pop(task_id, None)

    def _waited(self, row: Any, now: float) -> float | None:
        """Seconds the row's job has been PENDING as far as this reconciler knows."""
        known = self._pending_since.get(row.id)
        if known is None or self.index.job_states.get(row.job_id) is not JobState.PENDING:
            return None
        return now - known[1]

    def _load_chains(self, rows: list[Any]) -> None:
        """The routes of the rows not seen yet: one read of their documents and logs."""
        new = [row for row in rows if row.id not in self._chains]
        if not new:
            return
        found = self.queries.tasks_and_logs([row.id for row in new])
        for row in new:
            task, logs = found.get(row.id, (None, []))
            chain = None
            if task is not None:
                try:
                    # the owner's groups of now: a route that no longer holds this
                    # instance moves nothing (_next)
                    route = self.router.route(task, row.owner, self.groups(row.owner))
                    tried = frozenset(str((entry.get("metadata") or {}).get("backend"))
                                      for entry in logs)
                    chain = Chain((route.instance, *route.fallbacks), route.max_queue_wait,
                                  tried)
                except Unroutable:
                    chain = None
                except Exception:  # a task's values must not stop this instance's ticks
                    log.exception("task %s: its route could not be worked out again; it "
                                  "stays on %s", row.id, self.backend.name)
                    chain = None
            self._chains[row.id] = chain

    def _next(self, chain: Chain) -> str | None:
        """The instance after this one on the task's route that it never tried."""
        here = self.backend.name
        if here not in chain.instances:
            return None  # the rules changed since it was routed: it stays
        after = chain.instances[chain.instances.index(here) + 1:]
        return next((name for name in after
                     if name not in chain.tried and name != here and name in self.instances),
                    None)

    def _withdraw(self, row: Any, withdrawal: Withdrawal) -> None:
        try:
            self.backend.withdraw(withdrawal.job_id)
        except (BackendError, OSError) as exc:
            metrics.count_scheduler_call(self.backend.name, "cancel", ok=False)
            log.warning("task %s: withdrawing job %s from %s for overflow failed (it stays "
                        "here): %s", row.id, withdrawal.job_id, self.backend.name, exc)
            return
        metrics.count_scheduler_call(self.backend.name, "cancel", ok=True)
        log.info("task %s: job %s withdrawn from %s (%s); moves to %s once the scheduler "
                 "confirms it gone", row.id, withdrawal.job_id, self.backend.name,
                 withdrawal.why, withdrawal.target)
        self.withdrawing[row.id] = withdrawal

    def _confirm(self, statuses: dict[str, JobStatus]) -> int:
        """Move the tasks whose withdrawn job the scheduler shows ended, no worker of
        theirs having started; give up on those whose task or job moved on."""
        moved = 0
        for task_id, withdrawal in list(self.withdrawing.items()):
            row = self.index.rows.get(task_id)
            status = statuses.get(withdrawal.job_id)
            if row is None or row.state != QUEUED or row.job_id != withdrawal.job_id:
                del self.withdrawing[task_id]  # ended, canceled, started: not ours to move
                continue
            if status is None or not status.state.finished:
                if status is not None and status.state == JobState.RUNNING:
                    self._stays(row, "its job started anyway")
                continue  # PENDING, UNKNOWN (unreachable): not confirmed, it stays here
            if status.state not in GONE_UNSTARTED:
                self._stays(row, f"its job ended {status.state.value}: it ran")
                continue
            tail = self.tails.of(row)
            tail.read_new()
            if tail.fold.last_seq > 0:
                self._stays(row, "its worker started anyway")
                continue
            del self.withdrawing[task_id]
            moved += self._move(row, withdrawal.job_id, withdrawal,
                                f"{status.state.value} {status.reason}".rstrip())
        return moved

    def _stays(self, row: Any, why: str) -> None:
        log.info("task %s: overflow from %s abandoned, %s", row.id, self.backend.name, why)
        del self.withdrawing[row.id]
        self.look_again.add(row.id)  # its job state is the reconciler's again

    def _move(self, row: Any, job_id: str | None, withdrawal: Withdrawal,
              confirmed: str = "") -> int:
        chain = self._chains.get(row.id)
        position = (chain.instances.index(withdrawal.target) + 1
                    if chain is not None and withdrawal.target in chain.instances else 0)
        logs = attempt_logs(self.writer.stored_logs(row), max(row.attempt, 1), new=False)
        scheduler = f"; scheduler: {confirmed}" if confirmed else ""
        logs[-1]["gateway_logs"].append(
            f"{now_rfc3339()} withdrawn from {self.backend.name} after {withdrawal.why}"
            f"{scheduler}; submitted to {withdrawal.target} (attempt {position} of the route)")
        if not self.queries.move_to_instance(row.id, job_id, withdrawal.target, logs):
            self.index.recheck(row.id)
            return 0
        log.info("task %s moved from %s to %s (%s)", row.id, self.backend.name,
                 withdrawal.target, withdrawal.why)
        self.index.forget(row.id)
        self.tails.drop(row.id)
        self._pending_since.pop(row.id, None)
        self._chains.pop(row.id, None)
        self.queries.changed.set()  # the next instance's reconciler submits it now
        return 1


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f}m" if seconds >= 60 else f"{seconds:.0f}s"
