"""Routing rules: which backend instance runs a task, decided once, at POST.

`routing:` in the configuration is a list of rules tried in order; the first whose
`when` matches the task names its instance (`backend`), the instances it may overflow to
(`overflow`) and how long the task may wait QUEUED before it does (`max_queue_wait`).
A task no rule accepts is refused (HTTP 400 with the reason). No rules at all: every task
goes to the first instance.

INTERFACE (stable; the matcher and the validation are being completed):

    rules = parse_rules(raw_list, instance_names)   # RuleError("routing[1].when...: why")
    route = Router(rules, default=first_instance).route(task, owner, groups)
    route.instance, route.rule (index or None), route.fallbacks, route.max_queue_wait
    Unroutable(reason) when no rule accepts the task.

This module imports nothing of the gateway's or the configuration's (core/config.py
imports it to check `routing:` at load).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

INSTANCE_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
# the tag a routed task carries, naming its instance
ROUTE_TAG = "funnel-hpc.backend"
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class RuleError(ValueError):
    """A routing rule is invalid: the message starts with its key path."""


class Unroutable(ValueError):
    """No rule accepts the task: the message says why (for HTTP 400)."""


class Rule:
    """One parsed rule: its condition and where it sends a task."""

    __slots__ = ("index", "when", "backend", "allowed", "overflow", "max_queue_wait")

    def __init__(self, index: int, when: Mapping[str, object], backend: str,
                 allowed: tuple[str, ...] = (), overflow: tuple[str, ...] = (),
                 max_queue_wait: float | None = None):
        self.index = index
        self.when = when
        self.backend = backend          # an instance name, or "requested"
        self.allowed = allowed          # with backend "requested": what a task may ask for
        self.overflow = overflow
        self.max_queue_wait = max_queue_wait  # seconds

    def matches(self, task: Mapping[str, Any], owner: str | None,
                groups: frozenset[str]) -> bool:
        tags = task.get("tags") or {}
        for key, wanted in (self.when.get("tags") or {}).items():
            if key not in tags or (wanted != "any" and tags[key] != wanted):
                return False
        return True


class Route:
    """Where a task goes and why."""

    __slots__ = ("instance", "rule", "fallbacks", "max_queue_wait")

    def __init__(self, instance: str, rule: int | None, fallbacks: tuple[str, ...] = (),
                 max_queue_wait: float | None = None):
        self.instance = instance
        self.rule = rule                  # index in routing:, None for the default
        self.fallbacks = fallbacks
        self.max_queue_wait = max_queue_wait

    def describe(self) -> str:
        """For the task's system logs: "routed to gpu by routing[1]"."""
        why = f"routing[{self.rule}]" if self.rule is not None else "the default"
        return f"routed to {self.instance} by {why}"


def duration(value: object, path: str) -> float:
    """Seconds of "30m", "2h", "45s", "1d" or a number of seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    match = _DURATION.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise RuleError(f"{path}: expected a duration such as 30m, 2h or 45s, got {value!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_rules(raw: Sequence[object], instances: Sequence[str]) -> tuple[Rule, ...]:
    """The rules of `routing:` (plain YAML data), checked against the instance names."""
    rules = []
    for index, entry in enumerate(raw):
        path = f"routing[{index}]"
        if not isinstance(entry, Mapping):
            raise RuleError(f"{path}: expected a mapping, got {entry!r}")
        backend = entry.get("backend")
        if backend not in instances:
            raise RuleError(f"{path}.backend: {backend!r} is no backend instance "
                            f"(instances: {', '.join(instances)})")
        overflow = tuple(entry.get("overflow") or ())
        wait = entry.get("max_queue_wait")
        rules.append(Rule(index, entry.get("when") or {}, str(backend), (), overflow,
                          duration(wait, f"{path}.max_queue_wait") if wait is not None
                          else None))
    return tuple(rules)


class Router:
    """Rules in order, first match wins."""

    def __init__(self, rules: Sequence[Rule], default: str):
        self.rules = tuple(rules)
        self.default = default  # with no rules at all

    def route(self, task: Mapping[str, Any], owner: str | None = None,
              groups: frozenset[str] = frozenset()) -> Route:
        if not self.rules:
            return Route(self.default, None)
        for rule in self.rules:
            if rule.matches(task, owner, groups):
                return Route(rule.backend, rule.index, rule.overflow, rule.max_queue_wait)
        raise Unroutable("no routing rule accepts this task")
