"""Folding workers' event logs into task rows, for the reconciler.

A tick reads the event logs of the tasks it looks at (gateway/reconcile/index.py says
which), reads the stored logs of those with news in one query, and stores what the news
changed: a state change at once (compare-and-set, one transaction each), anything else
(live logs, executor starts) for all tasks together in one transaction
(reconciler_queries.update_many). 1,000 tasks each with a new live-log line cost one
read, one UPDATE executemany and one INSERT executemany, not 1,000 of each.

The EventFolder is made by the reconciler in its constructor over the store's
reconciler_queries, its in-flight index, its event tails, the tasks to look at again and
its task writer (gateway/reconcile/core.py); it keeps only the logs its last batch wrote.
"""

from __future__ import annotations

import logging
from typing import Any

from funnel_hpc.backends.base import JobState, JobStatus
from funnel_hpc.core.events import now_rfc3339
from funnel_hpc.core.states import TERMINAL, State, can_transition
from funnel_hpc.gateway.reconcile.core import (
    LOGGER_NAME,
    EventTails,
    LookAgain,
    TaskWriter,
    TickStats,
)
from funnel_hpc.gateway.reconcile.index import InFlightIndex
from funnel_hpc.gateway.store.reconciler_queries import FieldUpdate, ReconcilerQueries

log = logging.getLogger(LOGGER_NAME)

# the scheduler took the job back: a worker that saw its SIGTERM is not a user's cancel
SCHEDULER_STOPS = frozenset({JobState.PREEMPTED, JobState.NODE_FAILED})

Batch = list[tuple[Any, FieldUpdate]]


class EventFolder:
    """The reconciler's reading and storing of worker events."""

    def __init__(self, queries: ReconcilerQueries, index: InFlightIndex, tails: EventTails,
                 look_again: LookAgain, writer: TaskWriter, backend_name: str):
        self.queries = queries
        self.index = index
        self.tails = tails
        self.look_again = look_again
        self.writer = writer
        self.backend_name = backend_name
        # task id -> (updated_at, logs) the last batch of live-log updates stored
        self.written_logs: dict[str, tuple[str, list]] = {}

    def read_events(self, rows: list[Any], stats: TickStats) -> tuple[set[str], set[str]]:
        """New worker events of `rows` folded and stored; the ids of the tasks that had
        news, and of those now terminal (they need no job state)."""
        self.tails.open(rows)
        stats.looked_at += len(rows)
        isolated = self.look_again.isolated
        news = [row for row in rows if isolated(row, "reading its events", self._read_tail, row)]
        if not news:
            return set(), set()
        stored = self._logs_of(news)
        batch: Batch = []
        ended = set()
        for row in news:
            if isolated(row, "applying its events", self._fold_news, row, stats,
                        stored.get(row.id, []), batch):
                ended.add(row.id)
        self._store_batch(batch, stats)
        return {row.id for row in news}, ended

    def _logs_of(self, rows: list[Any]) -> dict[str, list]:
        """The stored logs of `rows`: those the previous tick's batch wrote and nobody
        changed since (the row's updated_at is still the batch's) from memory, the
        others in one read. A task sending live logs every tick is not read back."""
        written, self.written_logs = self.written_logs, {}
        logs: dict[str, list] = {}
        for row in rows:
            kept = written.get(row.id)
            if kept is not None and kept[0] == row.updated_at:
                logs[row.id] = kept[1]
        missing = [row.id for row in rows if row.id not in logs]
        if missing:
            logs.update(self.queries.stored_logs(missing))
        return logs

    def _read_tail(self, row: Any) -> bool:
        """Read the task's new events; True if there is something to store."""
        tail = self.tails.of(row)
        tail.read_new()
        if tail.behind:
            self.look_again.add(row.id)  # a bounded read left some: read on next tick
        if tail.fold.last_seq <= row.event_seq and not tail.fold.terminal and not tail.notes:
            tail.fresh.clear()  # stored before (a restarted gateway reads from the start)
            return False
        return True

    def _fold_news(self, row: Any, stats: TickStats, stored: list, batch: Batch) -> bool:
        return self.apply_events(row, stats, read=False, stored=stored, batch=batch)

    def _store_batch(self, batch: Batch, stats: TickStats) -> None:
        """The tick's changes without a state change, in one transaction."""
        if not batch:
            return
        try:
            updated, written_at = self.queries.update_many([update for _, update in batch])
        except Exception:
            log.exception("storing the worker events of %d task(s) failed", len(batch))
            self.look_again.update(row.id for row, _ in batch)
            return
        for row, update in batch:
            if row.id in updated:
                tail = self.tails.of(row)
                tail.fresh.clear()
                tail.notes.clear()
                self.index.patch(row, event_seq=update.event_seq, updated_at=written_at)
                self.written_logs[row.id] = (written_at, update.logs)
                stats.updated += 1
            else:
                self.index.recheck(row.id)  # it moved: read it again next tick

    def apply_events(self, row: Any, stats: TickStats, status: JobStatus | None = None, *,
                     read: bool = True, stored: list | None = None,
                     batch: Batch | None = None) -> bool:
        """Fold new worker events into the row; True if the task is now terminal.

        `status`: the scheduler's word on a job that ended, when known. A worker that was
        signalled (CANCELED) without a TES cancel is not judged without it: preemption
        and a node failure are retried or PREEMPTED by the caller, any other stop is
        SYSTEM_ERROR. `read`: read the event logs first; `stored`: the task's stored
        logs when read already; `batch`: where a change without a state change goes
        (stored by _store_batch) instead of its own transaction."""
        tail = self.tails.of(row)
        if read:
            tail.read_new()
        fold = tail.fold
        # the worker's events this change stores, once each (a restarted gateway re-reads
        # the logs from the start: the row's event_seq says what was stored before)
        events = [event for event in tail.fresh if event.get("seq", 0) > row.event_seq]
        if fold.last_seq <= row.event_seq and not fold.terminal and not tail.notes:
            tail.fresh.clear()
            return False
        current = State(row.state)
        target = current
        note = None
        if fold.state and can_transition(current, fold.state):
            target = State(fold.state)
        if current == State.CANCELING and fold.terminal:
            target = State.CANCELED
        elif target == State.CANCELED:
            if status is None or status.state in SCHEDULER_STOPS:
                target = current  # ask the scheduler (poll), or let the caller retry
            else:
                target = State.SYSTEM_ERROR
                note = (f"{now_rfc3339()} the {self.backend_name} job {row.job_id} was stopped "
                        "outside the gateway (the worker was signalled to end) without a TES "
                        f"cancel; scheduler: {status.state.value} {status.reason}".rstrip())
        if target == current and fold.last_seq <= row.event_seq and not tail.notes:
            tail.fresh.clear()
            return False  # a stopped worker waiting for the scheduler's word: nothing new
        logs = self.writer.with_worker_log(row, fold, note, stored)
        _add_notes(logs[-1]["gateway_logs"], tail.notes)
        seq = max(fold.last_seq, row.event_seq)  # notes alone never move it back
        if target != current:
            ok = self.writer.transition(row, current, target, logs=logs, event_seq=seq,
                                       events=events)
        elif batch is not None:
            batch.append((row, FieldUpdate(row.id, current.value, logs, seq, events)))
            return False
        else:
            ok = self.queries.update_fields(row.id, current, logs=logs, event_seq=seq,
                                            events=events)
            if not ok:
                self.index.recheck(row.id)
        if ok:
            tail.fresh.clear()
            tail.notes.clear()
            stats.updated += 1
            if target in TERMINAL:
                stats.finished += 1
        return target in TERMINAL


def _add_notes(gateway_logs: list, notes: list[str]) -> None:
    """The event tail's notes on the task's logs, each once (a restarted gateway reads
    the logs again from the start and finds the same)."""
    for note in notes:
        if not any(isinstance(line, str) and line.endswith(note) for line in gateway_logs):
            gateway_logs.append(f"{now_rfc3339()} {note}")
