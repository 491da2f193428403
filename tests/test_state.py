"""The transition table, the level-triggered first state and the maintenance-window cron."""
from datetime import datetime

import pytest

from edgefleet.agent.state import (
    TRANSITIONS,
    Outcome,
    State,
    TransitionError,
    first_state,
    next_state,
)
from edgefleet.agent.window import is_open
from edgefleet.common.cron import Cron
from edgefleet.common.errors import ProtocolError
from edgefleet.common.protocol import Action, Desired, ExecutionState, ModelRef, Window


def desired(generation=1, action=Action.INSTALL, version="1.0.0") -> Desired:
    return Desired(
        device="dev-1", generation=generation, action=action, model="digits", version=version,
        variant="cpu-fp32", target=f"digits/{version}/cpu-fp32.onnx",
    )


def test_happy_path_walks_download_to_succeeded():
    state, seen = State.DOWNLOAD, []
    while not state.terminal:
        seen.append(state.reported)
        state = next_state(state, Outcome.DONE)
    assert seen == [ExecutionState.DOWNLOADING, ExecutionState.VERIFYING, ExecutionState.STAGED,
                    ExecutionState.ACTIVATING]
    assert state is State.SUCCEEDED


@pytest.mark.parametrize(
    "state,outcome,expected",
    [
        (State.DOWNLOAD, Outcome.RETRY, State.DOWNLOAD),
        (State.DOWNLOAD, Outcome.REJECTED, State.REJECTED),
        (State.DOWNLOAD, Outcome.FAILED, State.FAILED),
        (State.VERIFY, Outcome.RETRY, State.DOWNLOAD),
        (State.STAGE, Outcome.WINDOW_CLOSED, State.WAIT_WINDOW),
        (State.WAIT_WINDOW, Outcome.WINDOW_CLOSED, State.WAIT_WINDOW),
        (State.WAIT_WINDOW, Outcome.DONE, State.ACTIVATE),
        (State.ACTIVATE, Outcome.GATE_FAILED, State.ROLLED_BACK),
        (State.ROLLBACK, Outcome.DONE, State.ROLLED_BACK),
    ],
)
def test_table(state, outcome, expected):
    assert next_state(state, outcome) is expected


def test_terminal_states_have_no_way_out_and_unknown_pairs_raise():
    assert not any(s.terminal for s, _ in TRANSITIONS)
    with pytest.raises(TransitionError, match="no transition from succeeded"):
        next_state(State.SUCCEEDED, Outcome.DONE)
    with pytest.raises(TransitionError):
        next_state(State.VERIFY, Outcome.GATE_FAILED)


def test_every_non_terminal_state_is_reachable_and_can_finish():
    reachable = {State.DOWNLOAD, State.ROLLBACK} | set(TRANSITIONS.values())
    assert set(State) == reachable
    for state in State:
        if not state.terminal:
            assert any(s is state for s, _ in TRANSITIONS), state


def test_first_state_is_level_triggered():
    v1 = ModelRef("digits", "1.0.0", "cpu-fp32", 1)
    assert first_state(None, v1, None) is None
    assert first_state(desired(), None, None) is State.DOWNLOAD
    # already running it: the execution is immediately done
    assert first_state(desired(), v1, None) is State.SUCCEEDED
    assert first_state(desired(version="2.0.0"), v1, None) is State.DOWNLOAD
    # a finished generation (failed, say) is not retried until a newer one arrives
    assert first_state(desired(generation=3, version="2.0.0"), v1, 3) is None
    assert first_state(desired(generation=4, version="2.0.0"), v1, 3) is State.DOWNLOAD
    assert first_state(desired(generation=5, action=Action.ROLLBACK), v1, 4) is State.ROLLBACK
    assert first_state(Desired(device="dev-1", generation=6, action=Action.NONE), v1, 5) is None


def test_cron_fields():
    cron = Cron.parse("*/15 2-4 * * 1-5")
    assert cron.matches(datetime(2026, 11, 23, 3, 30))      # Monday 03:30
    assert not cron.matches(datetime(2026, 11, 22, 3, 30))  # Sunday
    assert not cron.matches(datetime(2026, 11, 23, 3, 31))
    sunday = Cron.parse("0 0 * * 7")
    assert sunday.matches(datetime(2026, 11, 22, 0, 0))
    both = Cron.parse("0 0 1 * 1")  # the 1st OR a Monday, as Vixie cron does
    assert both.matches(datetime(2026, 11, 23, 0, 0)) and both.matches(datetime(2026, 12, 1, 0, 0))
    for bad in ("* * *", "61 * * * *", "a * * * *", "*/0 * * * *"):
        with pytest.raises(ProtocolError):
            Cron.parse(bad)


def test_window_open_for_its_duration():
    window = Window(cron="0 2 * * *", duration_s=3600)
    assert is_open(window, datetime(2026, 11, 23, 2, 0))
    assert is_open(window, datetime(2026, 11, 23, 2, 59, 30))
    assert not is_open(window, datetime(2026, 11, 23, 3, 1))
    assert not is_open(window, datetime(2026, 11, 23, 1, 59))
    assert is_open(None)
