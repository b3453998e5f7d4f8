"""The task state machine."""

from funnel_hpc.core.states import TERMINAL, TRANSITIONS, State, can_transition


def test_every_state_has_a_transition_entry():
    assert set(TRANSITIONS) == set(State)


def test_terminal_states_never_change():
    for terminal in TERMINAL:
        for target in State:
            assert not can_transition(terminal, target), (terminal, target)


def test_usual_paths():
    path = [State.QUEUED, State.INITIALIZING, State.RUNNING, State.COMPLETE]
    for current, target in zip(path, path[1:], strict=False):
        assert can_transition(current, target)
    assert can_transition(State.RUNNING, State.CANCELING)
    assert can_transition(State.CANCELING, State.CANCELED)
    assert not can_transition(State.CANCELING, State.RUNNING)
    assert not can_transition(State.COMPLETE, State.QUEUED)
    assert can_transition(State.RUNNING, State.RUNNING)
