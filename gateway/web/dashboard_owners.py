"""The dashboard's owners page (admins only): what each owner has in flight and waiting,
against their limits.per_owner bounds. Two grouped queries (gateway/store/owner_counts.py)
per view; the rows are the owners with tasks in flight or waiting, most in flight first,
at most MAX_ROWS.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.engine import Engine

from funnel_hpc.core.quotas import NO_OWNER, OwnerUsage, QuotaPolicy
from funnel_hpc.gateway.store import owner_counts

MAX_ROWS = 500


@dataclass(frozen=True)
class OwnerRow:
    """One owner's line: in flight (tasks, cores), waiting, limits (0: none), per instance."""

    owner: str
    tasks: int
    cores: int
    waiting: int
    max_tasks: int
    max_cores: int
    at_limit: bool
    # per instance: name, tasks, cores, max tasks, max cores
    instances: tuple[tuple[str, int, int, int, int], ...]


def owner_rows(engine: Engine, policy: QuotaPolicy) -> tuple[list[OwnerRow], int]:
    """The page's rows, and how many owners there are in all."""
    found = owner_counts.in_flight(engine)
    queued = owner_counts.waiting(engine)
    owners = sorted(set(found) | set(queued),
                    key=lambda owner: (-found.get(owner, OwnerUsage()).overall.tasks,
                                       -queued.get(owner, 0), owner or ""))
    rows = []
    for owner in owners[:MAX_ROWS]:
        usage = found.get(owner) or OwnerUsage()
        limits = policy.limits(owner)
        names = sorted(set(usage.instances) | set(limits.instances))
        instances = []
        for name in names:
            used = usage.on(name)
            tasks, cores = limits.instances.get(name, (None, None))
            instances.append((name, used.tasks, used.cores, tasks.limit if tasks else 0,
                              cores.limit if cores else 0))
        rows.append(OwnerRow(owner if owner is not None else NO_OWNER, usage.overall.tasks,
                             usage.overall.cores, queued.get(owner, 0), limits.tasks.limit,
                             limits.cores.limit, policy.enabled and limits.at_limit(usage),
                             tuple(instances)))
    return rows, len(owners)
