"""Where a task runs, decided once at POST: the routing rules (core/routing.py) applied to
the validated task, its owner and the owner's unix groups; and which instances a caller
may be routed to, for service-info.

With several instances, the client's own value of the route tag (core.routing.ROUTE_TAG)
is never trusted: it is taken out of the task before the rules see it and replaced by the
instance chosen. With one instance (no `backends:`), a task is stored as it was sent.

Cost: one Router built per process (TaskService holds one Placement); per POST, the rules
in order plus, for a signed-in local user, one cached group lookup (OwnerGroups: at most
MAX_OWNERS names, each looked up again after GROUPS_TTL seconds).
"""

from __future__ import annotations

import grp
import os
import pwd
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

from funnel_hpc.core.config import Config
from funnel_hpc.core.routing import ROUTE_TAG, Route, Router, Rule

# a rule whose `backend` is this lets a task name its instance (backend_parameters.backend)
REQUESTED = "requested"
# the backend_parameters key a task names its instance with, under such a rule
REQUEST_KEY = "backend"
MAX_OWNERS = 4096   # owners whose groups are cached (the oldest entry goes first)
GROUPS_TTL = 60.0   # seconds before an owner's groups are looked up again


class OwnerGroups:
    """A local user's unix groups (names), cached; empty for a name that is no local
    user (a token's or an OIDC subject's) or for no owner at all (auth off)."""

    def __init__(self, max_owners: int = MAX_OWNERS, ttl: float = GROUPS_TTL):
        self.max_owners = max_owners
        self.ttl = ttl
        self._cache: dict[str, tuple[float, frozenset[str]]] = {}
        self._lock = threading.Lock()

    def __call__(self, owner: str | None) -> frozenset[str]:
        if not owner:
            return frozenset()
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(owner)
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]
        groups = self._look_up(owner)
        with self._lock:
            self._cache.pop(owner, None)
            while len(self._cache) >= self.max_owners:  # dicts keep insertion order
                del self._cache[next(iter(self._cache))]
            self._cache[owner] = (now, groups)
        return groups

    @staticmethod
    def _look_up(owner: str) -> frozenset[str]:
        try:
            account = pwd.getpwnam(owner)
            gids = os.getgrouplist(account.pw_name, account.pw_gid)
        except (KeyError, OSError, ValueError):  # no such user; a NUL in the name
            return frozenset()
        names = set()
        for gid in gids:
            try:
                names.add(grp.getgrgid(gid).gr_name)
            except KeyError:  # a gid without a name in the group database
                continue
        return frozenset(names)


@dataclass(frozen=True)
class Reachable:
    """An instance a caller may be routed to (service-info)."""

    name: str
    kind: str
    requestable: bool  # a task may name it in backend_parameters.backend


class Placement:
    """The routing of one server's configuration, built once."""

    def __init__(self, router: Router, kinds: Mapping[str, str],
                 groups: OwnerGroups | None = None):
        self.router = router
        self.kinds = dict(kinds)  # instance name -> kind, in the configuration's order
        # one instance: nothing to say (a task keeps its tags as sent, TES round trips)
        self.several = len(self.kinds) > 1
        self.groups = groups or OwnerGroups()

    @classmethod
    def from_config(cls, config: Config) -> Placement:
        return cls(config.router(), {instance.name: instance.kind
                                     for instance in config.instances()})

    def route(self, spec: dict, owner: str | None) -> Route:
        """The instance for a validated task (Unroutable: no rule accepts it). With several
        instances the task's route tag is set to it, a client's value of that tag dropped
        first, unseen."""
        # no rules, no question: the one default instance, without a group lookup
        groups = self.groups(owner) if self.router.rules else frozenset()
        if not self.several:
            return self.router.route(spec, owner, groups)
        tags = spec.get("tags")
        if isinstance(tags, dict):
            tags.pop(ROUTE_TAG, None)
        route = self.router.route(spec, owner, groups)
        spec["tags"] = {**(spec.get("tags") or {}), ROUTE_TAG: route.instance}
        return route

    def requested(self, route: Route) -> bool:
        """Whether the task chose its instance itself (a `backend: requested` rule)."""
        return route.rule is not None and self._rule(route.rule).backend == REQUESTED

    def take_request(self, spec: dict, route: Route) -> None:
        """backend_parameters.backend of a task that chose its instance has done its work:
        it is taken out, so the instance's allow-list never sees (nor drops) it. Under any
        other rule it stays a backend parameter like another (dropped unless allowed)."""
        params = (spec.get("resources") or {}).get("backend_parameters")
        if params and self.requested(route):
            for key in [key for key in params if key.lower() == REQUEST_KEY]:
                del params[key]

    def _rule(self, index: int) -> Rule:
        return next(rule for rule in self.router.rules if rule.index == index)

    def reachable(self, owner: str | None) -> list[Reachable]:
        """The instances some rule may send this caller's tasks to, in configuration
        order: a rule restricted to owners or groups counts only when the caller is one."""
        if not self.router.rules:
            return [Reachable(self.router.default, self.kinds[self.router.default], False)]
        groups = self.groups(owner)
        names: set[str] = set()
        requestable: set[str] = set()
        for rule in self.router.rules:
            if not _may_apply(rule.when, owner, groups):
                continue
            if rule.backend == REQUESTED:
                requestable.update(rule.allowed)
            else:
                names.add(rule.backend)
            names.update(rule.overflow)
        names |= requestable
        return [Reachable(name, kind, name in requestable)
                for name, kind in self.kinds.items() if name in names]


def _may_apply(when: Mapping[str, object], owner: str | None, groups: frozenset[str]) -> bool:
    """Whether the owner and group conditions of a rule's `when` admit this caller (the
    other conditions are on the task, unknown here)."""
    if not isinstance(when, Mapping):
        return True
    wanted_owners = _names(when.get("owner"))
    if wanted_owners is not None and owner not in wanted_owners:
        return False
    wanted_groups = _names(when.get("group"))
    return wanted_groups is None or bool(wanted_groups & groups)


def _names(value: object) -> frozenset[str] | None:
    """A condition's names (a name or a list of them); None: no such condition."""
    if value is None:
        return None
    if isinstance(value, str):
        return frozenset((value,))
    if isinstance(value, (list, tuple, set, frozenset)):
        return frozenset(str(item) for item in value)
    return None
