"""Level-triggered settling: an execution that has gone silent is settled from its device's report.

Events can go astray between a device and the database (a replica that died with messages
queued in its broker session, a broker that dropped a queue). The device's retained report
says how the execution of each model's last generation ended (``ModelStatus.outcome``), so the leader
asks the broker for the retained reports of devices whose sent execution has been silent
for a while, and ingest settles them like any report. An execution still running (its
report names an older generation, or no outcome yet) is left alone; one held for its
maintenance window is not asked about.
"""
from __future__ import annotations

from datetime import datetime, timedelta
from typing import Protocol

import sqlalchemy as sa

from edgefleet.common.protocol import ExecutionState

from ..db.models import Execution, utcnow
from ..db.session import Database

MAX_DEVICES = 1000  # per sweep: the broker sends one retained message for each
WAITING = [s for s in ExecutionState if not s.terminal and s is not ExecutionState.WAITING_WINDOW]


class ReportSource(Protocol):
    """What the sweep needs of the MQTT bridge (controller/broker.py ``Bridge``)."""

    def reread_reports(self, devices: list[str]) -> int: ...


def silent_devices(db: Database, silent: timedelta, now: datetime) -> list[str]:
    """Devices whose sent execution has said nothing for ``silent``, the longest silent first
    (each once, though executions of several of its models may be silent)."""
    with db.reading() as session:
        return list(dict.fromkeys(session.scalars(
            sa.select(Execution.device_id)
            .where(Execution.state.in_(WAITING), Execution.generation > 0, Execution.updated_at < now - silent)
            .order_by(Execution.updated_at).limit(MAX_DEVICES)
        )))


def reread_reports(db: Database, source: ReportSource, silent_s: float, now: datetime | None = None) -> int:
    """One sweep (the scheduler's leader runs it every ``silent_s / 2``): how many reports were asked for."""
    return source.reread_reports(silent_devices(db, timedelta(seconds=silent_s), now or utcnow()))
