"""The desired states the database stores per device (``Device.desired``: a ``DesiredSet.to_dict()``)."""
from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from edgefleet.common.errors import ProtocolError
from edgefleet.common.protocol import DesiredSet

from .db.models import Device

log = logging.getLogger(__name__)


def stored_desired(session: Session, *where: sa.ColumnElement[bool]) -> list[DesiredSet]:
    """Every device's stored desired set (only those matching ``where``), in device id order;
    one that no longer parses is skipped with a warning."""
    rows = session.scalars(
        sa.select(Device.desired).where(Device.desired.is_not(None), *where).order_by(Device.id)
    )
    desired = []
    for data in rows:
        if data is None:  # JSON null
            continue
        try:
            desired.append(DesiredSet.from_dict(data))
        except ProtocolError as e:
            log.warning("stored desired state of a device is invalid, not republished: %s", e)
    return desired


def desired_set(device: Device) -> DesiredSet:
    """The device's stored desired set, to change one entry of. One that no longer parses
    (stored by an older release) starts empty: the rollouts that own its models send theirs again."""
    if device.desired:
        try:
            return DesiredSet.from_dict(device.desired)
        except ProtocolError as e:
            log.warning("stored desired state of %s is invalid, replaced: %s", device.id, e)
    return DesiredSet(device=device.id, generation=device.desired_generation)


def stored_entry(desired: dict[str, Any] | None, model: str) -> dict[str, Any] | None:
    """The entry of ``model`` in a stored desired set, read as plain JSON (no parse: a stopped
    rollout checks every device it touched on each pass)."""
    entries = (desired or {}).get("models")
    if not isinstance(entries, list):
        return None
    return next((e for e in entries if isinstance(e, dict) and e.get("model") == model), None)
