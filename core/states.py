"""TES task states and the transitions allowed between them, as data."""

from __future__ import annotations

import enum


class State(str, enum.Enum):
    UNKNOWN = "UNKNOWN"
    QUEUED = "QUEUED"
    INITIALIZING = "INITIALIZING"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    COMPLETE = "COMPLETE"
    EXECUTOR_ERROR = "EXECUTOR_ERROR"
    SYSTEM_ERROR = "SYSTEM_ERROR"
    CANCELED = "CANCELED"
    CANCELING = "CANCELING"
    PREEMPTED = "PREEMPTED"


TERMINAL: frozenset[State] = frozenset(
    {State.COMPLETE, State.EXECUTOR_ERROR, State.SYSTEM_ERROR, State.CANCELED, State.PREEMPTED}
)

_ENDINGS = {State.COMPLETE, State.EXECUTOR_ERROR, State.SYSTEM_ERROR, State.CANCELING,
            State.CANCELED, State.PREEMPTED}

# state -> states it may move to. Terminal states move nowhere.
# QUEUED may come back from INITIALIZING when an attempt is lost and retried.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.UNKNOWN: frozenset({State.QUEUED} | _ENDINGS),
    State.QUEUED: frozenset({State.INITIALIZING, State.RUNNING} | _ENDINGS),
    State.INITIALIZING: frozenset({State.QUEUED, State.RUNNING, State.PAUSED} | _ENDINGS),
    State.RUNNING: frozenset({State.QUEUED, State.PAUSED} | _ENDINGS),
    State.PAUSED: frozenset({State.RUNNING} | _ENDINGS),
    State.CANCELING: frozenset({State.CANCELED}),
    **{s: frozenset() for s in TERMINAL},
}

ALL_STATES: tuple[str, ...] = tuple(s.value for s in State)


def can_transition(current: State | str, target: State | str) -> bool:
    """True when a task in `current` may move to `target` (same state: no-op, allowed)."""
    current, target = State(current), State(target)
    return current == target and current not in TERMINAL or target in TRANSITIONS[current]


def is_terminal(state: State | str) -> bool:
    return State(state) in TERMINAL
