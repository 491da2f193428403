"""The leader's sweep for silent executions (controller/rollout/reread.py) against a real database."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from edgefleet.controller.db.models import Execution
from edgefleet.controller.db.session import Database
from edgefleet.controller.rollout import engine
from edgefleet.controller.rollout.reread import MAX_DEVICES, ReportSweep
from tests.rollout_fleet import RecordingPublisher, fleet_db, spec_for

T0 = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)  # when every execution last moved, in these tests


class Asked:
    """The bridge as the sweep sees it: records whose reports were asked for."""

    def __init__(self) -> None:
        self.sweeps: list[list[str]] = []

    def reread_reports(self, devices: list[str]) -> int:
        self.sweeps.append(sorted(devices))
        return len(devices)


def sent_rollout(db: Database) -> list[str]:
    """A one-stage rollout to every device, its desired states sent; every execution last moved at T0."""
    with db.unit_of_work() as session:
        engine.create_rollout(session, spec_for(stages=(1.0,)), "test")
    publisher = RecordingPublisher()
    engine.step_all(db, publisher)
    moved(db, T0)
    return sorted(d.device for d in publisher.sent)


def moved(db: Database, at: datetime, device: str | None = None) -> None:
    """The executions (of ``device``, or all) last moved at ``at``, as an event would leave them."""
    with db.unit_of_work() as session:
        query = sa.update(Execution).values(updated_at=at)
        session.execute(query if device is None else query.where(Execution.device_id == device))


def test_a_silent_device_is_asked_again_only_as_its_silence_doubles(database_url):
    db = fleet_db(database_url)
    devices = sent_rollout(db)
    source = Asked()
    sweep = ReportSweep(db, source, silent_s=30)
    at = lambda seconds: T0 + timedelta(seconds=seconds)  # noqa: E731

    assert sweep(at(20)) == 0                 # not silent long enough
    assert sweep(at(31)) == len(devices)      # every sent device, once
    assert sweep(at(46)) == 0 and sweep(at(61)) == 0  # still silent, not yet twice as long
    moved(db, at(50), devices[0])             # an event: its execution moved
    assert sweep(at(62)) == len(devices) - 1  # the others, silent twice as long now
    assert source.sweeps[-1] == devices[1:]
    assert sweep(at(81)) == 1                 # the one that moved, silent anew for 31 s
    assert source.sweeps[-1] == devices[:1]
    assert sweep(at(110)) == 0                # 60 s < twice 31 s; 110 s < twice 62 s
    assert sweep(at(124)) == len(devices)     # 74 s >= twice 31 s; 124 s >= twice 62 s


def test_a_sweep_asks_for_at_most_max_devices(database_url, monkeypatch):
    db = fleet_db(database_url)
    devices = sent_rollout(db)
    monkeypatch.setattr("edgefleet.controller.rollout.reread.MAX_DEVICES", 2)
    source = Asked()
    sweep = ReportSweep(db, source, silent_s=30)
    assert MAX_DEVICES > 2 and sweep(T0 + timedelta(seconds=31)) == 2
    assert sweep(T0 + timedelta(seconds=32)) == 2  # the next two: those asked wait for their silence to double
    assert not set(source.sweeps[0]) & set(source.sweeps[1]) and len(devices) > 4
