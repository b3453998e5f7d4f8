"""Per-owner limits (limits.per_owner): the bounds that apply to one owner, and whether one
more task of theirs fits in what they have in flight.

Each bound (tasks or cpu cores; overall or on one backend instance) is decided key by key
by the most specific level that sets it: the owner's entry (owners.<name>), else the
owner's unix groups (groups.<group>; of several, the most generous: 0 = no limit beats
any number, else the largest), else the defaults (limits.per_owner, and its
instances.<instance>). 0 or unset everywhere: no limit. An owner's groups come from the
lookup the policy is given (the gateway's cached one, as routing's), asked only when
groups are configured.
"""

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from funnel_hpc.core.config import InstanceQuota, OwnerQuota, PerOwnerSection

PATH = "limits.per_owner"
TASKS, CORES = "max_tasks_in_flight", "max_cpu_cores_in_flight"
NO_OWNER = "(no owner)"  # tasks created with auth off share one owner


@dataclass
class Usage:
    """Tasks and cpu cores in flight."""

    tasks: int = 0
    cores: int = 0

    def add(self, tasks: int, cores: int) -> None:
        self.tasks += tasks
        self.cores += cores


@dataclass
class OwnerUsage:
    """One owner's tasks and cores in flight: overall and per backend instance."""

    overall: Usage = field(default_factory=Usage)
    instances: dict[str, Usage] = field(default_factory=dict)

    def add(self, instance: str, tasks: int, cores: int) -> None:
        self.overall.add(tasks, cores)
        self.instances.setdefault(instance, Usage()).add(tasks, cores)

    def on(self, instance: str) -> Usage:
        return self.instances.get(instance) or Usage()


@dataclass(frozen=True)
class Bound:
    """One limit (0: none) and the configuration key that set it."""

    limit: int
    key: str


@dataclass(frozen=True)
class OwnerLimits:
    """The bounds of one owner: overall, and per instance (an instance not listed: none)."""

    tasks: Bound
    cores: Bound
    instances: Mapping[str, tuple[Bound, Bound]]  # instance -> (tasks, cores)

    def at_limit(self, usage: OwnerUsage) -> bool:
        """Whether some bound is reached (no further task of this owner fits)."""
        pairs = [(usage.overall, self.tasks, self.cores)]
        pairs += [(usage.on(name), tasks, cores)
                  for name, (tasks, cores) in self.instances.items()]
        return any(bound.limit and used >= bound.limit
                   for usage_of, tasks, cores in pairs
                   for used, bound in ((usage_of.tasks, tasks), (usage_of.cores, cores)))


@dataclass(frozen=True)
class Refusal:
    """Why a task may not be submitted now; `never`: not while the limit stays as it is
    (the task alone needs more cores than the owner may have in flight)."""

    reason: str
    never: bool = False


def shown(owner: str | None) -> str:
    """An owner's name in a log line: quoted when it holds a control character (a name
    from a token is not trusted to keep to one line)."""
    if owner is None:
        return NO_OWNER
    return owner if owner.isprintable() else json.dumps(owner)


class QuotaPolicy:
    """limits.per_owner, resolved per owner."""

    def __init__(self, section: PerOwnerSection,
                 groups_of: Callable[[str | None], frozenset[str]]):
        """`groups_of`: an owner's unix group names (the gateway's cached lookup,
        gateway/store/placement.py's OwnerGroups)."""
        self.section = section
        self.groups_of = groups_of
        levels: list[InstanceQuota] = [section, *section.instances.values()]
        for entry in (*section.groups.values(), *section.owners.values()):
            levels += [entry, *entry.instances.values()]
        # any positive bound anywhere: else nothing is counted at all
        self.enabled = any(getattr(level, key) for level in levels for key in (TASKS, CORES))

    def groups(self, owner: str) -> frozenset[str]:
        """The owner's groups that limits.per_owner.groups names (none looked up when it
        names none)."""
        if not self.section.groups:
            return frozenset()
        return self.groups_of(owner) & self.section.groups.keys()

    def limits(self, owner: str | None) -> OwnerLimits:
        """The owner's bounds (None: the tasks of auth off), each with the key that set it."""
        section = self.section
        own = section.owners.get(owner) if owner is not None else None
        groups = sorted(self.groups(owner)) if owner is not None else []
        instances = {name for level in (section, own, *(section.groups[g] for g in groups))
                     if level is not None for name in level.instances}

        def bound(key: str, instance: str | None) -> Bound:
            def value(level: OwnerQuota | PerOwnerSection | None) -> int | None:
                if level is None:
                    return None
                if instance is None:
                    return getattr(level, key)
                entry = level.instances.get(instance)
                return getattr(entry, key) if entry is not None else None

            where = f".instances.{instance}" if instance is not None else ""
            found = value(own)
            if found is not None:  # the owner's own
                return Bound(found, f"{PATH}.owners.{owner}{where}.{key}")
            set_by = [(number, name) for name in groups
                      if (number := value(section.groups[name])) is not None]
            if set_by:  # the most generous: 0 (none) first, else the largest
                number, name = max(set_by, key=lambda pair: (pair[0] == 0, pair[0]))
                return Bound(number, f"{PATH}.groups.{name}{where}.{key}")
            return Bound(value(section) or 0, f"{PATH}{where}.{key}")

        return OwnerLimits(bound(TASKS, None), bound(CORES, None),
                           {name: (bound(TASKS, name), bound(CORES, name))
                            for name in sorted(instances)})

    def refusal(self, owner: str | None, limits: OwnerLimits, usage: OwnerUsage,
                instance: str, cores: int) -> Refusal | None:
        """None when one more task of `cores` on `instance` fits the owner's limits."""
        who = shown(owner)
        checks = [(usage.overall, limits.tasks, limits.cores, "")]
        if instance in limits.instances:
            tasks, cores_bound = limits.instances[instance]
            checks.append((usage.on(instance), tasks, cores_bound, f" on {instance}"))
        for _used, _tasks, cores_bound, where in checks:  # first: what waiting cannot cure
            if cores_bound.limit and cores > cores_bound.limit:
                return Refusal(f"waiting: this task needs {cores} cpu cores, more than {who} "
                               f"may have in flight{where} ({cores_bound.limit}: "
                               f"{cores_bound.key}); it starts only if that limit is raised",
                               never=True)
        for used, tasks, cores_bound, where in checks:
            if tasks.limit and used.tasks + 1 > tasks.limit:
                return Refusal(f"waiting: {who} has {used.tasks} of {tasks.limit} tasks in "
                               f"flight{where} ({tasks.key})")
            if cores_bound.limit and used.cores + cores > cores_bound.limit:
                return Refusal(f"waiting: {who} has {used.cores} of {cores_bound.limit} cpu "
                               f"cores in flight{where} and this task needs {cores} "
                               f"({cores_bound.key})")
        return None
