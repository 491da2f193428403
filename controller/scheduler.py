"""Periodic jobs (APScheduler 3), run by exactly one controller replica at a time.

Every replica runs a Scheduler; before each run a job renews the database leader
lock (db/leader.py: a session advisory lock on PostgreSQL, a lease on SQLite) and
skips the run unless this replica holds it. Owners register their jobs
(timestamp re-signing, offline sweep, rollout stepping, telemetry retention) with
``add_job(name, func, interval_s)``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC

from apscheduler.schedulers.background import BackgroundScheduler

from .config import ControllerConfig
from .db.leader import LeaderLock
from .db.session import Database
from .errors import ControllerError

log = logging.getLogger(__name__)

LOCK_NAME = "scheduler"
MIN_LEASE_S = 10.0   # a leader that misses a few ticks keeps its lease


class Scheduler:
    def __init__(self, db: Database, config: ControllerConfig, holder_id: str, lease_s: float | None = None):
        self.holder_id = holder_id
        self.lock = LeaderLock(
            db, LOCK_NAME, holder_id, lease_s or max(MIN_LEASE_S, 5 * config.scheduler_interval_s)
        )
        self._scheduler = BackgroundScheduler(
            timezone=UTC,
            # A slow run is never doubled up, and missed runs collapse into one.
            job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": None},
        )

    def add_job(self, name: str, func: Callable[[], object], interval_s: float) -> None:
        if interval_s <= 0:
            raise ValueError(f"job {name!r}: interval must be positive")
        self._scheduler.add_job(
            self._run, "interval", args=(name, func), seconds=interval_s,
            id=name, name=name, replace_existing=True,
        )

    @property
    def is_leader(self) -> bool:
        return self.lock.held

    def _run(self, name: str, func: Callable[[], object]) -> None:
        try:
            if not self.lock.try_acquire():
                return
        except ControllerError as e:
            log.warning("job %s skipped: cannot renew the leader lock: %s", name, e)
            return
        try:
            func()
        except ControllerError as e:
            log.warning("job %s failed: %s", name, e)
        except Exception:
            log.exception("job %s crashed", name)

    def start(self) -> None:
        self._scheduler.start()

    def shutdown(self, wait: bool = True) -> None:
        """Stop running jobs and hand the lock over, so another replica leads at once."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=wait)
        try:
            self.lock.release()
        except ControllerError as e:
            log.warning("could not release the leader lock (it expires by itself): %s", e)
