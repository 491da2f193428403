"""Ingest on a real database (SQLite and PostgreSQL): executions settled from the device's
report when their events were lost, and one batch spanning many devices applied in bulk
with every bound on what a device claims still enforced."""
from __future__ import annotations

import itertools

import sqlalchemy as sa

from edgefleet.common.protocol import (
    DeviceMessage,
    Event,
    ModelRef,
    ModelStatus,
    Reported,
    Status,
    Telemetry,
    TelemetryKind,
)
from edgefleet.common.protocol import ExecutionState as E
from edgefleet.controller.claims import MAX_BOOT_STEP
from edgefleet.controller.db.models import Device, EventRecord, Execution, TelemetryRecord
from edgefleet.controller.db.session import Database
from edgefleet.controller.ingest import Ingest
from edgefleet.controller.rollout import engine
from tests.rollout_fleet import RecordingPublisher, fleet_db, publish_model, spec_for
from tests.support.messages import heartbeat

_seq = itertools.count(100)


def started(db: Database, model: str = "digits", version: str = "1.1.0") -> tuple[str, dict[str, int]]:
    """A one-stage rollout of ``model`` ``version`` to every device, sent: (rollout id, device -> generation)."""
    with db.unit_of_work() as session:
        spec = spec_for(model=model, version=version, stages=(1.0,))
        rid = engine.create_rollout(session, spec, "test").rollout_id
    publisher = RecordingPublisher()
    engine.step_all(db, publisher)
    return rid, {d.device: d.generation for d in publisher.sent}


def execution(db: Database, rid: str, device: str) -> Execution:
    with db.unit_of_work() as session:
        return session.scalars(sa.select(Execution).filter_by(rollout_id=rid, device_id=device)).one()


def event(device: str, rid: str, generation: int, state: E) -> Event:
    return Event(device=device, boot=1, seq=next(_seq), generation=generation, state=state, deployment=rid)


def status(generation: int, outcome: E | None, version: str = "1.1.0", variant: str = "cpu-fp32",
           model: str = "digits", active_model: str | None = None) -> ModelStatus:
    """One model's status; ``active_model`` names what the device says it runs, when not ``model``."""
    active = ModelRef(model=active_model or model, version=version, variant=variant, release=2)
    return ModelStatus(model=model, generation=generation, active=active, outcome=outcome)


def report(device: str, generation: int, outcome: E | None, version: str = "1.1.0",
           variant: str = "cpu-fp32") -> Reported:
    return Reported(device=device, boot=1, seq=next(_seq), models=(status(generation, outcome, version, variant),))


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


def test_the_stored_report_read_again_is_no_sign_of_life(database_url):
    """The leader's sweep re-reads the retained reports of silent devices, most of them offline: the
    stored report, delivered again, must not bring its device back online nor be written again."""
    db = fleet_db(database_url)
    _rid, sent = started(db)
    ingest = Ingest(db)
    done = report("p1", sent["p1"], E.SUCCEEDED)
    assert ingest.apply([done]).settled == 1
    ingest.apply([Status(device="p1", boot=1, online=False)])  # its will: gone
    with db.unit_of_work() as session:
        before = session.get(Device, "p1")
        assert before is not None and not before.online
        seen, stored = before.last_seen, before.reported
    again = ingest.apply([done])
    assert (again.duplicates, again.applied) == (1, 0)
    with db.unit_of_work() as session:
        after = session.get(Device, "p1")
        assert after is not None and not after.online, "a re-read report brought an offline device online"
        assert (after.last_seen, after.reported) == (seen, stored)
    newer = ingest.apply([report("p1", sent["p1"], E.SUCCEEDED)])  # a report it sends later is news
    assert newer.applied == 1
    with db.unit_of_work() as session:
        device = session.get(Device, "p1")
        assert device is not None and device.online


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


def test_a_report_of_two_models_settles_each_models_execution(database_url):
    db = fleet_db(database_url, count_per_class=1)
    publish_model(db, "ocr-cls", ("1", "2"))
    digits, to_digits = started(db)
    ocr, to_ocr = started(db, model="ocr-cls", version="2")
    assert to_ocr["p1"] != to_digits["p1"], "one generation per change of the device's desired set"
    ingest = Ingest(db)
    both = Reported(device="p1", boot=1, seq=next(_seq), models=(
        status(to_digits["p1"], E.SUCCEEDED),
        status(to_ocr["p1"], E.FAILED, version="1", model="ocr-cls"),
    ))
    assert ingest.apply([both]).settled == 2
    assert (execution(db, digits, "p1").state, execution(db, ocr, "p1").state) == (E.SUCCEEDED, E.FAILED)
    # x1's report swaps the two: each model claims the other's generation, which settles nothing;
    # then ocr-cls says SUCCEEDED while what it names as running is digits
    crossed = Reported(device="x1", boot=1, seq=next(_seq), models=(
        status(to_ocr["x1"], E.FAILED, version="1.0.0", variant="cpu-int8"),
        status(to_digits["x1"], E.FAILED, version="1", variant="cpu-int8", model="ocr-cls"),
    ))
    mismatched = Reported(device="x1", boot=1, seq=next(_seq), models=(
        status(to_ocr["x1"], E.SUCCEEDED, version="2", variant="cpu-int8", model="ocr-cls", active_model="digits"),
    ))
    assert ingest.apply([crossed]).settled == 0 and ingest.apply([mismatched]).settled == 0
    assert (execution(db, digits, "x1").state, execution(db, ocr, "x1").state) == (E.QUEUED, E.QUEUED)


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
