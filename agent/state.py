"""Named update states and the transition table: the one place that decides
the next state, and the journal of the execution in progress. No I/O.

Modelled on Mender's client: each state is a tiny handler (in reconcile.py)
that does its work and posts one :class:`Outcome`; :func:`next_state` looks the
pair up in :data:`TRANSITIONS`. The state is journalled before its handler
acts, so a crash or power cut resumes it, and a loop guard stops a state that
keeps being re-entered (a model that crashes the process on load, say).
"""
from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any

from edgefleet.common.protocol import Action, Desired, ExecutionState, ModelRef


class State(str, enum.Enum):
    """Where one update execution is. Non-terminal states have a handler."""

    DOWNLOAD = "download"        # TUF refresh + resumable download into staging
    VERIFY = "verify"            # staged bytes match the signed metadata; release not lower
    STAGE = "stage"              # staged directory becomes an installed slot
    WAIT_WINDOW = "wait_window"  # installed; activation held for the maintenance window
    ACTIVATE = "activate"        # new session beside the old one, gate, swap, commit
    ROLLBACK = "rollback"        # operator/controller asked for the previous slot
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    REJECTED = "rejected"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL

    @property
    def reported(self) -> ExecutionState:
        """The wire state announced when this state is entered."""
        return _REPORTED[self]


class Outcome(str, enum.Enum):
    """What a handler posts when it is done."""

    DONE = "done"                    # step finished; go on
    RETRY = "retry"                  # transport trouble; stay, try again after a backoff
    WINDOW_CLOSED = "window_closed"  # activation must wait for the maintenance window
    FAILED = "failed"                # the remote sent something unusable, or the disk is full
    REJECTED = "rejected"            # this device cannot run the variant
    GATE_FAILED = "gate_failed"      # the model loaded but failed its golden set or benchmark


_TERMINAL = frozenset({State.SUCCEEDED, State.FAILED, State.ROLLED_BACK, State.REJECTED})

_REPORTED = {
    State.DOWNLOAD: ExecutionState.DOWNLOADING,
    State.VERIFY: ExecutionState.VERIFYING,
    State.STAGE: ExecutionState.STAGED,
    State.WAIT_WINDOW: ExecutionState.WAITING_WINDOW,
    State.ACTIVATE: ExecutionState.ACTIVATING,
    State.ROLLBACK: ExecutionState.ACTIVATING,
    State.SUCCEEDED: ExecutionState.SUCCEEDED,
    State.FAILED: ExecutionState.FAILED,
    State.ROLLED_BACK: ExecutionState.ROLLED_BACK,
    State.REJECTED: ExecutionState.REJECTED,
}

TRANSITIONS: dict[tuple[State, Outcome], State] = {
    (State.DOWNLOAD, Outcome.DONE): State.VERIFY,
    (State.DOWNLOAD, Outcome.RETRY): State.DOWNLOAD,
    (State.VERIFY, Outcome.DONE): State.STAGE,
    (State.VERIFY, Outcome.RETRY): State.DOWNLOAD,  # staged bytes gone or corrupt: fetch again
    (State.STAGE, Outcome.DONE): State.ACTIVATE,
    (State.STAGE, Outcome.RETRY): State.STAGE,
    (State.STAGE, Outcome.WINDOW_CLOSED): State.WAIT_WINDOW,
    (State.WAIT_WINDOW, Outcome.DONE): State.ACTIVATE,
    (State.WAIT_WINDOW, Outcome.RETRY): State.WAIT_WINDOW,
    (State.WAIT_WINDOW, Outcome.WINDOW_CLOSED): State.WAIT_WINDOW,
    (State.ACTIVATE, Outcome.DONE): State.SUCCEEDED,
    (State.ACTIVATE, Outcome.RETRY): State.VERIFY,  # the installed slot vanished: re-check from staging
    (State.ACTIVATE, Outcome.GATE_FAILED): State.ROLLED_BACK,
    (State.ROLLBACK, Outcome.DONE): State.ROLLED_BACK,
    (State.ROLLBACK, Outcome.RETRY): State.ROLLBACK,
    # Any handler may raise (Mender's ArtifactFailure): every state can fail or be rejected, with its reason.
    **{(s, Outcome.FAILED): State.FAILED for s in State if not s.terminal},
    **{(s, Outcome.REJECTED): State.REJECTED for s in State if not s.terminal},
}

# A state entered this many times for one execution (across restarts) fails it.
LOOP_LIMIT = 5


class TransitionError(RuntimeError):
    """A handler posted an outcome the table does not allow (a programming error)."""


def next_state(state: State, outcome: Outcome) -> State:
    try:
        return TRANSITIONS[(state, outcome)]
    except KeyError:
        raise TransitionError(f"no transition from {state.value} on {outcome.value}") from None


@dataclass
class Journal:
    """The update execution in progress, saved before each step acts."""

    desired: Desired
    state: State
    slot: str | None = None
    detail: str = ""
    entries: dict[str, int] = field(default_factory=dict)  # loop guard: times each state was entered

    @property
    def generation(self) -> int:
        return self.desired.generation

    def enter(self, state: State, detail: str = "") -> bool:
        """Move to ``state``; False when the loop guard trips."""
        self.state, self.detail = state, detail
        self.entries[state.value] = self.entries.get(state.value, 0) + 1
        return self.entries[state.value] <= LOOP_LIMIT

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "desired": self.desired.to_dict(),
                "state": self.state.value,
                "slot": self.slot,
                "detail": self.detail,
                "entries": self.entries,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Journal:
        return cls(
            desired=Desired.from_dict(data["desired"]),
            state=State(data["state"]),
            slot=data.get("slot"),
            detail=str(data.get("detail", "")),
            entries={str(k): int(v) for k, v in dict(data.get("entries", {})).items()},
        )


def same_model(ref: ModelRef | None, desired: Desired) -> bool:
    """Does ``ref`` run what ``desired`` installs (release aside)?"""
    return ref is not None and (ref.model, ref.version, ref.variant) == (
        desired.model,
        desired.version,
        desired.variant,
    )


def first_state(desired: Desired | None, active: ModelRef | None, finished_generation: int | None) -> State | None:
    """Level-triggered comparison of desired and actual state: the first state of a
    new execution, or None when there is nothing to do.

    ``finished_generation`` is the generation whose execution already reached a
    terminal state: a failed or rejected generation is not retried until the
    controller sends a new one.
    """
    if desired is None:
        return None
    action = desired.action
    if action is Action.NONE:
        return None
    if finished_generation is not None and desired.generation <= finished_generation:
        return None
    if action is Action.ROLLBACK:
        return State.ROLLBACK
    if same_model(active, desired):
        return State.SUCCEEDED
    return State.DOWNLOAD
