"""Level-triggered settling: an execution that has gone silent is settled from its device's report.

Events can go astray between a device and the database (a replica that died with messages
queued in its broker session, a broker that dropped a queue). The device's retained report
says how the execution of each model's last generation ended (``ModelStatus.outcome``), so the leader
asks the broker for the retained reports of devices whose sent execution has been silent
for a while, and ingest settles them like any report. An execution still running (its
report names an older generation, or no outcome yet) is left alone; one held for its
maintenance window is not asked about.

A device that stays silent (most often it is offline) is asked again each time its silence
doubles, not at every sweep: its report cannot change while it is away.
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


def silent_devices(db: Database, silent: timedelta, now: datetime) -> dict[str, datetime]:
    """Devices whose sent execution has said nothing for ``silent``, and since when, the longest
    silent first (each once, though executions of several of its models may be silent)."""
    with db.reading() as session:
        rows = session.execute(
            sa.select(Execution.device_id, Execution.updated_at)
            .where(Execution.state.in_(WAITING), Execution.generation > 0, Execution.updated_at < now - silent)
            .order_by(Execution.updated_at)
        )
        since: dict[str, datetime] = {}
        for device, updated in rows:
            since.setdefault(device, updated)
        return since


class ReportSweep:
    """The leader's sweep, run every ``silent_s / 2``: asks for the reports of silent devices."""

    def __init__(self, db: Database, source: ReportSource, silent_s: float) -> None:
        self.db = db
        self.source = source
        self.silent = timedelta(seconds=silent_s)
        self._asked: dict[str, tuple[datetime, timedelta]] = {}  # device -> (silent since, its silence when asked)

    def __call__(self, now: datetime | None = None) -> int:
        """One sweep: how many reports were asked for."""
        now = now or utcnow()
        since = silent_devices(self.db, self.silent, now)
        due = [device for device, start in since.items() if self._due(device, start, now - start)][:MAX_DEVICES]
        # a device no longer silent is forgotten: when it falls silent again it is asked afresh
        self._asked = {device: asked for device, asked in self._asked.items() if device in since}
        self._asked.update((device, (since[device], now - since[device])) for device in due)
        return self.source.reread_reports(due)

    def _due(self, device: str, start: datetime, silence: timedelta) -> bool:
        asked = self._asked.get(device)
        # never asked, silent anew since (its execution moved), or silent twice as long as when asked
        return asked is None or asked[0] != start or silence >= 2 * asked[1]
