"""What each owner has in flight, per backend instance: one grouped query.

"In flight" is a task that holds a job, or a claim on one: not ended, with a job id
("" while its submission is under way), whatever its state (QUEUED with a job,
INITIALIZING, RUNNING, PAUSED, CANCELING until the job is gone). A task's cores are its
tasks.cpu_cores column, filled at create from resources.cpu_cores (NULL counts as 1).
Read by every reconciler tick while limits.per_owner sets a limit (the database is the
truth across replicas and instances), by /metrics and by the dashboard's owners page.
Cost: one range read on ix_tasks_state_seq over the active tasks, grouped (10,000 QUEUED
tasks without a job: see benchmarks/reconciler_tick.py's quotas rows).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from funnel_hpc.core.quotas import OwnerUsage
from funnel_hpc.core.states import TERMINAL, State
from funnel_hpc.gateway.store import db

_ACTIVE_STATES = [state.value for state in State if state not in TERMINAL]


def task_cores(spec: Mapping[str, Any]) -> int:
    """The cpu cores a task counts for: resources.cpu_cores, 1 when unset (or not a
    positive integer: admission refused those already)."""
    cores = (spec.get("resources") or {}).get("cpu_cores")
    return cores if isinstance(cores, int) and not isinstance(cores, bool) and cores > 0 else 1


def in_flight(engine: Engine) -> dict[str | None, OwnerUsage]:
    """Owner (None: tasks created with auth off) -> what they have in flight."""
    t = db.tasks
    query = (select(t.c.owner, t.c.backend, func.count(),
                    func.sum(func.coalesce(t.c.cpu_cores, 1)))
             .where(t.c.state.in_(_ACTIVE_STATES), t.c.job_id.is_not(None))
             .group_by(t.c.owner, t.c.backend))
    found: dict[str | None, OwnerUsage] = {}
    with db.reading(engine) as conn:
        for owner, backend, tasks, cores in conn.execute(query):
            found.setdefault(owner, OwnerUsage()).add(backend or "", int(tasks), int(cores or 0))
    return found


def waiting(engine: Engine) -> dict[str | None, int]:
    """Owner -> QUEUED tasks without a job (for the dashboard's owners page)."""
    t = db.tasks
    query = (select(t.c.owner, func.count())
             .where(t.c.state == State.QUEUED.value, t.c.job_id.is_(None))
             .group_by(t.c.owner))
    with db.reading(engine) as conn:
        return {owner: int(count) for owner, count in conn.execute(query)}
