"""Scheduler: jobs run only on the replica holding the leader lock; housekeeping jobs."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta

import pytest
import sqlalchemy as sa

from edgefleet.controller.config import ControllerConfig
from edgefleet.controller.db.models import Benchmark, Device, TelemetryRecord, utcnow
from edgefleet.controller.db.session import Database
from edgefleet.controller.jobs import add_housekeeping, prune_telemetry, sweep_offline
from edgefleet.controller.scheduler import Scheduler


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


@pytest.fixture
def db(database_url: str):
    database = Database(database_url)
    database.upgrade()
    yield database
    database.dispose()


def test_only_the_leader_replica_runs_jobs(db: Database, tmp_path) -> None:
    config = ControllerConfig(home=tmp_path, scheduler_interval_s=0.1)
    runs: list[str] = []
    lock = threading.Lock()
    replicas: dict[str, Scheduler] = {}
    engines = [Database(db.url) for _ in range(3)]
    for name, engine in zip("abc", engines, strict=True):
        replica = Scheduler(engine, config, holder_id=name, lease_s=30)

        def job(name: str = name) -> None:
            with lock:
                runs.append(name)

        replica.add_job("tick", job, 0.05)
        replicas[name] = replica
    try:
        for replica in replicas.values():
            replica.start()
        wait_for(lambda: len(runs) >= 10)
        leader = runs[0]
        assert set(runs) == {leader}
        assert [r.is_leader for r in replicas.values()].count(True) == 1
        # The leader stops (and hands the lock over): another replica takes the jobs.
        replicas.pop(leader).shutdown()
        count = len(runs)
        wait_for(lambda: len(runs) >= count + 10)
        successors = set(runs[count:])
        assert len(successors) == 1 and leader not in successors
    finally:
        for replica in replicas.values():
            replica.shutdown()
        for engine in engines:
            engine.dispose()


def test_a_failing_job_does_not_stop_the_others(db: Database, tmp_path) -> None:
    scheduler = Scheduler(db, ControllerConfig(home=tmp_path), holder_id="solo")
    ran: list[int] = []

    def broken() -> None:
        raise RuntimeError("boom")

    scheduler.add_job("broken", broken, 0.05)
    scheduler.add_job("ok", lambda: ran.append(1), 0.05)
    scheduler.start()
    try:
        wait_for(lambda: len(ran) >= 3)
    finally:
        scheduler.shutdown()
    assert not scheduler.is_leader


def test_offline_sweep(db: Database) -> None:
    now = utcnow()
    with db.unit_of_work() as session:
        session.add_all([
            Device(id="fresh", online=True, last_seen=now - timedelta(seconds=10)),
            Device(id="stale", online=True, last_seen=now - timedelta(seconds=200)),
            Device(id="never", online=True),
            Device(id="off", online=False, last_seen=now - timedelta(seconds=500)),
        ])
    assert sweep_offline(db, heartbeat_timeout_s=90, now=now) == 2
    with db.unit_of_work() as session:
        online = dict(session.execute(sa.select(Device.id, Device.online)).all())
    assert online == {"fresh": True, "stale": False, "never": False, "off": False}
    assert sweep_offline(db, heartbeat_timeout_s=90, now=now) == 0


def test_telemetry_retention(db: Database) -> None:
    now = utcnow()
    old, recent = now - timedelta(days=31), now - timedelta(days=1)
    with db.unit_of_work() as session:
        session.add(Device(id="d1"))
        session.flush()
        for i, ts in enumerate((old, recent, old)):
            session.add(TelemetryRecord(device_id="d1", kind="heartbeat", boot=1, seq=i, ts=ts))
        for ts in (old, recent):
            session.add(Benchmark(device_id="d1", hardware_class="cpu", model="m", version="1",
                                  variant="cpu-fp32", p50_ms=1.0, p99_ms=2.0, ts=ts))
    assert prune_telemetry(db, retention_days=30, now=now) == 3
    with db.unit_of_work() as session:
        assert session.scalars(sa.select(TelemetryRecord.ts)).all() == [recent]
        assert session.scalars(sa.select(Benchmark.ts)).all() == [recent]


def test_housekeeping_runs_on_the_scheduler(db: Database, tmp_path) -> None:
    config = ControllerConfig(home=tmp_path, heartbeat_timeout_s=0.3)
    with db.unit_of_work() as session:
        session.add(Device(id="d1", online=True, last_seen=utcnow()))
    scheduler = Scheduler(db, config, holder_id="solo")
    add_housekeeping(scheduler, db, config)
    scheduler.start()
    try:
        def offline() -> bool:
            with db.unit_of_work() as session:
                return not session.get(Device, "d1").online

        wait_for(offline)
    finally:
        scheduler.shutdown()
