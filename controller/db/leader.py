"""A leader lock kept in the database (SQLite and PostgreSQL alike).

One row per lock name: (holder, expires_at). Acquiring is one transaction with
two conditional statements, so racing replicas cannot both win:

1. ``UPDATE … WHERE name = :name AND (holder = :me OR expires_at < :now)`` —
   renew our own lease, or steal an expired one;
2. otherwise ``INSERT … ON CONFLICT DO NOTHING`` — take a lock nobody held yet.

A returned row means we hold the lock until ``now + ttl``. Leases use the
replicas' clocks, so clock skew between replicas must stay well below the TTL.
"""
from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from .models import LeaderLockRow, utcnow
from .session import Database

_INSERT: dict[str, Callable[[sa.Table], postgresql.Insert | sqlite.Insert]] = {
    "postgresql": postgresql.insert, "sqlite": sqlite.insert,
}


class LeaderLock:
    def __init__(self, db: Database, name: str, holder: str, ttl_s: float):
        if ttl_s <= 0:
            raise ValueError("leader lock TTL must be positive")
        self.db = db
        self.name = name
        self.holder = holder
        self.ttl = timedelta(seconds=ttl_s)
        self._held_until: datetime | None = None

    def try_acquire(self) -> bool:
        """Acquire or renew; True while this holder is the leader. Raises Unavailable."""
        now = utcnow()
        expires = now + self.ttl
        row = cast(sa.Table, LeaderLockRow.__table__)
        with self.db.connect() as connection:
            # RETURNING, not rowcount: drivers do not report rowcount for INSERT reliably.
            renewed = connection.execute(
                sa.update(row)
                .where(row.c.name == self.name)
                .where(sa.or_(row.c.holder == self.holder, row.c.expires_at < now))
                .values(holder=self.holder, expires_at=expires)
                .returning(row.c.name)
            ).first()
            acquired = renewed is not None or connection.execute(
                _INSERT[self.db.dialect](row)
                .values(name=self.name, holder=self.holder, expires_at=expires)
                .on_conflict_do_nothing(index_elements=[row.c.name])
                .returning(row.c.name)
            ).first() is not None
        self._held_until = expires if acquired else None
        return acquired

    @property
    def held(self) -> bool:
        """Whether the last successful acquisition is still within its lease."""
        return self._held_until is not None and utcnow() < self._held_until

    def release(self) -> None:
        """Give the lock up now (only if we hold it), so another replica takes over at once."""
        row = cast(sa.Table, LeaderLockRow.__table__)
        with self.db.connect() as connection:
            connection.execute(
                sa.delete(row).where(row.c.name == self.name).where(row.c.holder == self.holder)
            )
        self._held_until = None

    def current_holder(self) -> str | None:
        """Who holds an unexpired lease on this lock, if anyone."""
        row = cast(sa.Table, LeaderLockRow.__table__)
        with self.db.connect() as connection:
            return connection.execute(
                sa.select(row.c.holder).where(row.c.name == self.name).where(row.c.expires_at >= utcnow())
            ).scalar_one_or_none()
