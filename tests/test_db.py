"""Database: unit of work, error translation, and the constraints the other parts rely on."""
from __future__ import annotations

import shutil
import threading
from datetime import UTC, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from edgefleet.common.protocol import ExecutionState
from edgefleet.controller.db.catalog import model_versions
from edgefleet.controller.db.models import (
    Device,
    EventRecord,
    Execution,
    Rollout,
    RolloutState,
    TelemetryRecord,
    Variant,
)
from edgefleet.controller.db.session import Database, normalize_url
from edgefleet.controller.errors import Conflict, InvalidInput, Unavailable
from tests.conftest import free_port


@pytest.fixture
def db(database_url: str):
    database = Database(database_url)
    database.upgrade()
    yield database
    database.dispose()


def add_rollout(db: Database, rollout_id: str = "r1", devices: tuple[str, ...] = ("d1",)) -> None:
    with db.unit_of_work() as session:
        session.add_all(Device(id=d) for d in devices)
        session.add(Rollout(id=rollout_id, model="digits", version="1.0.0"))


def test_unit_of_work_commits(db: Database) -> None:
    with db.unit_of_work() as session:
        session.add(Device(id="d1", labels={"site": "berlin"}, hardware={"cpu": "x86_64"}))
    with db.unit_of_work() as session:
        device = session.get(Device, "d1")
        assert device.labels == {"site": "berlin"} and device.online is False
        assert device.enrolled_at.tzinfo is not None
        device.labels["hw"] = "pi"            # in-place JSON change is tracked
    with db.unit_of_work() as session:
        assert session.get(Device, "d1").labels == {"site": "berlin", "hw": "pi"}


def test_unit_of_work_rolls_back_on_error(db: Database) -> None:
    with pytest.raises(RuntimeError), db.unit_of_work() as session:
        session.add(Device(id="d1"))
        session.flush()
        raise RuntimeError("boom")
    with db.unit_of_work() as session:
        assert session.get(Device, "d1") is None


def test_duplicate_key_is_conflict(db: Database) -> None:
    with db.unit_of_work() as session:
        session.add(Device(id="d1"))
    with pytest.raises(Conflict, match="conflicts with existing data") as caught, db.unit_of_work() as session:
        session.add(Device(id="d1"))
    assert "\n" not in str(caught.value)


def test_one_execution_per_rollout_and_device(db: Database) -> None:
    add_rollout(db, devices=("d1", "d2"))
    with db.unit_of_work() as session:
        session.add(Execution(rollout_id="r1", device_id="d1", stage=0, variant="cpu-fp32"))
    with pytest.raises(Conflict), db.unit_of_work() as session:
        session.add(Execution(rollout_id="r1", device_id="d1", stage=1, variant="cpu-int8"))
    with db.unit_of_work() as session:
        session.add(Execution(rollout_id="r1", device_id="d2", stage=0))
        rows = session.scalars(sa.select(Execution).order_by(Execution.device_id)).all()
        assert [(e.device_id, e.variant, e.state) for e in rows] == [
            ("d1", "cpu-fp32", ExecutionState.QUEUED), ("d2", None, ExecutionState.QUEUED),
        ]


def test_racing_writers_create_one_execution(database_url: str) -> None:
    """Two replicas (separate engines) racing to plan the same device: exactly one wins."""
    setup = Database(database_url)
    setup.upgrade()
    add_rollout(setup)
    outcomes: list[str] = []
    barrier = threading.Barrier(2)

    def plan() -> None:
        db = Database(database_url)
        barrier.wait()
        try:
            with db.unit_of_work() as session:
                session.add(Execution(rollout_id="r1", device_id="d1", stage=0))
            outcomes.append("created")
        except Conflict:
            outcomes.append("conflict")
        finally:
            db.dispose()

    threads = [threading.Thread(target=plan) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(outcomes) == ["conflict", "created"]
    setup.dispose()


def test_events_are_unique_per_device_boot_seq(db: Database) -> None:
    with db.unit_of_work() as session:
        session.add(Device(id="d1"))
    event = {"device_id": "d1", "boot": 1, "seq": 5, "generation": 1, "state": "DOWNLOADING"}
    with db.unit_of_work() as session:
        session.add(EventRecord(**event))
    with pytest.raises(Conflict), db.unit_of_work() as session:
        session.add(EventRecord(**event))


def test_removing_a_device_removes_its_executions_and_telemetry(db: Database) -> None:
    add_rollout(db)
    with db.unit_of_work() as session:
        session.add(Execution(rollout_id="r1", device_id="d1", stage=0))
        session.add(TelemetryRecord(device_id="d1", kind="heartbeat", boot=1, seq=1))
    with db.unit_of_work() as session:
        session.execute(sa.delete(Device).where(Device.id == "d1"))
    with db.unit_of_work() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Execution)) == 0
        assert session.scalar(sa.select(sa.func.count()).select_from(TelemetryRecord)) == 0


def test_states_and_timestamps_round_trip(db: Database) -> None:
    started = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    with db.unit_of_work() as session:
        session.add(Rollout(id="r1", model="m", version="1", state=RolloutState.RUNNING, stage_started_at=started))
    with db.unit_of_work() as session:
        rollout = session.get(Rollout, "r1")
        assert rollout.state is RolloutState.RUNNING and not rollout.state.terminal
        assert rollout.stage_started_at == started and rollout.stage_started_at.tzinfo == UTC
        rollout.state = "ABORTED"  # type: ignore[assignment]  # the string value is accepted too
    with db.unit_of_work() as session:
        assert session.get(Rollout, "r1").state is RolloutState.ABORTED
    with pytest.raises((ValueError, sa.exc.StatementError)), db.unit_of_work() as session:
        session.add(Rollout(id="r2", model="m", version="1", state="EXPLODED"))


def test_naive_datetimes_are_refused(db: Database) -> None:
    with pytest.raises(sa.exc.StatementError, match="naive datetime"), db.unit_of_work() as session:
        session.add(Device(id="d1", last_seen=datetime(2026, 1, 1)))


def test_catalog_groups_variants_by_model_version(db: Database) -> None:
    def variant(version: str, name: str, release: int, preference: int) -> Variant:
        return Variant(model="digits", version=version, variant=name, release=release, preference=preference,
                       target_path=f"digits/{version}/{name}.onnx", golden_path=f"digits/{version}/{name}.golden.npz")

    with db.unit_of_work() as session:
        session.add_all([variant("1.0.0", "cpu-fp32", 1, 2), variant("1.0.0", "cpu-int8", 1, 1),
                         variant("1.1.0", "cpu-fp32", 2, 2)])
    with db.unit_of_work() as session:
        versions = model_versions(session, "digits")
        assert [(v.version, v.release) for v in versions] == [("1.1.0", 2), ("1.0.0", 1)]
        assert [x.variant for x in versions[1].variants] == ["cpu-int8", "cpu-fp32"]
        assert model_versions(session, "digits", "2.0") == []


def test_database_down_is_unavailable() -> None:
    db = Database(f"postgresql://postgres@127.0.0.1:{free_port()}/edgefleet")
    with pytest.raises(Unavailable, match=r"^database unreachable: ") as caught, db.unit_of_work() as session:
        session.get(Device, "d1")
    assert "\n" not in str(caught.value)
    with pytest.raises(Unavailable):
        db.check_schema()


def test_sqlite_in_an_unwritable_place_is_unavailable(tmp_path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(Unavailable, match="database unreachable: cannot create directory"):
        Database(f"sqlite:///{tmp_path / 'file' / 'sub' / 'controller.db'}")
    (tmp_path / "ro").mkdir()
    db = Database(f"sqlite:///{tmp_path / 'ro' / 'missing' / 'controller.db'}")
    shutil.rmtree(tmp_path / "ro" / "missing")   # gone after start-up: cannot open the file
    with (
        pytest.raises(Unavailable, match="database unreachable: unable to open database file"),
        db.unit_of_work() as session,
    ):
        session.get(Device, "d1")


def test_missing_schema_says_how_to_fix_it(database_url: str) -> None:
    db = Database(database_url)   # never upgraded
    with (
        pytest.raises(Unavailable, match=r"^database schema is missing \(.*devices.*\): run `fleetctl db upgrade`$"),
        db.unit_of_work() as session,
    ):
        session.get(Device, "d1")
    db.dispose()


def test_urls() -> None:
    assert normalize_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("sqlite:///x.db") == "sqlite:///x.db"
    assert "secret" not in repr(Database("postgresql://u:secret@127.0.0.1/db"))
    with pytest.raises(InvalidInput, match="not supported"):
        Database("mysql://u@h/db")
    with pytest.raises(InvalidInput, match="not valid"):
        Database("::nonsense")


def test_sqlite_pragmas(tmp_path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'c.db'}")
    with db.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() > 0


def test_reading_takes_no_write_lock_on_sqlite(tmp_path):
    """A long fleet-wide read must not hold up the ingest's writes (WAL readers never block the writer)."""
    db = Database(f"sqlite:///{tmp_path / 'c.db'}")
    db.upgrade()
    try:
        with db.reading() as reader:
            reader.execute(sa.text("SELECT count(*) FROM devices")).scalar_one()
            with db.unit_of_work() as writer:   # would wait out the busy timeout under BEGIN IMMEDIATE
                writer.execute(sa.text("INSERT INTO leader_lock (name, holder, expires_at) "
                                       "VALUES ('x', 'y', '2030-01-01 00:00:00')"))
        with db.reading() as reader:
            assert reader.execute(sa.text("SELECT count(*) FROM leader_lock")).scalar_one() == 1
    finally:
        db.dispose()
