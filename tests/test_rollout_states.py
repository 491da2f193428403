"""The rollout state table: every move the engine makes is asked of it."""
from __future__ import annotations

import pytest

from edgefleet.controller.errors import Conflict
from edgefleet.controller.rollout.states import RolloutState, Trigger, transition


def test_state_table():
    S = RolloutState
    assert transition(S.PENDING, Trigger.START, 0, 3).state is S.RUNNING
    step = transition(S.RUNNING, Trigger.STAGE_PASSED, 0, 3)
    assert (step.state, step.stage, step.stage_advanced) == (S.RUNNING, 1, True)
    assert transition(S.RUNNING, Trigger.STAGE_PASSED, 2, 3).state is S.SUCCEEDED
    assert transition(S.PAUSED, Trigger.PROMOTE, 0, 3).stage == 1
    assert transition(S.RUNNING, Trigger.GATE_FAILED, 0, 3).state is S.FAILED
    assert transition(S.FAILED, Trigger.ROLLBACK, 0, 3).state is S.ROLLED_BACK
    with pytest.raises(Conflict, match="rollout is SUCCEEDED; cannot pause it \\(allowed: rollback\\)"):
        transition(S.SUCCEEDED, Trigger.PAUSE, 2, 3)
    with pytest.raises(Conflict, match="rollout is ROLLED_BACK; cannot resume it \\(it is finished\\)"):
        transition(S.ROLLED_BACK, Trigger.RESUME, 0, 3)
