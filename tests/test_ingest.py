"""Ingest on a real database (SQLite and PostgreSQL): executions settled from the device's
report when their events were lost, and one batch spanning many devices applied in bulk
with every bound on what a device claims still enforced."""
from __future__ import annotations

import itertools

import sqlalchemy as sa

from edgefleet.common.protocol import DeviceMessage, Event, ModelRef, Reported, Status, Telemetry, TelemetryKind
from edgefleet.common.protocol import ExecutionState as E
from edgefleet.controller.claims import MAX_BOOT_STEP
from edgefleet.controller.db.models import Device, EventRecord, Execution, TelemetryRecord
from edgefleet.controller.db.session import Database
from edgefleet.controller.ingest import Ingest
from edgefleet.controller.rollout import engine
from tests.rollout_fleet import RecordingPublisher, fleet_db, spec_for
from tests.support.messages import heartbeat

_seq = itertools.count(100)


def started(db: Database) -> tuple[str, dict[str, int]]:
    """A one-stage rollout of digits 1.1.0 to every device, sent: (rollout id, device -> generation)."""
    with db.unit_of_work() as session:
        rid = engine.create_rollout(session, spec_for(stages=(1.0,)), "test").rollout_id
    publisher = RecordingPublisher()
    engine.step_all(db, publisher)
    return rid, {d.device: d.generation for d in publisher.sent}


def execution(db: Database, rid: str, device: str) -> Execution:
    with db.unit_of_work() as session:
        return session.scalars(sa.select(Execution).filter_by(rollout_id=rid, device_id=device)).one()


def event(device: str, rid: str, generation: int, state: E) -> Event:
    return Event(device=device, boot=1, seq=next(_seq), generation=generation, state=state, deployment=rid)


def report(device: str, generation: int, outcome: E | None, version: str = "1.1.0",
           variant: str = "cpu-fp32") -> Reported:
    active = ModelRef(model="digits", version=version, variant=variant, release=2)
    return Reported(device=device, boot=1, seq=next(_seq), generation=generation, active=active, outcome=outcome)


def test_a_report_settles_an_execution_whose_events_were_lost(database_url):
    db = fleet_db(database_url)
    rid, sent = started(db)
    ingest = Ingest(db)
    ingest.apply([event("p1", rid, sent["p1"], E.DOWNLOADING)])   # the rest of its events never arrive
    result = ingest.apply([report("p1", sent["p1"], E.SUCCEEDED)])
    assert result.settled == 1
    settled = execution(db, rid, "p1")
    assert settled.state is E.SUCCEEDED and "report" in settled.detail
    # the lost events, arriving at last, change nothing: the attempt is finished
    ingest.apply([event("p1", rid, sent["p1"], E.ACTIVATING)])
    assert execution(db, rid, "p1").state is E.SUCCEEDED
    # a rolled-back update settles as what it is
    ingest.apply([report("p2", sent["p2"], E.ROLLED_BACK, version="1.0.0")])
    assert execution(db, rid, "p2").state is E.ROLLED_BACK


def test_a_report_never_settles_early_or_on_a_claim_that_does_not_add_up(database_url):
    db = fleet_db(database_url)
    rid, sent = started(db)
    ingest = Ingest(db)
    ingest.apply([event(d, rid, g, E.ACTIVATING) for d, g in sent.items()])
    result = ingest.apply([
        report("p1", sent["p1"], None),                                  # still checking: no outcome yet
        report("p2", sent["p2"], E.SUCCEEDED, version="1.0.0"),          # "succeeded" but runs the old version
        report("p3", sent["p3"] + 1, E.SUCCEEDED),                       # a generation never sent to it
        report("x1", sent["x1"], E.SUCCEEDED, variant="cpu-int8"),       # the one that adds up
    ])
    assert result.settled == 1
    states = {d: execution(db, rid, d).state for d in sent}
    assert states == {**dict.fromkeys(sent, E.ACTIVATING), "x1": E.SUCCEEDED}


def test_one_batch_over_many_devices_is_applied_in_bulk_with_its_bounds(database_url):
    db = Database(database_url)
    db.upgrade()
    names = [f"dev-{i:04d}" for i in range(300)]
    with db.unit_of_work() as session:
        session.add_all(Device(id=name, boot=5) for name in names)
    batch: list[DeviceMessage] = [
        Telemetry(device=name, boot=5, seq=seq, kind=TelemetryKind.HEARTBEAT, heartbeat=heartbeat())
        for seq in (1, 2) for name in names]
    batch += [
        Event(device=names[0], boot=5, seq=3, generation=0, state=E.SUCCEEDED),
        Status(device=names[1], boot=5, online=False),
        Telemetry(device=names[2], boot=5 + MAX_BOOT_STEP + 1, seq=9, kind=TelemetryKind.HEARTBEAT,
                  heartbeat=heartbeat()),                                       # a forged boot
        Telemetry(device="not-enrolled", boot=1, seq=1, kind=TelemetryKind.HEARTBEAT, heartbeat=heartbeat()),
    ]
    result = Ingest(db).apply(batch)
    assert (result.applied, result.refused, result.unknown) == (602, 1, 1)
    again = Ingest(db).apply(batch[:600])                                          # a redelivery
    assert (again.applied, again.duplicates) == (0, 600)
    with db.unit_of_work() as session:
        devices = {d.id: d for d in session.scalars(sa.select(Device))}
        assert session.scalar(sa.select(sa.func.count()).select_from(TelemetryRecord)) == 600
        assert session.scalar(sa.select(sa.func.count()).select_from(EventRecord)) == 1
    assert all((d.last_telemetry_boot, d.last_telemetry_seq, d.boot) == (5, 2, 5) for d in devices.values())
    assert all(d.last_seen is not None for d in devices.values())
    assert [n for n, d in devices.items() if not d.online] == [names[1]]
    assert (devices[names[0]].last_event_boot, devices[names[0]].last_event_seq) == (5, 3)
