"""TES task states and the transitions allowed between them, as data."""

from __future__ import annotations

import enum


# Not a StrEnum (UP042): str(State.X) would change from "State.X" to "X" wherever used.
class State(str, enum.Enum):  # noqa: UP042
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


# The legacy /v1 routes speak to TES 1.0 clients (py-tes 0.4.2, which the Snakemake TES
# plugin pins, refuses any other state and its status thread dies): each TES 1.1-only
# state is shown as the 1.0 state a client should act on. CANCELING reads CANCELED (the
# client asked for it; the job is being stopped), PREEMPTED reads SYSTEM_ERROR (the task
# will not finish), PAUSED reads RUNNING (PAUSED exists in 1.0, but py-tes 0.4.2 lacks it).
LEGACY_STATES: dict[str, str] = {
    State.CANCELING.value: State.CANCELED.value,
    State.PREEMPTED.value: State.SYSTEM_ERROR.value,
    State.PAUSED.value: State.RUNNING.value,
}
