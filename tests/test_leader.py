"""Leader lock: racing replicas, renewal, release and hand-over on SQLite and PostgreSQL; the lease's
expiry (SQLite) and the session lock's life: a killed or terminated holder (PostgreSQL)."""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa

from edgefleet.controller.db.leader import LeaderLock
from edgefleet.controller.db.session import Database
from edgefleet.controller.errors import Unavailable
from tests.conftest import REPO, free_port

REPLICAS = 6
ON_SQLITE = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
ON_POSTGRESQL = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)


@pytest.fixture
def databases(database_url: str):
    """One Database (own engine and pool) per replica, like separate processes."""
    dbs = [Database(database_url) for _ in range(REPLICAS)]
    dbs[0].upgrade()
    yield dbs
    for db in dbs:
        db.dispose()


@pytest.fixture
def make_lock(databases) -> Iterator[Callable[[int, str, str, float], LeaderLock]]:
    """LeaderLock(databases[replica], name, holder, ttl), released after the test (ending its session)."""
    made: list[LeaderLock] = []

    def make(replica: int, name: str, holder: str, ttl_s: float) -> LeaderLock:
        made.append(LeaderLock(databases[replica], name, holder, ttl_s))
        return made[-1]

    yield make
    for lock in made:
        lock.release()


def race(locks: list[LeaderLock]) -> dict[str, bool]:
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


def test_racing_replicas_elect_exactly_one_leader(make_lock) -> None:
    for round_ in range(3):
        locks = [make_lock(i, f"lock-{round_}", f"replica-{i}", 30) for i in range(REPLICAS)]
        results = race(locks)
        assert len(results) == REPLICAS
        assert sum(results.values()) == 1, results
        # The winner holds it; a later race (renewals and steals) changes nothing.
        winner = next(h for h, won in results.items() if won)
        again = race(locks)
        assert [h for h, won in again.items() if won] == [winner]
        assert locks[0].current_holder() == winner


def test_renewal_and_release_hand_over_at_once(make_lock) -> None:
    a = make_lock(0, "scheduler", "a", 30)
    b = make_lock(1, "scheduler", "b", 30)
    assert a.try_acquire() and a.held
    assert not b.try_acquire() and not b.held
    assert a.try_acquire()                    # renewing
    assert b.current_holder() == "a"
    a.release()
    assert not a.held and b.current_holder() is None
    assert b.try_acquire() and b.current_holder() == "b"   # released: taken at once, no waiting for expiry
    assert not a.try_acquire()


@ON_SQLITE
def test_sqlite_lease_expires_and_is_taken_over(make_lock) -> None:
    a = make_lock(0, "scheduler", "a", 0.5)
    b = make_lock(1, "scheduler", "b", 0.5)
    assert a.try_acquire()
    time.sleep(0.7)                           # a stops renewing: its lease runs out
    assert not a.held
    assert a.current_holder() is None
    assert b.try_acquire() and b.current_holder() == "b"
    assert not a.try_acquire()                # the old leader does not get it back


@ON_POSTGRESQL
def test_postgresql_quiet_leader_keeps_the_lock_while_its_session_lives(make_lock) -> None:
    a = make_lock(0, "scheduler", "a", 0.5)
    b = make_lock(1, "scheduler", "b", 0.5)
    assert a.try_acquire()
    time.sleep(0.7)                           # no attempt for longer than the lease...
    assert not a.held and a.current_holder() is None
    assert not b.try_acquire()                # ...but the session lives: still a's
    assert a.try_acquire() and a.current_holder() == "a"


def backend_pids(db: Database, application_name: str) -> list[int]:
    with db.connect() as connection:
        return list(connection.execute(
            sa.text("SELECT pid FROM pg_stat_activity WHERE application_name = :n"), {"n": application_name}
        ).scalars())


@ON_POSTGRESQL
def test_postgresql_killed_holder_is_replaced_at_the_next_attempt(make_lock, databases, database_url) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", KILLED_HOLDER, database_url], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "leading"
        b = make_lock(1, "scheduler", "b", 30)
        assert not b.try_acquire() and b.current_holder() == "doomed"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    deadline = time.monotonic() + 5       # the server notices the closed socket at once
    while backend_pids(databases[0], "edgefleet leader doomed") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert b.try_acquire()                    # one attempt, 30 s of lease notwithstanding
    assert b.current_holder() == "b"


KILLED_HOLDER = """
import sys, time
from edgefleet.controller.db.leader import LeaderLock
from edgefleet.controller.db.session import Database
lock = LeaderLock(Database(sys.argv[1]), "scheduler", "doomed", 30)
assert lock.try_acquire()
print("leading", flush=True)
time.sleep(60)
"""


@ON_POSTGRESQL
def test_postgresql_terminated_session_is_not_leader_until_it_reacquires(make_lock, databases) -> None:
    a = make_lock(0, "scheduler", "a", 30)
    b = make_lock(1, "scheduler", "b", 30)
    assert a.try_acquire() and not b.try_acquire()
    terminate(databases[2], "edgefleet leader a")      # as a PostgreSQL restart or a network cut would
    assert b.try_acquire()                               # free at once
    assert not a.try_acquire() and not a.held            # a's next attempt: not the leader any more
    assert b.current_holder() == "b"
    terminate(databases[2], "edgefleet leader b")
    assert b.try_acquire()                               # nobody else wanted it: re-taken on a new connection
    assert not a.try_acquire() and b.current_holder() == "b"


def terminate(db: Database, application_name: str) -> None:
    pids = backend_pids(db, application_name)
    assert len(pids) == 1, pids
    with db.connect() as connection:
        assert connection.execute(sa.text("SELECT pg_terminate_backend(:p, 5000)"), {"p": pids[0]}).scalar_one()


def test_release_by_a_non_holder_changes_nothing(make_lock) -> None:
    a = make_lock(0, "x", "a", 30)
    b = make_lock(1, "x", "b", 30)
    assert a.try_acquire()
    b.release()
    assert a.current_holder() == "a"


def test_locks_are_independent_by_name(make_lock) -> None:
    assert make_lock(0, "one", "a", 30).try_acquire()
    assert make_lock(1, "two", "b", 30).try_acquire()


def test_database_down_is_unavailable() -> None:
    lock = LeaderLock(Database(f"postgresql://postgres@127.0.0.1:{free_port()}/x"), "s", "a", 5)
    with pytest.raises(Unavailable):
        lock.try_acquire()
    assert not lock.held
