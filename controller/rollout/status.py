"""Read models of rollouts for the API: a summary row and the full status
(progress per stage and hardware class, gate values and verdicts, executions)."""
from __future__ import annotations

from collections import Counter, defaultdict
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from edgefleet.common.protocol import ExecutionState

from ..db.models import Device, Execution, GateResult, Rollout, utcnow
from ..errors import NotFound
from . import engine, planner
from .planner import FAILURE_STATES
from .spec import RolloutSpec
from .states import TRANSITIONS, RolloutState, Trigger

# What an operator may ask of a rollout (the engine's own triggers are not theirs to send).
CONTROLS = (Trigger.PAUSE, Trigger.RESUME, Trigger.PROMOTE, Trigger.ABORT, Trigger.ROLLBACK)


def summary(rollout: Rollout, counts: Counter | None = None) -> dict[str, Any]:
    stages = RolloutSpec.from_stored(rollout.spec).stages
    counts = counts or Counter()
    return {
        "id": rollout.id, "model": rollout.model, "version": rollout.version, "selector": rollout.selector,
        "state": rollout.state.value, "stage": rollout.stage, "stages": list(stages),
        "devices": sum(counts.values()),
        "succeeded": counts.get(ExecutionState.SUCCEEDED, 0),
        "failed": sum(n for s, n in counts.items() if s in FAILURE_STATES),
        "created_at": rollout.created_at, "created_by": rollout.created_by, "detail": rollout.detail,
    }


def list_rollouts(session: Session, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    query = sa.select(Rollout).order_by(Rollout.created_at.desc()).limit(limit)
    if state:
        query = query.where(Rollout.state == state)
    rollouts = list(session.scalars(query))
    counts: dict[str, Counter] = defaultdict(Counter)
    rows = session.execute(
        sa.select(Execution.rollout_id, Execution.state, sa.func.count())
        .where(Execution.rollout_id.in_([r.id for r in rollouts])).group_by(Execution.rollout_id, Execution.state)
    )
    for rollout_id, exec_state, n in rows:
        counts[rollout_id][exec_state] = n
    return [summary(r, counts[r.id]) for r in rollouts]


def _rollout(session: Session, rollout_id: str) -> Rollout:
    rollout = session.get(Rollout, rollout_id)
    if rollout is None:
        raise NotFound(f"rollout {rollout_id!r} not found; see `fleetctl rollout list`")
    return rollout


def rollout_status(session: Session, rollout_id: str) -> dict[str, Any]:
    rollout = _rollout(session, rollout_id)
    spec = RolloutSpec.from_stored(rollout.spec)
    rows = session.execute(
        sa.select(Execution, Device.hardware_class).join(Device, Device.id == Execution.device_id)
        .where(Execution.rollout_id == rollout_id).order_by(Execution.stage, Execution.device_id)
    ).all()
    progress: dict[int, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    executions = []
    for execution, cls in rows:
        cls = cls or "unknown"
        progress[execution.stage][cls][execution.state.value] += 1
        executions.append({
            "device": execution.device_id, "stage": execution.stage, "hardware_class": cls,
            "variant": execution.variant, "state": execution.state.value, "attempt": execution.attempt,
            "reason": execution.reason, "detail": execution.detail, "updated_at": execution.updated_at,
        })
    gates = [
        {"stage": g.stage, "hardware_class": g.hardware_class, "gate": g.gate, "value": g.value,
         "threshold": g.threshold, "verdict": g.verdict.value, "ts": g.ts}
        for g in session.scalars(
            sa.select(GateResult).where(GateResult.rollout_id == rollout_id)
            .order_by(GateResult.stage, GateResult.hardware_class, GateResult.gate, GateResult.id)
        )
    ]
    stages = []
    for index, share in enumerate(spec.stages):
        classes = {}
        for cls, states in sorted(progress.get(index, {}).items()):
            total = sum(states.values())
            terminal = sum(n for s, n in states.items() if ExecutionState(s).terminal)
            classes[cls] = {"total": total, "done": terminal, "states": dict(states)}
        stages.append({"stage": index, "share": share, "classes": classes})
    return {
        **summary(rollout, Counter(ExecutionState(e["state"]) for e in executions)),
        "bake": _bake(rollout, spec, [e for e in executions if e["stage"] == rollout.stage]),
        "updated_at": rollout.updated_at, "stage_started_at": rollout.stage_started_at,
        "supersedes": rollout.supersedes, "spec": rollout.spec,
        "progress": stages, "gates": gates, "executions": executions,
    }


def _bake(rollout: Rollout, spec: RolloutSpec, current: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The current stage's bake: once its devices all finished, when it ends and what is left
    (None while devices update, or when the rollout is not running)."""
    if rollout.state is not RolloutState.RUNNING or not current:
        return None
    if not all(ExecutionState(e["state"]).terminal for e in current):
        return None
    ends = max(e["updated_at"] for e in current) + timedelta(seconds=spec.bake_s)
    return {"seconds": spec.bake_s, "ends_at": ends, "left_s": max(0.0, (ends - utcnow()).total_seconds())}


def live_stage(session: Session, rollout_id: str, now: datetime) -> dict[str, Any]:
    """The current stage's gates as the engine would judge them now (value against threshold;
    the evidence is read once every device of the stage finished, as the engine reads it), and
    the controls the rollout's state allows."""
    rollout = _rollout(session, rollout_id)
    spec = RolloutSpec.from_stored(rollout.spec)
    live: dict[str, Any] = {
        "stage": rollout.stage, "bake_s": spec.bake_s, "gates": [],
        "controls": [t.value for t in CONTROLS if (rollout.state, t) in TRANSITIONS],
    }
    if rollout.state in (RolloutState.RUNNING, RolloutState.PAUSED):
        stage = engine.stage_snapshot(session, rollout, now)
        live["gates"] = [
            {"hardware_class": v.hardware_class, "gate": v.gate, "value": v.value, "threshold": v.threshold,
             "verdict": v.verdict.value, "awaiting": v.awaiting}
            for v in planner.gate_verdicts(spec, stage.counts, stage.observations)
        ]
    return live
