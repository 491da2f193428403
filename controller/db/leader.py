"""The scheduler's leader lock: a session advisory lock on PostgreSQL, a lease on SQLite.

**SQLite (one file, one host): a lease.** One row per lock name: (holder, expires_at).
Acquiring is one transaction with two conditional statements, so racing replicas cannot
both win:

1. ``UPDATE … WHERE name = :name AND (holder = :me OR expires_at < :now)`` —
   renew our own lease, or steal an expired one;
2. otherwise ``INSERT … ON CONFLICT DO NOTHING`` — take a lock nobody held yet.

A returned row means we hold the lock until ``now + ttl``. Leases use the replicas'
clocks, so clock skew between replicas must stay well below the TTL. A crashed leader is
replaced once its lease expires.

**PostgreSQL: a session-level advisory lock** (``pg_try_advisory_lock``) held on a
connection of its own, outside the pool. PostgreSQL releases it the moment that session
ends, so a killed leader (its socket closes with the process) is replaced at the standby's
next attempt, not after a TTL. Every attempt, in one transaction on that connection:

1. the holder checks that its session still holds the lock (``pg_locks``, a cheap
   query); the others try to take it (``pg_try_advisory_lock``, never blocking);
2. while held, it upserts the lease row (holder, now + ttl), unconditionally: only the
   session holding the lock writes it, so the row is not a lock here but the visible
   answer to "who leads" (:meth:`LeaderLock.current_holder`, operators, bench/replicas.py).
   Written on the lock's own connection, a holder that lost its session cannot overwrite
   its successor's row afterwards.

Any error on that connection (a PostgreSQL restart, ``pg_terminate_backend``, the network)
drops it: its session, and with it the lock, is gone, so the replica is not leader until it
takes the lock again on a new connection (tried once at once, in the same attempt). Two
replicas therefore never both pass an attempt at once; a job that started under the lock
may still be finishing when the lock is lost, as with a lease expiring mid-job. TCP
keepalives on both ends bound how long a vanished host (power cut, partition) keeps the
lock: about ``KEEPALIVE_IDLE_S + KEEPALIVE_COUNT * KEEPALIVE_INTERVAL_S``. The lock needs a
real session: behind a transaction-mode pooler (PgBouncer) point the controller at
PostgreSQL itself.

Releasing (shutdown) ends the session or deletes our own lease, so another replica
takes over at its next attempt.
"""
from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import cast

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.pool import NullPool

from .models import LeaderLockRow, utcnow
from .session import CONNECT_TIMEOUT_S, Database, translate_errors

_INSERT: dict[str, Callable[[sa.Table], postgresql.Insert | sqlite.Insert]] = {
    "postgresql": postgresql.insert, "sqlite": sqlite.insert,
}
_ROW = cast(sa.Table, LeaderLockRow.__table__)

KEEPALIVE_IDLE_S = 5
KEEPALIVE_INTERVAL_S = 1
KEEPALIVE_COUNT = 5

_TRY_LOCK = sa.text("SELECT pg_try_advisory_lock(:key)")
# A bigint key shows in pg_locks as classid (high half) and objid (low half), objsubid 1.
_STILL_HELD = sa.text(
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() "
    "AND granted AND objsubid = 1 AND ((classid::bigint << 32) | objid::bigint) = :key)"
)


def advisory_key(name: str) -> int:
    """A stable, non-negative 63-bit key per lock name (apart from other applications' keys)."""
    digest = hashlib.blake2b(f"edgefleet.leader:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


class SessionLock:
    """A PostgreSQL session-level advisory lock held on a connection of its own.

    Thread-safe: the scheduler's jobs attempt from several threads, and the one
    connection must not be shared between them mid-statement.
    """

    def __init__(self, db: Database, name: str, application_name: str):
        self.key = advisory_key(name)
        # NullPool: closing the connection really ends its session, and the lock with it.
        self._engine = sa.create_engine(db.url, poolclass=NullPool, connect_args={
            "connect_timeout": CONNECT_TIMEOUT_S,
            "application_name": application_name[:63],
            # This end: a vanished server fails our next check instead of hanging it.
            "keepalives": 1, "keepalives_idle": KEEPALIVE_IDLE_S,
            "keepalives_interval": KEEPALIVE_INTERVAL_S, "keepalives_count": KEEPALIVE_COUNT,
            "tcp_user_timeout": (KEEPALIVE_IDLE_S + KEEPALIVE_COUNT * KEEPALIVE_INTERVAL_S) * 1000,
            # The server's end: a vanished leader's session, and its lock, end in seconds, not hours.
            "options": f"-c tcp_keepalives_idle={KEEPALIVE_IDLE_S} "
                       f"-c tcp_keepalives_interval={KEEPALIVE_INTERVAL_S} -c tcp_keepalives_count={KEEPALIVE_COUNT}",
        })
        self._connection: sa.Connection | None = None
        self._holding = False
        self._mutex = threading.Lock()

    def try_hold(self, while_held: Callable[[sa.Connection], None]) -> bool:
        """Check (or take) the lock; while held, run ``while_held`` in the same transaction
        on the lock's connection. True while held. Raises Unavailable."""
        with self._mutex:
            if self._connection is not None:
                try:
                    return self._attempt(self._connection, while_held)
                except exc.SQLAlchemyError:
                    self._drop()  # its session, and the lock with it, is gone: try on a new one
            with translate_errors():
                try:
                    return self._attempt(self._connect(), while_held)
                except exc.SQLAlchemyError:
                    self._drop()
                    raise

    def release(self) -> None:
        """End the session: PostgreSQL frees the lock at once."""
        with self._mutex:
            self._drop()

    def _connect(self) -> sa.Connection:
        self._connection = self._engine.connect()
        return self._connection

    def _attempt(self, connection: sa.Connection, while_held: Callable[[sa.Connection], None]) -> bool:
        with connection.begin():
            # Only try when not holding: the lock is reentrant, and each extra take would need its own unlock.
            held = connection.execute(_STILL_HELD if self._holding else _TRY_LOCK, {"key": self.key}).scalar_one()
            self._holding = bool(held)
            if self._holding:
                while_held(connection)
        return self._holding

    def _drop(self) -> None:
        connection, self._connection, self._holding = self._connection, None, False
        if connection is not None:
            try:
                connection.close()
            except exc.SQLAlchemyError:
                connection.invalidate()  # already broken: the server ended the session


class LeaderLock:
    def __init__(self, db: Database, name: str, holder: str, ttl_s: float):
        if ttl_s <= 0:
            raise ValueError("leader lock TTL must be positive")
        self.db = db
        self.name = name
        self.holder = holder
        self.ttl = timedelta(seconds=ttl_s)
        self._held_until: datetime | None = None
        self._session = (
            SessionLock(db, name, f"edgefleet leader {holder}") if db.dialect == "postgresql" else None
        )

    def try_acquire(self) -> bool:
        """Acquire or renew; True while this holder is the leader. Raises Unavailable."""
        now = utcnow()
        expires = now + self.ttl
        acquired = False
        try:
            if self._session is not None:
                acquired = self._session.try_hold(lambda connection: self._record_lease(connection, expires))
            else:
                with self.db.connect() as connection:
                    acquired = self._take_lease(connection, now, expires)
        finally:  # a failed attempt is not leadership either
            self._held_until = expires if acquired else None
        return acquired

    def _take_lease(self, connection: sa.Connection, now: datetime, expires: datetime) -> bool:
        # RETURNING, not rowcount: drivers do not report rowcount for INSERT reliably.
        renewed = connection.execute(
            sa.update(_ROW)
            .where(_ROW.c.name == self.name)
            .where(sa.or_(_ROW.c.holder == self.holder, _ROW.c.expires_at < now))
            .values(holder=self.holder, expires_at=expires)
            .returning(_ROW.c.name)
        ).first()
        return renewed is not None or connection.execute(
            _INSERT[self.db.dialect](_ROW)
            .values(name=self.name, holder=self.holder, expires_at=expires)
            .on_conflict_do_nothing(index_elements=[_ROW.c.name])
            .returning(_ROW.c.name)
        ).first() is not None

    def _record_lease(self, connection: sa.Connection, expires: datetime) -> None:
        insert = postgresql.insert(_ROW).values(name=self.name, holder=self.holder, expires_at=expires)
        connection.execute(insert.on_conflict_do_update(
            index_elements=[_ROW.c.name],
            set_={"holder": insert.excluded.holder, "expires_at": insert.excluded.expires_at},
        ))

    @property
    def held(self) -> bool:
        """Whether the last successful acquisition is still within its lease."""
        return self._held_until is not None and utcnow() < self._held_until

    def release(self) -> None:
        """Give the lock up now (only if we hold it), so another replica takes over at once."""
        self._held_until = None
        if self._session is not None:
            self._session.release()  # first: whatever happens next, leadership is free
        with self.db.connect() as connection:
            connection.execute(
                sa.delete(_ROW).where(_ROW.c.name == self.name).where(_ROW.c.holder == self.holder)
            )

    def current_holder(self) -> str | None:
        """Who holds an unexpired lease on this lock, if anyone."""
        with self.db.connect() as connection:
            return connection.execute(
                sa.select(_ROW.c.holder).where(_ROW.c.name == self.name).where(_ROW.c.expires_at >= utcnow())
            ).scalar_one_or_none()
