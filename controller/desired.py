"""The desired states the database stores per device, read back as wire messages."""
from __future__ import annotations

import logging

import sqlalchemy as sa
from sqlalchemy.orm import Session

from edgefleet.common.errors import ProtocolError
from edgefleet.common.protocol import Desired

from .db.models import Device

log = logging.getLogger(__name__)


def stored_desired(session: Session, *where: sa.ColumnElement[bool]) -> list[Desired]:
    """Every device's stored desired state (only those matching ``where``), in device id order;
    one that no longer parses is skipped with a warning."""
    rows = session.scalars(
        sa.select(Device.desired).where(Device.desired.is_not(None), *where).order_by(Device.id)
    )
    desired = []
    for data in rows:
        if data is None:  # JSON null
            continue
        try:
            desired.append(Desired.from_dict(data))
        except ProtocolError as e:
            log.warning("stored desired state of a device is invalid, not republished: %s", e)
    return desired
