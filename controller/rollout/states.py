"""A rollout's named states, its gates' verdicts, and the one transition table. No I/O.

The database stores these enums by value (controller/db/models.py); the engine
asks :func:`transition` for every move, so an operator's request that the table
does not allow is refused with what is allowed instead.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from ..errors import Conflict


class RolloutState(str, enum.Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    ABORTED = "ABORTED"
    ROLLED_BACK = "ROLLED_BACK"
    SUPERSEDED = "SUPERSEDED"

    @property
    def terminal(self) -> bool:
        return self not in (RolloutState.PENDING, RolloutState.RUNNING, RolloutState.PAUSED)


class Verdict(str, enum.Enum):
    PASS = "PASS"  # noqa: S105 (a verdict, not a password)
    FAIL = "FAIL"
    NO_DATA = "NO_DATA"   # too little evidence to judge: shown, not failing (planner.gate_verdicts)


class Trigger(str, enum.Enum):
    START = "start"
    STAGE_PASSED = "stage-passed"
    GATE_FAILED = "gate-failed"
    PAUSE = "pause"
    RESUME = "resume"
    PROMOTE = "promote"
    ABORT = "abort"
    ROLLBACK = "rollback"
    SUPERSEDE = "supersede"


S = RolloutState
# (state, trigger) -> next state. STAGE_PASSED/PROMOTE on the last stage end in SUCCEEDED.
TRANSITIONS: dict[tuple[RolloutState, Trigger], RolloutState] = {
    (S.PENDING, Trigger.START): S.RUNNING,
    (S.RUNNING, Trigger.STAGE_PASSED): S.RUNNING,
    (S.RUNNING, Trigger.GATE_FAILED): S.FAILED,
    (S.PENDING, Trigger.PAUSE): S.PAUSED,
    (S.RUNNING, Trigger.PAUSE): S.PAUSED,
    (S.PAUSED, Trigger.RESUME): S.RUNNING,
    (S.RUNNING, Trigger.PROMOTE): S.RUNNING,
    (S.PAUSED, Trigger.PROMOTE): S.PAUSED,
    (S.PENDING, Trigger.ABORT): S.ABORTED,
    (S.RUNNING, Trigger.ABORT): S.ABORTED,
    (S.PAUSED, Trigger.ABORT): S.ABORTED,
    (S.RUNNING, Trigger.ROLLBACK): S.ROLLED_BACK,
    (S.PAUSED, Trigger.ROLLBACK): S.ROLLED_BACK,
    (S.FAILED, Trigger.ROLLBACK): S.ROLLED_BACK,
    (S.SUCCEEDED, Trigger.ROLLBACK): S.ROLLED_BACK,
    (S.ABORTED, Trigger.ROLLBACK): S.ROLLED_BACK,
    (S.PENDING, Trigger.SUPERSEDE): S.SUPERSEDED,
    (S.RUNNING, Trigger.SUPERSEDE): S.SUPERSEDED,
    (S.PAUSED, Trigger.SUPERSEDE): S.SUPERSEDED,
}
# Where the rollout's devices must go back to their previous version.
ROLLING_BACK = frozenset({S.FAILED, S.ROLLED_BACK})
# Where executions are still created and published.
ACTIVE = frozenset({S.PENDING, S.RUNNING})


@dataclass(frozen=True)
class Step:
    state: RolloutState
    stage: int
    stage_advanced: bool


def transition(state: RolloutState, trigger: Trigger, stage: int, stages: int) -> Step:
    """The next (state, stage), or Conflict naming what is allowed."""
    target = TRANSITIONS.get((state, trigger))
    if target is None:
        allowed = sorted(t.value for (s, t) in TRANSITIONS if s is state and t is not Trigger.STAGE_PASSED)
        hint = f"allowed: {', '.join(allowed)}" if allowed else "it is finished"
        raise Conflict(f"rollout is {state.value}; cannot {trigger.value} it ({hint})")
    if trigger in (Trigger.STAGE_PASSED, Trigger.PROMOTE):
        if stage + 1 >= stages:
            return Step(S.SUCCEEDED, stage, False)
        return Step(target, stage + 1, True)
    return Step(target, stage, False)
