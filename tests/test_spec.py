"""RolloutSpec, its manifest, and every bad input of a rollout request (issue 5)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import sqlalchemy as sa

from edgefleet.common.protocol import DesiredSet, ExecutionState
from edgefleet.controller.db.models import Rollout
from edgefleet.controller.errors import Conflict, InvalidInput, NotFound
from edgefleet.controller.rollout import engine
from edgefleet.controller.rollout.spec import (
    RolloutSpec,
    load_manifest,
    parse_duration,
    parse_fraction,
    parse_stages,
    schema,
)
from edgefleet.controller.rollout.states import RolloutState
from tests.rollout_fleet import RecordingPublisher, fleet_db, spec_for
from tests.test_engine import say

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "manifests" / "rollout.yaml"


def example() -> dict:
    return load_manifest(EXAMPLE.read_text(), str(EXAMPLE))


def test_parsers():
    assert parse_stages("5%,25%,100%") == (0.05, 0.25, 1.0)
    assert parse_duration("10m") == 600 and parse_duration("1h30m") == 5400 and parse_duration(90) == 90
    assert parse_duration("250ms") == 0.25
    assert parse_fraction("2%") == 0.02 and parse_fraction("0.02") == 0.02
    for bad in ("10x", "m", "-5s", ""):
        with pytest.raises(InvalidInput, match=r"not a duration|must not be negative"):
            parse_duration(bad)
    for endless in (float("nan"), float("inf"), 1e308, "99999999999999999999d", -5):  # deadlines overflowed
        with pytest.raises(InvalidInput, match="must be 0 to 3650d"):
            parse_duration(endless)
    with pytest.raises(InvalidInput, match="not a share"):
        parse_fraction("two percent")
    with pytest.raises(InvalidInput, match="empty entry"):
        parse_stages("5%,,100%")


def test_example_manifest_is_valid_and_round_trips():
    spec = RolloutSpec.from_manifest(example())
    assert spec.stages == (0.05, 0.25, 1.0) and spec.bake_s == 600 and spec.max_failure_rate == 0.02
    assert spec.window is not None and spec.window.duration_s == 7200
    assert spec.sampling.enabled and spec.sampling.low_confidence_below == 0.6
    again = RolloutSpec.from_manifest(spec.to_manifest("x"))
    assert again == spec
    strict = RolloutSpec.from_manifest({**example(), "spec": {**example()["spec"], "gates": {"min_samples": 20}}})
    assert strict.min_samples == 20 and RolloutSpec.from_manifest(strict.to_manifest("x")) == strict


def test_schema_is_packaged_and_closed():
    assert schema()["additionalProperties"] is False
    assert schema()["properties"]["spec"]["additionalProperties"] is False


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["spec"].update(colour="red"), r"\$\.spec\.colour: unknown field"),
    (lambda m: m.update(extra=1), r"\$\.extra: unknown field"),
    (lambda m: m["spec"]["gates"].update(max_latency=1), r"\$\.spec\.gates\.max_latency: unknown field"),
    (lambda m: m["spec"]["gates"].update(max_failure_rate="2x"), r"\$\.spec\.gates\.max_failure_rate: '2x' is not valid"),
    (lambda m: m["spec"].update(bake="soon"), r"\$\.spec\.bake: 'soon' is not valid"),
    (lambda m: m["spec"].update(stages="5%"), r"\$\.spec\.stages: '5%' is not of type 'array'"),
    (lambda m: m["spec"].pop("model"), r"\$\.spec: 'model' is a required property"),
    (lambda m: m.update(kind="Deployment"), r"\$\.kind: 'Rollout' was expected"),
    (lambda m: m["spec"]["window"].update(cron="at two"), r"\$\.spec\.window\.cron"),
])
def test_manifest_errors_name_the_json_path(edit, message):
    manifest = copy.deepcopy(example())
    edit(manifest)
    with pytest.raises(InvalidInput, match=message) as info:
        RolloutSpec.from_manifest(manifest, "rollout.yaml")
    assert str(info.value).startswith("rollout.yaml: ") and "\n" not in str(info.value)


@pytest.mark.parametrize("changes, message", [
    ({"stages": (0.25, 0.05, 1.0)}, "stages must increase: 5% follows 25%"),
    ({"stages": (0.05, 0.05, 1.0)}, "stages must increase"),
    ({"stages": (0.05, 0.5)}, "stages must end at 100%, the last is 50%"),
    ({"stages": (0.0, 1.0)}, "first stage 0% must be above 0%"),
    ({"max_failure_rate": 1.5}, "max_failure_rate 1.5 is out of range"),
    ({"max_error_rate": -0.1}, "max_error_rate -0.1 is out of range"),
    ({"max_confidence_shift": 2.0}, "max_confidence_shift 2 is out of range"),
    ({"max_p99_regression": 50.0}, "max_p99_regression 50 is out of range"),
    ({"device_timeout_s": 0}, "device timeout must be above 0s"),
    ({"window_cron": "0 2 * * *"}, "needs both --window CRON and --window-duration"),
    ({"window_cron": "0 2 *", "window_duration_s": 60}, "must have 5 fields"),
    ({"selector": "site in (a"}, "selector 'site in \\(a': expected"),
    ({"selector": " "}, "selector is empty"),
    ({"version": "1.0/../x"}, "version '1.0/../x' is invalid"),
])
def test_spec_validation(changes, message):
    values = {"model": "digits", "version": "1.1.0", "selector": "site=berlin", **changes}
    with pytest.raises(InvalidInput, match=message):
        RolloutSpec(**values)


def test_yaml_errors_are_one_line():
    with pytest.raises(InvalidInput, match="is not valid YAML") as info:
        load_manifest("spec: [unclosed", "bad.yaml")
    assert "\n" not in str(info.value)
    with pytest.raises(InvalidInput, match="must be a mapping"):
        load_manifest("- a\n- b\n", "list.yaml")


# --- bad requests against a fleet (SQLite and PostgreSQL) -----------------------------


def test_unknown_model_and_version(database_url):
    db = fleet_db(database_url)
    with db.unit_of_work() as session:
        with pytest.raises(NotFound, match="model 'nosuch' is not published"):
            engine.create_rollout(session, spec_for(model="nosuch"), "test")
        with pytest.raises(NotFound, match=r"model digits has no version '9\.9\.9'; published: 1\.0\.0, 1\.1\.0"):
            engine.create_rollout(session, spec_for(version="9.9.9"), "test")


def test_selector_matching_nothing_creates_no_rollout(database_url):
    db = fleet_db(database_url)
    with (
        pytest.raises(InvalidInput, match="selector 'site=mars' matches no device; no rollout created"),
        db.unit_of_work() as session,
    ):
        engine.create_rollout(session, spec_for(selector="site=mars"), "test")
    with db.unit_of_work() as session:
        assert session.query(Rollout).count() == 0


def test_downgrade_needs_allow_downgrade(database_url):
    db = fleet_db(database_url, running="1.1.0")
    with db.unit_of_work() as session:
        with pytest.raises(InvalidInput, match=r"1.0.0 is older than 1.1.0 running on 6 selected device.*--allow-downgrade"):
            engine.create_rollout(session, spec_for(version="1.0.0"), "test")
        created = engine.create_rollout(session, spec_for(version="1.0.0", allow_downgrade=True), "test")
        assert session.get(Rollout, created.rollout_id).state is RolloutState.PENDING


def test_second_conflicting_rollout_is_refused_unless_it_supersedes(database_url):
    db = fleet_db(database_url)
    with db.unit_of_work() as session:
        first = engine.create_rollout(session, spec_for(selector="hw.class=rpi-4"), "test").rollout_id
        engine.create_rollout(session, spec_for(selector="hw.class=x86_64"), "test")  # disjoint devices: fine
    with (
        db.unit_of_work() as session,
        pytest.raises(Conflict, match=f"already in active rollout\\(s\\) {first}, .*--supersede"),
    ):
        engine.create_rollout(session, spec_for(selector="site=berlin"), "test")
    with db.unit_of_work() as session:
        second = engine.create_rollout(session, spec_for(selector="hw.class=rpi-4", supersede=True), "test")
        assert second.superseded == [first]
        assert session.get(Rollout, first).state is RolloutState.SUPERSEDED
        assert session.get(Rollout, second.rollout_id).supersedes == first


def test_dry_run_stores_nothing(database_url):
    db = fleet_db(database_url)
    with db.unit_of_work() as session:
        created = engine.create_rollout(session, spec_for(), "test", dry_run=True)
        assert not created.created and created.plan.device_count == 6
        assert session.query(Rollout).count() == 0


class BridgePublisher(RecordingPublisher):
    """Publishes what the database holds, as controller.broker.Bridge does (the agent judges it)."""

    def publish_desired(self, *desired: DesiredSet) -> None:
        self.record(*desired)


def test_a_stored_spec_is_trusted_so_a_stricter_release_does_not_stall_it(database_url):
    """A spec an older release stored, which this release's validator refuses, still steps."""
    db = fleet_db(database_url)
    with db.unit_of_work() as session:
        rid = engine.create_rollout(session, spec_for(window_cron="0 2 * * *", window_duration_s=3600), "test").rollout_id
    with db.unit_of_work() as session:
        rollout = session.get(Rollout, rid)
        assert rollout is not None
        stored = copy.deepcopy(rollout.spec)
        stored["spec"]["window"]["cron"] = "0 0 30 2 *"  # never fires: refused since
        stored["spec"]["gates"]["max_p99_regression"] = 50.0  # out of range: refused since
        rollout.spec = stored
    with pytest.raises(InvalidInput):
        RolloutSpec.from_manifest(stored)
    publisher = BridgePublisher()
    for _ in range(4):
        engine.step_all(db, publisher)
        for d in publisher.sent:
            say(db, d.device, ExecutionState.SUCCEEDED, rid, d.generation)
    with db.unit_of_work() as session:
        assert session.scalar(sa.select(Rollout.state).where(Rollout.id == rid)) is RolloutState.SUCCEEDED
    assert {d.window and d.window.cron for d in publisher.sent} == {"0 0 30 2 *"} and len(publisher.sent) == 6
    assert {d.gate.max_p99_regression for d in publisher.sent} == {50.0}
