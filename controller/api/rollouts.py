"""Operator endpoints for rollouts: create (or dry-run) from a manifest, list, status,
and the controls pause / resume / promote / abort / rollback. Every change is audited.

The API only writes the database; the scheduler's rollout job publishes desired
states on its next pass.
"""
from __future__ import annotations

import logging
from typing import Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Response
from pydantic import BaseModel, Field

from ..errors import InvalidInput
from ..rollout import engine, status
from ..rollout.spec import RolloutSpec
from ..rollout.states import RolloutState, Trigger
from .audit import record_operator
from .auth import Operator, require_deployer, require_viewer
from .deps import ApiContext, get_ctx

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/rollouts", tags=["rollouts"])

RolloutId = Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="rollout id")
Control = Literal["pause", "resume", "promote", "abort", "rollback"]


class CreateRollout(BaseModel):
    manifest: dict[str, Any] = Field(description="A Rollout manifest (manifests/rollout.schema.json)")
    dry_run: bool = False


@router.post("", status_code=201, summary="Create a rollout from a manifest, or plan it (dry_run)")
def create(
    body: CreateRollout, response: Response,
    operator: Operator = Depends(require_deployer), ctx: ApiContext = Depends(get_ctx),
) -> dict[str, Any]:
    spec = RolloutSpec.from_manifest(body.manifest)
    name = (body.manifest.get("metadata") or {}).get("name")
    with ctx.db.unit_of_work() as session:
        created = engine.create_rollout(session, spec, f"operator:{operator.name}", name, dry_run=body.dry_run)
        if created.created:
            record_operator(session, operator, "rollout.create", created.rollout_id,
                            model=spec.model, version=spec.version, selector=spec.selector,
                            superseded=created.superseded)
    if not created.created:
        response.status_code = 200
    else:
        log.info("rollout %s created by %s: %s:%s to %d device(s) in %d stage(s)%s", created.rollout_id,
                 operator.name, spec.model, spec.version, created.plan.device_count, len(spec.stages),
                 f", superseding {', '.join(created.superseded)}" if created.superseded else "")
    return {"id": created.rollout_id, "created": created.created, "superseded": created.superseded,
            "plan": created.plan.to_dict()}


@router.get("", summary="List rollouts, newest first")
def list_rollouts(
    state: str | None = Query(None, max_length=16, description="only rollouts in this state, e.g. RUNNING"),
    limit: int = Query(100, ge=1, le=1000),
    _: Operator = Depends(require_viewer), ctx: ApiContext = Depends(get_ctx),
) -> list[dict[str, Any]]:
    wanted = _state(state) if state else None
    with ctx.db.reading() as session:
        return status.list_rollouts(session, wanted, limit)


def _state(value: str) -> str:
    try:
        return RolloutState(value.upper()).value
    except ValueError:
        raise InvalidInput(
            f"state {value!r} is unknown; use one of {', '.join(s.value for s in RolloutState)}") from None


@router.get("/{rollout_id}", summary="A rollout's progress per stage and hardware class, gates and executions")
def show(
    rollout_id: str = RolloutId, _: Operator = Depends(require_viewer), ctx: ApiContext = Depends(get_ctx),
) -> dict[str, Any]:
    with ctx.db.reading() as session:
        return status.rollout_status(session, rollout_id)


@router.post("/{rollout_id}/{action}", summary="pause, resume, promote, abort or rollback a rollout")
def control(
    action: Control, rollout_id: str = RolloutId,
    operator: Operator = Depends(require_deployer), ctx: ApiContext = Depends(get_ctx),
) -> dict[str, Any]:
    with ctx.db.unit_of_work() as session:
        rollout = engine.control(session, rollout_id, Trigger(action), f"operator:{operator.name}")
        record_operator(session, operator, f"rollout.{action}", rollout_id,
                        state=rollout.state.value, stage=rollout.stage)
        state = rollout.state.value
    log.info("rollout %s %s: %s by %s", rollout_id, state, action, operator.name)
    with ctx.db.unit_of_work() as session:
        return status.rollout_status(session, rollout_id)
