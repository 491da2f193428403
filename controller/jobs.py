"""Housekeeping jobs run by the scheduler's leader: offline sweep and telemetry retention."""
from __future__ import annotations

from datetime import datetime, timedelta
from functools import partial
from typing import Any, cast

import sqlalchemy as sa

from .config import ControllerConfig
from .db.models import Benchmark, Device, TelemetryRecord, utcnow
from .db.session import Database
from .scheduler import Scheduler

RETENTION_INTERVAL_S = 3600.0


def sweep_offline(db: Database, heartbeat_timeout_s: float, now: datetime | None = None) -> int:
    """Mark devices offline whose last heartbeat is older than the timeout; returns how many."""
    cutoff = (now or utcnow()) - timedelta(seconds=heartbeat_timeout_s)
    with db.unit_of_work() as session:
        swept = session.execute(
            sa.update(Device)
            .where(Device.online.is_(True))
            .where(sa.or_(Device.last_seen.is_(None), Device.last_seen < cutoff))
            .values(online=False)
            .execution_options(synchronize_session=False)
        )
        return cast(sa.CursorResult[Any], swept).rowcount


def prune_telemetry(db: Database, retention_days: float, now: datetime | None = None) -> int:
    """Delete telemetry and benchmarks older than the retention period; returns rows deleted."""
    cutoff = (now or utcnow()) - timedelta(days=retention_days)
    deleted = 0
    with db.unit_of_work() as session:
        for table in (TelemetryRecord, Benchmark):
            pruned = session.execute(
                sa.delete(table).where(table.ts < cutoff).execution_options(synchronize_session=False)
            )
            deleted += cast(sa.CursorResult[Any], pruned).rowcount
    return deleted


def add_housekeeping(scheduler: Scheduler, db: Database, config: ControllerConfig) -> None:
    # Sweep three times per timeout, so a silent device is offline within 4/3 of it.
    scheduler.add_job("offline-sweep", partial(sweep_offline, db, config.heartbeat_timeout_s),
                      config.heartbeat_timeout_s / 3)
    scheduler.add_job("telemetry-retention", partial(prune_telemetry, db, config.telemetry_retention_days),
                      RETENTION_INTERVAL_S)
