"""The audit log: who changed what, when. ``record`` is called by every mutating operator endpoint."""
from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel
from sqlalchemy.orm import Session

from ..db.models import AuditEntry
from .auth import Operator, require_operator
from .deps import ApiContext, get_ctx

router = APIRouter(prefix="/v1/audit", tags=["audit"], dependencies=[Depends(require_operator)])


def record(session: Session, actor: str, action: str, target: str = "", **detail: Any) -> None:
    """Add one audit entry in the caller's unit of work (it commits with the change it describes)."""
    session.add(AuditEntry(actor=actor, action=action, target=target, detail=detail))


def record_operator(session: Session, operator: Operator, action: str, target: str = "", **detail: Any) -> None:
    record(session, f"operator:{operator.name}", action, target, **detail)


class AuditOut(BaseModel):
    id: int
    ts: datetime
    actor: str
    action: str
    target: str
    detail: dict[str, Any]


@router.get("", response_model=list[AuditOut], summary="Audit log, newest first")
def list_audit(
    limit: int = Query(100, ge=1, le=10_000),
    action: str | None = Query(None, max_length=64, description="only this action, e.g. device.label"),
    target: str | None = Query(None, max_length=512, description="only entries about this target"),
    ctx: ApiContext = Depends(get_ctx),
) -> list[AuditOut]:
    query = sa.select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if action:
        query = query.where(AuditEntry.action == action)
    if target:
        query = query.where(AuditEntry.target == target)
    with ctx.db.unit_of_work() as session:
        return [AuditOut.model_validate(row, from_attributes=True) for row in session.scalars(query)]
