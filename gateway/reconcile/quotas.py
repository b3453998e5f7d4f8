"""Which QUEUED tasks a tick submits: owners in turn (fair share), within their limits
(limits.per_owner, core/quotas.py).

Each tick the owners with QUEUED tasks without a job take turns, one task each per
round, oldest task first within an owner; the owner whose oldest task is oldest goes
first. So one owner's 10,000 tasks never hold another's 10 back a whole backlog: each
gets a share of every tick's reconciler.submit_per_tick. With a limit set, what each
owner has in flight is read once per tick (gateway/store/owner_counts.py: the truth
across replicas and instances), plus what this tick picks. An owner whose next task
does not fit waits (no smaller task of theirs jumps ahead, so a big task is never
starved); a task that could never fit (more cores than the owner's limit) is skipped.
A task that waits gets one line in its system logs the first time (and one gateway log
line); nothing is written again while it waits, and a waiting tick does not wake the
reconciler early.
Cost: one pass over the QUEUED rows plus a sort of each owner's first
`submit_per_tick`; with limits, one grouped query (benchmarks/quotas_tick.py).
"""

from __future__ import annotations

import heapq
import logging
from collections import deque
from collections.abc import Mapping
from operator import itemgetter
from typing import Any

from funnel_hpc.core.quotas import OwnerLimits, OwnerUsage, QuotaPolicy, Refusal
from funnel_hpc.gateway.reconcile.core import LOGGER_NAME, attempt_logs
from funnel_hpc.gateway.store import owner_counts
from funnel_hpc.gateway.store.reconciler_queries import FieldUpdate, ReconcilerQueries
from funnel_hpc.gateway.store.tasks import now_rfc3339

log = logging.getLogger(LOGGER_NAME)
WAITING = " waiting: "  # in a gateway log line: the task was told why it waits


class FairShare:
    """Picks each tick's tasks to submit to one backend instance, and tells a task once
    why it waits."""

    def __init__(self, policy: QuotaPolicy | None, queries: ReconcilerQueries, instance: str):
        self.policy = policy
        self.queries = queries
        self.instance = instance
        self._told: set[str] = set()  # waiting tasks whose logs say so

    def pick(self, unsubmitted: Mapping[str, Any], limit: int) -> list[Any]:
        """Up to `limit` of the QUEUED rows without a job, owners in turn, within limits."""
        if not unsubmitted or limit <= 0:
            return []
        # by position, not name: a database row's attribute costs 10 times its index
        # (10,000 rows: 3.4 ms against 0.3); the index's patched rows keep the same fields
        fields = next(iter(unsubmitted.values()))._fields
        owner_of, seq_of = itemgetter(fields.index("owner")), itemgetter(fields.index("seq"))
        queues: dict[str | None, list[Any]] = {}
        for row in unsubmitted.values():
            queues.setdefault(owner_of(row), []).append(row)
        for owner, rows in queues.items():
            # a sort in C beats a heap unless few of many are wanted
            queues[owner] = (sorted(rows, key=seq_of)[:limit] if len(rows) <= 8 * limit
                             else heapq.nsmallest(limit, rows, key=seq_of))
        if self._told:
            self._told &= unsubmitted.keys()
        if self.policy is None or not self.policy.enabled:
            return _in_turn(queues, limit)
        return self._within_limits(self.policy, queues, limit)

    def _within_limits(self, policy: QuotaPolicy, queues: dict[str | None, list[Any]],
                       limit: int) -> list[Any]:
        usage = owner_counts.in_flight(self.queries.engine)
        limits: dict[str | None, OwnerLimits] = {}
        waiting: list[tuple[Any, Refusal]] = []
        picked: list[Any] = []
        turns = deque(sorted(queues, key=lambda owner: queues[owner][0].seq))
        next_of = dict.fromkeys(queues, 0)
        while turns and len(picked) < limit:
            owner = turns.popleft()
            rows, index = queues[owner], next_of[owner]
            if owner not in limits:
                limits[owner] = policy.limits(owner)
            used = usage.setdefault(owner, OwnerUsage())
            while index < len(rows):
                row = rows[index]
                index += 1
                cores = row.cpu_cores or 1
                refusal = policy.refusal(owner, limits[owner], used, self.instance, cores)
                if refusal is None:
                    picked.append(row)
                    used.add(self.instance, 1, cores)
                    break
                waiting.append((row, refusal))
                if not refusal.never:  # the owner waits: none of theirs jumps ahead
                    index = len(rows) + 1
                    break
            next_of[owner] = index
            if index < len(rows):
                turns.append(owner)
        self._tell(waiting)
        return picked

    def _tell(self, waiting: list[tuple[Any, Refusal]]) -> None:
        """One line in the logs of each task that starts waiting (written once: the
        stored logs are read first, so a restarted gateway does not write it again)."""
        new = [(row, refusal) for row, refusal in waiting if row.id not in self._told]
        if not new:
            return
        stored = self.queries.stored_logs([row.id for row, _ in new])
        updates = []
        for row, refusal in new:
            self._told.add(row.id)
            logs = attempt_logs(stored.get(row.id), row.attempt + 1)
            notes = logs[row.attempt]["gateway_logs"]
            if any(WAITING in note for note in notes):
                continue
            notes.append(f"{now_rfc3339()} {refusal.reason}")
            log.info("task %s %s", row.id, refusal.reason)
            updates.append(FieldUpdate(row.id, "QUEUED", logs, row.event_seq))
        if updates:
            self.queries.update_many(updates)


def _in_turn(queues: dict[str | None, list[Any]], limit: int) -> list[Any]:
    """Owners' rows interleaved, one each per round, the owner of the oldest first."""
    if len(queues) == 1:
        return next(iter(queues.values()))[:limit]
    turns = sorted(queues.values(), key=lambda rows: rows[0].seq)
    picked: list[Any] = []
    for index in range(limit):
        turns = [rows for rows in turns if index < len(rows)]
        if not turns:
            break
        picked += [rows[index] for rows in turns]
    return picked[:limit]
