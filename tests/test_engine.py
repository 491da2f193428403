"""The rollout engine on a real database (SQLite and PostgreSQL), with the real ingest
applying device events and a publisher that records the desired states."""
from __future__ import annotations

import itertools
from datetime import timedelta

import pytest
import sqlalchemy as sa

from edgefleet.common.protocol import (
    MAX_MODELS,
    Action,
    Desired,
    DesiredSet,
    Event,
    ModelRef,
    Telemetry,
    TelemetryKind,
)
from edgefleet.common.protocol import ExecutionState as E
from edgefleet.controller.db.models import (
    BadVariant,
    Benchmark,
    Device,
    Execution,
    GateResult,
    Rollout,
    utcnow,
)
from edgefleet.controller.db.session import Database
from edgefleet.controller.errors import Conflict
from edgefleet.controller.ingest import Ingest
from edgefleet.controller.rollout import engine
from edgefleet.controller.rollout.states import RolloutState, Trigger, Verdict
from tests.rollout_fleet import RPI, RecordingPublisher, fleet_db, publish_model, spec_for
from tests.support.messages import benchmark_report

_seq = itertools.count(1)


def say(db: Database, device: str, state: E, deployment: str | None, generation: int) -> None:
    """What the agent would send: one execution event."""
    Ingest(db).apply([Event(device=device, boot=1, seq=next(_seq), generation=generation, state=state,
                            deployment=deployment)])


def bench(db: Database, device: str, version: str, variant: str, p99_ms: float,
          paired_previous_ms: float | None = None) -> None:
    """What the agent's gate sends; with ``paired_previous_ms`` the replaced model was timed in turn."""
    ref = ModelRef(model="digits", version=version, variant=variant, release=2)
    Ingest(db).apply([Telemetry(device=device, boot=1, seq=next(_seq), kind=TelemetryKind.BENCHMARK,
                                benchmark=benchmark_report(ref, p99_ms, paired_previous_ms))])


def create(db: Database, **changes) -> str:
    with db.unit_of_work() as session:
        return engine.create_rollout(session, spec_for(**changes), "test").rollout_id


def executions(db: Database, rollout_id: str) -> list[Execution]:
    with db.unit_of_work() as session:
        return list(session.scalars(sa.select(Execution).where(Execution.rollout_id == rollout_id)
                                    .order_by(Execution.device_id)))


def rollout(db: Database, rollout_id: str) -> Rollout:
    with db.unit_of_work() as session:
        return session.get(Rollout, rollout_id)


def finish(db: Database, publisher: RecordingPublisher, rollout_id: str, state: E = E.SUCCEEDED,
           only: set[str] | None = None) -> None:
    """Every device that was sent this rollout reports ``state`` for its latest generation."""
    for desired in publisher.sent:
        if desired.deployment == rollout_id and (only is None or desired.device in only):
            say(db, desired.device, state, rollout_id, desired.generation)


def test_full_rollout_steps_through_stages(database_url):
    db = fleet_db(database_url)
    publisher = RecordingPublisher()
    rid = create(db, stages=(0.3, 1.0))
    report = engine.step_all(db, publisher)
    assert report.created == 2 and report.published == 2   # one of each class: ceil(30% of 3)
    first = executions(db, rid)
    assert {e.stage for e in first} == {0} and all(e.generation == 1 for e in first)
    sent = {d.device: d for d in publisher.sent}
    classes = {"x": "cpu-int8", "p": "cpu-fp32"}
    for device, desired in sent.items():
        assert desired.action == Action.INSTALL and desired.deployment == rid
        assert desired.variant == classes[device[0]] and desired.target == f"digits/1.1.0/{desired.variant}.onnx"
        assert desired.gate.max_p99_regression == 0.15
    assert engine.step_all(db, publisher).published == 0     # idempotent: nothing owed twice
    finish(db, publisher, rid)
    assert "stage 1/2 (30%) passed" in engine.step_all(db, publisher).transitions[0]
    engine.step_all(db, publisher)                           # stage 2: the other four devices
    assert len(executions(db, rid)) == 6 and len(publisher.sent) == 6
    finish(db, publisher, rid)
    engine.step_all(db, publisher)
    done = rollout(db, rid)
    assert done.state is RolloutState.SUCCEEDED
    with db.unit_of_work() as session:
        gates = session.scalars(sa.select(GateResult).where(GateResult.rollout_id == rid)).all()
        assert {(g.stage, g.hardware_class) for g in gates} == {(s, c) for s in (0, 1) for c in ("x86_64", "rpi-4")}
        assert all(g.verdict is not Verdict.FAIL for g in gates)
        devices = {d.id: d for d in session.scalars(sa.select(Device))}
    assert all(d.desired_generation == 1 and DesiredSet.from_dict(d.desired).deployment == rid
               for d in devices.values())
    assert len(publisher.sent) == 6


def test_failing_gate_stops_rolls_back_and_marks_variant_bad(database_url):
    db = fleet_db(database_url, count_per_class=4)
    with db.unit_of_work() as session:   # the version it replaces ran at 10 ms on rpi-4
        session.add_all(Benchmark(device_id=f"p{i}", hardware_class="rpi-4", model="digits", version="1.0.0",
                                  variant="cpu-fp32", p50_ms=5, p99_ms=10.0) for i in range(1, 5))
    publisher = RecordingPublisher()
    rid = create(db, stages=(0.5, 1.0), max_failure_rate=0.5)
    engine.step_all(db, publisher)
    stage0 = {d.device: d for d in publisher.sent}
    assert len(stage0) == 4
    x86 = sorted(d for d in stage0 if d.startswith("x"))
    rpi = sorted(d for d in stage0 if d.startswith("p"))
    # one x86 device fails its golden set (rolled back on the device); rpi devices are 50% slower
    say(db, x86[0], E.ROLLED_BACK, rid, stage0[x86[0]].generation)
    for device in x86[1:] + rpi:
        say(db, device, E.SUCCEEDED, rid, stage0[device].generation)
    for device in rpi:
        bench(db, device, "1.1.0", "cpu-fp32", 15.0)
    report = engine.step_all(db, publisher)
    failed = rollout(db, rid)
    assert failed.state is RolloutState.FAILED and failed.stage == 0
    assert "p99_regression on rpi-4: 0.5 (limit 0.15) FAIL" in failed.detail
    # cloud rollback for every device that activated the new version, nothing for the one that rolled back itself
    rollbacks = {d.device: d for d in publisher.sent[4:] if d.action == Action.ROLLBACK}
    assert set(rollbacks) == set(x86[1:] + rpi) and report.published == len(rollbacks) + 1
    holds = [d for d in publisher.sent[4:] if d.action != Action.ROLLBACK]
    assert [(h.device, h.version, h.deployment) for h in holds] == [(x86[0], "1.0.0", None)]
    assert all(r.generation == stage0[r.device].generation + 1 for r in rollbacks.values())
    with db.unit_of_work() as session:
        bad = {(b.variant, b.hardware_class) for b in session.scalars(sa.select(BadVariant))}
        verdicts = {(g.gate, g.hardware_class): g for g in session.scalars(sa.select(GateResult))}
    assert bad == {("cpu-fp32", "rpi-4")}
    assert verdicts[("p99_regression", "rpi-4")].verdict is Verdict.FAIL
    assert verdicts[("p99_regression", "rpi-4")].value == pytest.approx(0.5)
    assert verdicts[("failure_rate", "x86_64")].value == 0.5 and verdicts[("failure_rate", "x86_64")].verdict is Verdict.PASS
    # no later stage, nothing sent twice; the devices confirm the rollback
    assert engine.step_all(db, publisher).published == 0
    for device, desired in rollbacks.items():
        say(db, device, E.ROLLED_BACK, rid, desired.generation)
    assert {e.state for e in executions(db, rid)} == {E.ROLLED_BACK}
    assert len(executions(db, rid)) == 4
    # the next rollout of that version avoids the bad variant on rpi-4 only
    with db.unit_of_work() as session:
        plan = engine.create_rollout(session, spec_for(), "test", dry_run=True).plan
    variants = {c.hardware_class: c.variant for s in plan.stages for c in s.choices}
    assert variants == {"x86_64": "cpu-int8"} and {c.hardware_class for c in plan.unfit} == {"rpi-4"}


def test_restart_mid_rollout_continues_without_duplicates(database_url):
    db = fleet_db(database_url)
    publisher = RecordingPublisher()
    rid = create(db, stages=(0.3, 1.0))
    engine.step_all(db, publisher)
    finish(db, publisher, rid)
    engine.step_all(db, publisher)      # stage passed
    db.dispose()                        # the controller dies here
    again, publisher2 = Database(database_url), RecordingPublisher()
    engine.step_all(again, publisher2)
    engine.step_all(again, publisher2)
    assert len(publisher2.sent) == 4 and not {d.device for d in publisher2.sent} & {d.device for d in publisher.sent}
    db.dispose()
    third, publisher3 = Database(database_url), RecordingPublisher()
    engine.step_all(third, publisher3)
    assert publisher3.sent == []         # nothing applied twice
    finish(third, publisher2, rid)
    engine.step_all(third, publisher3)
    assert rollout(third, rid).state is RolloutState.SUCCEEDED
    with third.unit_of_work() as session:
        counts = session.execute(sa.select(Execution.device_id, sa.func.count()).group_by(Execution.device_id)).all()
    assert len(counts) == 6 and {n for _, n in counts} == {1}


def sent_generations(db: Database) -> dict[str, tuple[int, int]]:
    """Per device: (desired generation committed, generation the broker acknowledged)."""
    with db.reading() as session:
        rows = session.execute(sa.select(Device.id, Device.desired_generation, Device.desired_sent_generation))
        return {device: (committed, sent) for device, committed, sent in rows}


def test_publish_failure_is_retried_next_pass(database_url):
    """The outbox: committed first, published after; what the broker did not take is sent
    again with the same generation, and nothing is sent twice once it was acknowledged."""
    db = fleet_db(database_url, count_per_class=1)
    publisher = RecordingPublisher()
    rid = create(db, stages=(1.0,))
    publisher.fail = True
    report = engine.step_all(db, publisher)
    assert report.published == 0 and len(report.errors) == 2, "the batch, then its republish, each refused"
    assert all(e.generation == 1 for e in executions(db, rid)), "decided and committed before the publish"
    assert set(sent_generations(db).values()) == {(1, 0)}, "not acknowledged"
    publisher.fail = False
    assert engine.step_all(db, publisher).published == 2
    assert [d.generation for d in publisher.sent] == [1, 1], "the same generation again, not a new one"
    assert set(sent_generations(db).values()) == {(1, 1)}
    assert engine.step_all(db, publisher).published == 0 and len(publisher.sent) == 2


def test_timeouts_retry_with_backoff_then_time_out(database_url):
    db = fleet_db(database_url, count_per_class=1)
    publisher = RecordingPublisher()
    rid = create(db, stages=(1.0,), device_timeout_s=60, max_retries=1, retry_backoff_s=10)
    t0 = utcnow()
    engine.step_all(db, publisher, t0)
    say(db, "x1", E.SUCCEEDED, rid, 1)
    # p1 stays silent (offline)
    report = engine.step_all(db, publisher, t0 + timedelta(seconds=61))
    assert report.retried == 1 and report.published == 0
    p1 = next(e for e in executions(db, rid) if e.device_id == "p1")
    assert p1.state is E.QUEUED and "retry 1/1 in 10s" in p1.detail
    assert engine.step_all(db, publisher, t0 + timedelta(seconds=65)).published == 0   # backing off
    assert engine.step_all(db, publisher, t0 + timedelta(seconds=72)).published == 1
    assert [d.generation for d in publisher.to("p1")] == [1, 2]
    report = engine.step_all(db, publisher, t0 + timedelta(seconds=72 + 61))
    assert report.timed_out == 1
    states = {e.device_id: e.state for e in executions(db, rid)}
    assert states == {"x1": E.SUCCEEDED, "p1": E.TIMED_OUT}
    # a timed-out device counts as a failure: 1 of 1 on rpi-4
    assert rollout(db, rid).state is RolloutState.FAILED


def test_operator_controls(database_url):
    db = fleet_db(database_url)
    publisher = RecordingPublisher()
    rid = create(db, stages=(0.3, 0.6, 1.0))
    with db.unit_of_work() as session:
        engine.control(session, rid, Trigger.PAUSE, "alice")
    assert engine.step_all(db, publisher).published == 0          # paused: nothing sent
    with db.unit_of_work() as session:
        with pytest.raises(Conflict, match="rollout is PAUSED; cannot pause it"):
            engine.control(session, rid, Trigger.PAUSE, "alice")
        engine.control(session, rid, Trigger.RESUME, "alice")
        engine.control(session, rid, Trigger.PROMOTE, "alice")   # skip straight to stage 2
    engine.step_all(db, publisher)
    assert {e.stage for e in executions(db, rid)} == {1} and len(publisher.sent) == 4
    with db.unit_of_work() as session:
        engine.control(session, rid, Trigger.ABORT, "alice")
    engine.step_all(db, publisher)
    assert {e.state for e in executions(db, rid)} == {E.CANCELED}
    holds = publisher.sent[4:]
    assert len(holds) == 4 and all(h.version == "1.0.0" and h.deployment is None for h in holds)
    with db.unit_of_work() as session:
        engine.control(session, rid, Trigger.ROLLBACK, "alice")
    assert engine.step_all(db, publisher).published == 0         # nothing of ours left on the devices
    assert rollout(db, rid).state is RolloutState.ROLLED_BACK


def test_devices_enrolled_later_get_the_version_reached(database_url):
    db = fleet_db(database_url)
    publisher = RecordingPublisher()
    rid = create(db, stages=(0.3, 1.0))
    engine.step_all(db, publisher)
    with db.unit_of_work() as session:
        session.add(Device(id="p9", labels={"site": "berlin"}, hardware=RPI, hardware_class="rpi-4", online=False,
                           enrolled_at=utcnow() + timedelta(seconds=1)))
    engine.step_all(db, publisher)
    late = next(e for e in executions(db, rid) if e.device_id == "p9")
    assert late.stage == 0 and "offline" in late.detail and [d.device for d in publisher.sent].count("p9") == 1


def test_p99_gate_prefers_the_paired_baseline_over_older_figures(database_url):
    """Earlier benchmarks of the old version were taken on a quiet device (10 ms); now the device is
    busy and both versions run at 40 ms, timed in turn: that is no regression."""
    db = fleet_db(database_url, count_per_class=2)
    with db.unit_of_work() as session:
        session.add_all(Benchmark(device_id=f"p{i}", hardware_class="rpi-4", model="digits", version="1.0.0",
                                  variant="cpu-fp32", p50_ms=5, p99_ms=10.0) for i in range(1, 3))
    publisher = RecordingPublisher()
    rid = create(db, stages=(1.0,), bake_s=0)
    engine.step_all(db, publisher)
    for desired in publisher.sent:
        say(db, desired.device, E.SUCCEEDED, rid, desired.generation)
        bench(db, desired.device, "1.1.0", "cpu-fp32", 40.0, paired_previous_ms=39.0)
    engine.step_all(db, publisher)
    assert rollout(db, rid).state is RolloutState.SUCCEEDED
    with db.unit_of_work() as session:
        p99 = {g.hardware_class: g for g in session.scalars(
            sa.select(GateResult).where(GateResult.gate == "p99_regression"))}
    assert p99["rpi-4"].value == pytest.approx(40 / 39 - 1) and p99["rpi-4"].verdict is Verdict.PASS


def entries(db: Database) -> dict[str, dict[str, Desired]]:
    """Per device: its stored desired set's entries, by model."""
    with db.reading() as session:
        stored = session.scalars(sa.select(Device.desired).where(Device.desired.is_not(None)))
        sets = [DesiredSet.from_dict(data) for data in stored]
    return {s.device: {e.model or "": e for e in s.models} for s in sets}


def test_rollouts_of_two_models_run_side_by_side_and_stop_apart(database_url):
    """digits and ocr-cls roll out to the same devices at once, each with its own executions and
    its own entry of each device's desired set; rolling ocr-cls back leaves digits alone."""
    db = fleet_db(database_url, count_per_class=2)
    publish_model(db, "ocr-cls", ("1", "2"))
    publisher = RecordingPublisher()
    digits = create(db, stages=(0.5, 1.0))
    with db.unit_of_work() as session:
        created = engine.create_rollout(session, spec_for(model="ocr-cls", version="2", stages=(0.5, 1.0)), "test")
    ocr = created.rollout_id
    assert created.superseded == [], "another model's rollout holds no device"
    for _ in range(4):  # a pass publishes a stage or passes it; every device each was sent succeeds
        engine.step_all(db, publisher)
        finish(db, publisher, digits)
        finish(db, publisher, ocr)
    assert (rollout(db, digits).state, rollout(db, ocr).state) == (RolloutState.SUCCEEDED, RolloutState.SUCCEEDED)
    assert {e.state for e in executions(db, digits) + executions(db, ocr)} == {E.SUCCEEDED}
    installed = entries(db)
    assert len(installed) == 4
    for device, by_model in installed.items():
        assert {m: (e.action, e.version, e.deployment) for m, e in by_model.items()} == {
            "digits": (Action.INSTALL, "1.1.0", digits), "ocr-cls": (Action.INSTALL, "2", ocr)}, device
        assert by_model["digits"].generation != by_model["ocr-cls"].generation
    with db.unit_of_work() as session:
        engine.control(session, ocr, Trigger.ROLLBACK, "alice")
    engine.step_all(db, publisher)
    after = entries(db)
    for device, by_model in after.items():
        assert by_model["ocr-cls"].action is Action.ROLLBACK and by_model["ocr-cls"].deployment == ocr
        assert by_model["digits"] == installed[device]["digits"], "digits' entry is untouched"
    assert rollout(db, digits).state is RolloutState.SUCCEEDED


def test_a_device_at_its_model_limit_fails_its_execution_and_the_others_go_on(database_url):
    db = fleet_db(database_url, count_per_class=1)
    full = "x1"
    with db.unit_of_work() as session:
        device = session.get_one(Device, full)
        entries_ = tuple(Desired(device=full, generation=i + 1, action=Action.NONE, model=f"m{i}")
                         for i in range(MAX_MODELS))
        device.desired = DesiredSet(device=full, generation=MAX_MODELS, models=entries_).to_dict()
        device.desired_generation = MAX_MODELS
    rollout_id = create(db, stages=(1.0,))
    engine.step_all(db, RecordingPublisher())
    by_device = {e.device_id: e for e in executions(db, rollout_id)}
    assert by_device[full].state is E.FAILED and f"at most {MAX_MODELS}" in by_device[full].detail
    others = [e for d, e in by_device.items() if d != full]
    assert others and all(e.generation > 0 for e in others), "the rest of the batch was published"


def test_aborting_one_models_rollout_holds_only_that_model(database_url):
    db = fleet_db(database_url, count_per_class=1)
    publish_model(db, "ocr-cls", ("1", "2"))
    publisher = RecordingPublisher()
    digits = create(db, stages=(1.0,))
    ocr = create(db, model="ocr-cls", version="2", stages=(1.0,))
    engine.step_all(db, publisher)
    with db.unit_of_work() as session:
        engine.control(session, ocr, Trigger.ABORT, "alice")
    engine.step_all(db, publisher)
    held = entries(db)
    # never ran ocr-cls before: the hold is "nothing desired" for that model, still named
    assert {(d, e.action, e.deployment) for d, m in held.items() for e in m.values() if e.model == "ocr-cls"} == {
        ("x1", Action.NONE, None), ("p1", Action.NONE, None)}
    assert {e.state for e in executions(db, ocr)} == {E.CANCELED}
    finish(db, publisher, digits)          # digits carries on as if ocr-cls had never been there
    engine.step_all(db, publisher)
    assert rollout(db, digits).state is RolloutState.SUCCEEDED
    assert all(m["digits"].deployment == digits and m["digits"].action is Action.INSTALL for m in entries(db).values())


def test_a_second_rollout_of_the_same_model_still_needs_supersede(database_url):
    db = fleet_db(database_url, count_per_class=1)
    publish_model(db, "ocr-cls", ("1",))
    first = create(db)
    create(db, model="ocr-cls", version="1")                       # another model: no conflict
    with pytest.raises(Conflict, match=f"already in active rollout\\(s\\) {first}"):
        create(db, version="1.1.0")
    with db.unit_of_work() as session:
        created = engine.create_rollout(session, spec_for(supersede=True), "test")
    assert created.superseded == [first] and rollout(db, first).state is RolloutState.SUPERSEDED
