"""Leader lock in the database: racing replicas, renewal, expiry and hand-over, on SQLite and PostgreSQL."""
from __future__ import annotations

import threading
import time

import pytest

from edgefleet.controller.db.leader import LeaderLock
from edgefleet.controller.db.session import Database
from edgefleet.controller.errors import Unavailable
from tests.conftest import free_port

REPLICAS = 6


@pytest.fixture
def databases(database_url: str):
    """One Database (own engine and pool) per replica, like separate processes."""
    dbs = [Database(database_url) for _ in range(REPLICAS)]
    dbs[0].upgrade()
    yield dbs
    for db in dbs:
        db.dispose()


def race(dbs: list[Database], name: str, ttl_s: float) -> dict[str, bool]:
    locks = [LeaderLock(db, name, f"replica-{i}", ttl_s) for i, db in enumerate(dbs)]
    barrier = threading.Barrier(len(locks))
    results: dict[str, bool] = {}

    def attempt(lock: LeaderLock) -> None:
        barrier.wait()
        results[lock.holder] = lock.try_acquire()

    threads = [threading.Thread(target=attempt, args=(lock,)) for lock in locks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


def test_racing_replicas_elect_exactly_one_leader(databases) -> None:
    for round_ in range(3):
        results = race(databases, f"lock-{round_}", ttl_s=30)
        assert len(results) == REPLICAS
        assert sum(results.values()) == 1, results
        # The winner holds it; a later race (renewals and steals) changes nothing.
        winner = next(h for h, won in results.items() if won)
        again = race(databases, f"lock-{round_}", ttl_s=30)
        assert [h for h, won in again.items() if won] == [winner]


def test_renewal_expiry_and_takeover(databases) -> None:
    a = LeaderLock(databases[0], "scheduler", "a", ttl_s=0.5)
    b = LeaderLock(databases[1], "scheduler", "b", ttl_s=0.5)
    assert a.try_acquire() and a.held
    assert not b.try_acquire() and not b.held
    assert a.try_acquire()                    # renewing our own lease
    assert b.current_holder() == "a"
    time.sleep(0.7)                           # a stops renewing: its lease runs out
    assert not a.held
    assert a.current_holder() is None
    assert b.try_acquire() and b.current_holder() == "b"
    assert not a.try_acquire()                # the old leader does not get it back
    b.release()
    assert not b.held and b.current_holder() is None
    assert a.try_acquire()                    # released: taken at once, no waiting for expiry


def test_release_by_a_non_holder_changes_nothing(databases) -> None:
    a = LeaderLock(databases[0], "x", "a", ttl_s=30)
    b = LeaderLock(databases[1], "x", "b", ttl_s=30)
    assert a.try_acquire()
    b.release()
    assert a.current_holder() == "a"


def test_locks_are_independent_by_name(databases) -> None:
    assert LeaderLock(databases[0], "one", "a", 30).try_acquire()
    assert LeaderLock(databases[1], "two", "b", 30).try_acquire()


def test_database_down_is_unavailable() -> None:
    lock = LeaderLock(Database(f"postgresql://postgres@127.0.0.1:{free_port()}/x"), "s", "a", 5)
    with pytest.raises(Unavailable):
        lock.try_acquire()
    assert not lock.held
