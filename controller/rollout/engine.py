"""The rollout engine: level-triggered stepping of every rollout from database state.

``step_all(db, publisher, now)`` is run by the scheduler. Each pass re-reads the
rollouts, their executions and the evidence, asks the planner what comes next,
writes it, and then publishes the desired states that the database says are
still owed. Every write is idempotent: executions are UNIQUE per (rollout,
device), a desired state is published only while the database shows it owed,
and a republished one carries the same generation. A controller restart
therefore continues where the last pass stopped and applies nothing twice.
"""
from __future__ import annotations

import logging
import re
import secrets
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol, cast

import sqlalchemy as sa
from sqlalchemy.orm import Session

from edgefleet.common.errors import ProtocolError
from edgefleet.common.hardware import HardwareProfile
from edgefleet.common.protocol import (
    Action,
    Desired,
    DesiredSet,
    ExecutionState,
    ModelCounters,
    ModelRef,
    TelemetryKind,
    target_path,
)

from ..db.models import (
    BadVariant,
    Benchmark,
    Device,
    Execution,
    GateResult,
    Rollout,
    Sample,
    TelemetryRecord,
    Variant,
    utcnow,
)
from ..db.session import Database
from ..desired import desired_set, stored_desired, stored_entry
from ..errors import Conflict, ControllerError, InvalidInput, NotFound
from ..reported import active as reported_active
from . import planner, states
from .planner import (
    ClassObservation,
    DeviceView,
    Evidence,
    StageDecision,
    StateCount,
    VariantView,
)
from .spec import RolloutSpec
from .states import RolloutState, Trigger

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 3600.0
# Stopped rollouts are revisited this long for devices that still owe a rollback or hold.
SETTLE_HORIZON = timedelta(days=1)
# Non-terminal states that time out; WAITING_WINDOW waits for its maintenance window on purpose.
HURRIED = [s for s in ExecutionState if not s.terminal and s is not ExecutionState.WAITING_WINDOW]


class Publisher(Protocol):
    """What the engine needs of the MQTT bridge (controller/broker.py ``Bridge``)."""

    def publish_desired(self, *desired: DesiredSet) -> None:
        """Publish them all; return once the broker took every one (raise Unavailable if not)."""


# --- reading the database into planner views -------------------------------------


# What a DeviceView needs, read as plain rows: a fleet-wide scan of ORM objects costs seconds at 10,000 devices.
VIEW_COLUMNS = (Device.id, Device.labels, Device.hardware, Device.hardware_class, Device.online, Device.reported)


def device_view(device: Device | sa.Row, model: str) -> DeviceView:
    """A planner view of a device, from its ORM object or a row of VIEW_COLUMNS; what it runs
    is its version of ``model`` (the model being rolled out)."""
    active = reported_active(device.reported, model) or {}
    hardware = dict(device.hardware or {})
    cls = device.hardware_class or (HardwareProfile.from_dict(hardware).hardware_class if hardware else "unknown")
    return DeviceView(
        id=device.id, labels=dict(device.labels or {}), hardware=hardware, hardware_class=cls,
        online=device.online, model=active.get("model"), version=active.get("version"),
        variant=active.get("variant"),
    )


def variant_views(session: Session, model: str, version: str) -> list[VariantView]:
    rows = session.scalars(
        sa.select(Variant).where(Variant.model == model, Variant.version == version).order_by(Variant.preference)
    )
    return [
        VariantView(r.variant, r.target_path, dict(r.requirements), r.preference, dict(r.accuracy)) for r in rows
    ]


def evidence(session: Session, model: str, version: str) -> list[Evidence]:
    """Median on-device p99 per (hardware class, variant) of this version."""
    rows = session.execute(
        sa.select(Benchmark.hardware_class, Benchmark.variant, Benchmark.device_id, Benchmark.p50_ms,
                  Benchmark.p99_ms)
        .where(Benchmark.model == model, Benchmark.version == version)
    )
    grouped: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    devices: dict[tuple[str, str], set[str]] = defaultdict(set)
    for cls, variant, device, p50, p99 in rows:
        grouped[(cls, variant)].append((p50, p99))
        devices[(cls, variant)].add(device)
    return [
        Evidence(cls, variant, statistics.median(p99 for _, p99 in values), len(devices[(cls, variant)]),
                 statistics.median(p50 for p50, _ in values))
        for (cls, variant), values in sorted(grouped.items())
    ]


def bad_variants(session: Session, model: str, version: str) -> set[tuple[str, str]]:
    rows = session.execute(
        sa.select(BadVariant.variant, BadVariant.hardware_class)
        .where(BadVariant.model == model, BadVariant.version == version)
    )
    return {(variant, cls) for variant, cls in rows}


def all_devices(session: Session, model: str) -> list[DeviceView]:
    return [device_view(row, model) for row in session.execute(sa.select(*VIEW_COLUMNS).order_by(Device.id))]


# --- creating a rollout -----------------------------------------------------------


def version_key(version: str) -> tuple:
    """Order versions like 1.9.0 < 1.10.0; non-numeric parts compare as text after numbers."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[.\-+_]", version))


def new_rollout_id(spec: RolloutSpec) -> str:
    base = re.sub(r"[^A-Za-z0-9-]+", "-", f"{spec.model}-{spec.version}").strip("-")[:50]
    return f"{base}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class Created:
    rollout_id: str
    plan: planner.Plan
    superseded: list[str] = field(default_factory=list)
    created: bool = True


def create_rollout(
    session: Session, spec: RolloutSpec, actor: str, rollout_id: str | None = None, dry_run: bool = False,
    now: datetime | None = None,
) -> Created:
    """Check the spec against the fleet and store the rollout (or only plan it, for a dry run).

    Refuses: an unknown model or version, a selector that matches nothing or only
    devices no variant fits, a downgrade without ``allow_downgrade``, and devices
    that another active rollout of the same model holds unless ``supersede`` (the
    rollouts of a device's other models run beside it).
    """
    now = now or utcnow()
    rollout_id = rollout_id or new_rollout_id(spec)
    variants = variant_views(session, spec.model, spec.version)
    if not variants:
        known = sorted(
            {v for (v,) in session.execute(sa.select(Variant.version).where(Variant.model == spec.model))},
            key=version_key,
        )
        if not known:
            raise NotFound(f"model {spec.model!r} is not published; see `fleetctl models list`")
        raise NotFound(f"model {spec.model} has no version {spec.version!r}; published: {', '.join(known)}")
    devices = planner.select(spec.selector, all_devices(session, spec.model))
    if not devices:
        raise InvalidInput(
            f"selector {spec.selector!r} matches no device; no rollout created (see `fleetctl devices list`)"
        )
    plan = planner.plan(
        rollout_id, spec, devices, variants, evidence(session, spec.model, spec.version),
        bad_variants(session, spec.model, spec.version),
    )
    if plan.device_count == 0:
        raise InvalidInput(
            f"no variant of {spec.model}:{spec.version} fits the {len(devices)} selected device(s): "
            f"{plan.unfit[0].reason}; no rollout created"
        )
    _check_downgrade(spec, devices)
    overlapping = _overlapping(session, spec, devices, rollout_id)
    if overlapping and not spec.supersede:
        raise Conflict(
            f"devices are already in active rollout(s) {', '.join(overlapping)}; "
            "wait, abort them, or pass --supersede"
        )
    if session.get(Rollout, rollout_id) is not None:
        raise Conflict(f"rollout {rollout_id!r} exists; choose another name")
    if dry_run:
        return Created(rollout_id, plan, overlapping, created=False)
    for other_id in overlapping:
        _apply(session, session.get_one(Rollout, other_id), Trigger.SUPERSEDE, f"superseded by {rollout_id}", now)
    session.add(Rollout(
        id=rollout_id, model=spec.model, version=spec.version, selector=spec.selector,
        spec=spec.to_manifest(rollout_id), state=RolloutState.PENDING, stage=0, created_by=actor,
        created_at=now, supersedes=overlapping[0] if overlapping else None,
        detail=f"planned {plan.device_count} device(s) in {len(spec.stages)} stage(s)"
        + (f"; {len(plan.unfit)} device(s) no variant fits" if plan.unfit else ""),
    ))
    session.flush()
    return Created(rollout_id, plan, overlapping)


def _check_downgrade(spec: RolloutSpec, devices: list[DeviceView]) -> None:
    if spec.allow_downgrade:
        return
    newer = [d for d in devices if d.model == spec.model and d.version
             and version_key(d.version) > version_key(spec.version)]
    if newer:
        raise InvalidInput(
            f"{spec.model} {spec.version} is older than {newer[0].version} running on {len(newer)} selected "
            "device(s); pass --allow-downgrade to go back on purpose"
        )


def _overlapping(session: Session, spec: RolloutSpec, devices: list[DeviceView], rollout_id: str) -> list[str]:
    mine = {d.id for d in devices}
    everyone = all_devices(session, spec.model)
    overlapping = []
    active = session.scalars(
        sa.select(Rollout).where(Rollout.state.in_(list(states.ACTIVE | {RolloutState.PAUSED})))
        .where(Rollout.model == spec.model, Rollout.id != rollout_id).order_by(Rollout.created_at)
    )
    for other in active:
        theirs = {d.id for d in planner.select(other.selector, everyone)}
        if theirs & mine:
            overlapping.append(other.id)
    return overlapping


# --- operator controls -------------------------------------------------------------


def control(session: Session, rollout_id: str, trigger: Trigger, actor: str, now: datetime | None = None) -> Rollout:
    """pause / resume / promote / abort / rollback, as the state table allows."""
    rollout = session.get(Rollout, rollout_id, with_for_update=True)
    if rollout is None:
        raise NotFound(f"rollout {rollout_id!r} not found; see `fleetctl rollout list`")
    _apply(session, rollout, trigger, f"{trigger.value} by {actor}", now or utcnow())
    return rollout


def _apply(session: Session, rollout: Rollout, trigger: Trigger, detail: str, now: datetime) -> None:
    spec = RolloutSpec.from_stored(rollout.spec)
    step = states.transition(rollout.state, trigger, rollout.stage, len(spec.stages))
    rollout.state, rollout.stage, rollout.detail = step.state, step.stage, detail
    if step.stage_advanced or trigger is Trigger.START:
        rollout.stage_started_at = now
    if step.state.terminal:
        _cancel_pending(session, rollout, detail, unsent_only=step.state in states.ROLLING_BACK)


def _cancel_pending(session: Session, rollout: Rollout, detail: str, unsent_only: bool) -> None:
    """A stopped rollout sends nothing more. Executions already sent are settled by the
    hold/rollback publishes when rolling back; otherwise they are canceled here."""
    for execution in session.scalars(_executions(rollout.id)):
        if not execution.state.terminal and not (unsent_only and execution.generation):
            execution.state, execution.detail = ExecutionState.CANCELED, detail


def _executions(rollout_id: str, stage: int | None = None) -> sa.Select:
    query = sa.select(Execution).where(Execution.rollout_id == rollout_id).order_by(Execution.id)
    return query if stage is None else query.where(Execution.stage == stage)


# --- stepping ---------------------------------------------------------------------------


@dataclass
class PassReport:
    """What one pass did (for logs and tests)."""

    created: int = 0
    published: int = 0
    timed_out: int = 0
    retried: int = 0
    transitions: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def step_all(db: Database, publisher: Publisher, now: datetime | None = None) -> PassReport:
    """One pass over every rollout that still has work: decide, then publish what is owed."""
    now = now or utcnow()
    report = PassReport()
    with db.reading() as session:
        ids = list(session.scalars(
            sa.select(Rollout.id).where(sa.or_(
                Rollout.state.in_(list(states.ACTIVE)),
                sa.and_(Rollout.state.in_(list(states.ROLLING_BACK | {RolloutState.ABORTED})),
                        Rollout.updated_at >= now - SETTLE_HORIZON),
            )).order_by(Rollout.created_at)
        ))
    for rollout_id in ids:
        try:
            step_rollout(db, publisher, rollout_id, now, report)
        except ControllerError as e:  # one broken rollout must not stall the others
            log.warning("rollout %s: %s", rollout_id, e)
            report.errors.append(f"{rollout_id}: {e}")
    try:
        publish_unsent(db, publisher, report)
    except ControllerError as e:
        log.warning("unacknowledged desired states not republished: %s", e)
        report.errors.append(f"republish: {e}")
    return report


def step_rollout(
    db: Database, publisher: Publisher, rollout_id: str, now: datetime | None = None,
    report: PassReport | None = None,
) -> PassReport:
    now = now or utcnow()
    report = report or PassReport()
    logged = len(report.transitions)
    with db.unit_of_work() as session:
        rollout = session.get(Rollout, rollout_id, with_for_update=True)
        if rollout is None:
            raise NotFound(f"rollout {rollout_id!r} not found")
        _decide(session, rollout, now, report)
    for line in report.transitions[logged:]:  # committed: the log says what happened, not what was tried
        log.info("%s", line)
    owed = _owed(db, rollout_id, now)
    for start in range(0, len(owed), PUBLISH_BATCH):
        _publish_batch(db, publisher, owed[start:start + PUBLISH_BATCH], now, report)
    return report


def _decide(session: Session, rollout: Rollout, now: datetime, report: PassReport) -> None:
    spec = RolloutSpec.from_stored(rollout.spec)
    if rollout.state is RolloutState.PENDING:
        _apply(session, rollout, Trigger.START, "started", now)
        report.transitions.append(f"rollout {rollout.id} RUNNING: stage {planner.stage_label(spec, 0)} started")
    if rollout.state is not RolloutState.RUNNING:
        return
    _expire(session, rollout, spec, now, report)
    _add_members(session, rollout, spec, now, report)
    stage = stage_snapshot(session, rollout, now)
    outcome = planner.decide_stage(spec, stage.counts, stage.observations, stage.since_finished_s)
    if outcome.decision is StageDecision.WAIT:
        # a wait with verdicts is one for evidence (NO_DATA, min_samples): the operator sees why in the
        # rollout's detail; other waits (devices updating, baking) show in its progress
        if outcome.verdicts and rollout.detail != outcome.reason:
            rollout.detail = outcome.reason
            report.transitions.append(f"rollout {rollout.id} {rollout.state.value}: {rollout.detail}")
        return
    stage_execs, classes = stage.executions, stage.classes
    if stage_execs is None:  # an early failure: its executions name the variants to mark bad
        stage_execs, classes = _members(session, rollout)
    for verdict in outcome.verdicts:
        session.add(GateResult(
            rollout_id=rollout.id, stage=rollout.stage, hardware_class=verdict.hardware_class, gate=verdict.gate,
            value=verdict.value, threshold=verdict.threshold, verdict=verdict.verdict, ts=now,
        ))
    label = planner.stage_label(spec, rollout.stage)
    if outcome.decision is StageDecision.PASS:
        _apply(session, rollout, Trigger.STAGE_PASSED, f"stage {label} passed: {outcome.reason}", now)
    else:
        _apply(session, rollout, Trigger.GATE_FAILED, f"stage {label} failed: {outcome.reason}", now)
        failed = planner.failed_classes(outcome.verdicts)
        _mark_bad(session, rollout, stage_execs, classes, failed, outcome.reason, now)
    report.transitions.append(f"rollout {rollout.id} {rollout.state.value}: {rollout.detail}")


@dataclass(frozen=True)
class StageSnapshot:
    """The current stage as the engine judges it (and the dashboard shows it)."""

    counts: list[StateCount]
    since_finished_s: float | None           # since the stage's last device finished; None while any is pending
    # read only once every device of the stage finished (the evidence behind the gates):
    executions: list[Execution] | None
    classes: dict[str, str | None]           # device -> hardware class
    observations: dict[str, ClassObservation]


def stage_snapshot(session: Session, rollout: Rollout, now: datetime) -> StageSnapshot:
    # Counts, not a row per device: this runs every pass, and a stage may hold the whole fleet.
    rows = session.execute(
        sa.select(Device.hardware_class, Execution.state, sa.func.count(), sa.func.max(Execution.updated_at))
        .join(Device, Device.id == Execution.device_id)
        .where(Execution.rollout_id == rollout.id, Execution.stage == rollout.stage)
        .group_by(Device.hardware_class, Execution.state)
    ).all()
    counts = [StateCount(cls or "unknown", state, n) for cls, state, n, _ in rows]
    finished = max((updated for *_, updated in rows), default=None)
    if not all(count.state.terminal for count in counts):
        return StageSnapshot(counts, None, None, {}, {})
    since = (now - finished).total_seconds() if finished else None
    executions, classes = _members(session, rollout)
    return StageSnapshot(counts, since, executions, classes, _observe(session, rollout, executions, classes))


def _members(session: Session, rollout: Rollout) -> tuple[list[Execution], dict[str, str | None]]:
    """The current stage's executions, and each device's hardware class."""
    rows = session.execute(
        _executions(rollout.id, rollout.stage).add_columns(Device.hardware_class)
        .join(Device, Device.id == Execution.device_id)
    ).all()
    return [execution for execution, _ in rows], {execution.device_id: cls for execution, cls in rows}


def _expire(session: Session, rollout: Rollout, spec: RolloutSpec, now: datetime, report: PassReport) -> None:
    """Per-device timeouts: retry with doubling backoff while retries last, then TIMED_OUT."""
    overdue = session.scalars(
        _executions(rollout.id).where(Execution.deadline_at.is_not(None), Execution.deadline_at < now)
        .where(Execution.state.in_(HURRIED))
    )
    for execution in overdue:
        execution.deadline_at = None
        if execution.attempt < spec.max_retries:
            execution.attempt += 1
            delay = min(MAX_BACKOFF_S, spec.retry_backoff_s * 2 ** (execution.attempt - 1))
            execution.state, execution.generation = ExecutionState.QUEUED, 0
            execution.next_attempt_at = now + timedelta(seconds=delay)
            execution.detail = (f"no result within {spec.device_timeout_s:.0f}s; "
                                f"retry {execution.attempt}/{spec.max_retries} in {delay:.0f}s")
            report.retried += 1
        else:
            execution.state = ExecutionState.TIMED_OUT
            execution.detail = f"no result within {spec.device_timeout_s:.0f}s after {execution.attempt + 1} attempt(s)"
            report.timed_out += 1


def _add_members(session: Session, rollout: Rollout, spec: RolloutSpec, now: datetime, report: PassReport) -> None:
    """Executions for the current stage's share, plus devices enrolled since the rollout
    began (they get the version the rollout has reached).

    Reading and planning the whole fleet is the costly part of a pass (seconds at ten
    thousand devices, inside the write transaction), so it runs only when the stage or
    the set of enrolled devices changed, and every MEMBERSHIP_RECHECK_S for label changes.
    """
    fleet = session.execute(sa.select(sa.func.count(Device.id), sa.func.max(Device.enrolled_at))).one()
    fingerprint = (rollout.stage, *fleet)
    key = (str(session.get_bind().engine.url), rollout.id)
    checked = _membership_checked.get(key)
    if checked and checked[0] == fingerprint and time.monotonic() - checked[1] < MEMBERSHIP_RECHECK_S:
        return
    _membership_checked[key] = (fingerprint, time.monotonic())
    rows = {r.id: r for r in session.execute(sa.select(*VIEW_COLUMNS, Device.enrolled_at).order_by(Device.id))}
    views = planner.select(spec.selector, [device_view(d, rollout.model) for d in rows.values()])
    started = set(session.scalars(sa.select(Execution.device_id).where(Execution.rollout_id == rollout.id)))
    variants = variant_views(session, rollout.model, rollout.version)
    proof = evidence(session, rollout.model, rollout.version)
    bad = bad_variants(session, rollout.model, rollout.version)
    choices = {d.id: planner.choose_variant(d, variants, proof, bad, spec.min_accuracy) for d in views}
    fit = [d for d in views if choices[d.id].variant is not None]
    members = planner.stage_members(rollout.id, spec, fit, rollout.stage, started)
    joined = [d for d in fit if d.id not in started and rows[d.id].enrolled_at > rollout.created_at]
    # in device id order: each insert takes a key-share lock on its device, as ingest locks them
    for device in sorted({d.id: d for d in members + joined}.values(), key=lambda d: d.id):
        choice = choices[device.id]
        previous = reported_active(rows[device.id].reported, rollout.model)
        session.add(Execution(
            rollout_id=rollout.id, device_id=device.id, stage=rollout.stage, variant=choice.variant,
            reason=choice.reason, state=ExecutionState.QUEUED, previous=previous, created_at=now,
            detail="" if device.online else "device offline; pending until it connects",
        ))
        report.created += 1
    session.flush()


# (database, rollout id) -> (fleet fingerprint, when its membership was last planned); a hint only:
# a restarted controller or another replica simply plans once more.
_membership_checked: dict[tuple[str, str], tuple[tuple, float]] = {}
MEMBERSHIP_RECHECK_S = 30.0
PUBLISH_BATCH = 200  # desired states committed per transaction


def _observe(
    session: Session, rollout: Rollout, executions: list[Execution], classes: dict[str, str | None]
) -> dict[str, ClassObservation]:
    """Evidence of the stage per hardware class: benchmarks of the new and the replaced
    version, inference counters since activation, sampled top-1 confidence."""
    observations = {}
    by_cls: dict[str, list[Execution]] = defaultdict(list)
    for execution in executions:
        by_cls[classes.get(execution.device_id) or "unknown"].append(execution)
    for cls, group in by_cls.items():
        devices = [e.device_id for e in group]
        previous = Counter(
            (p.get("model"), p.get("version")) for p in (e.previous for e in group) if p and p.get("version")
        ).most_common(1)
        prev_model, prev_version = previous[0][0] if previous else (None, None)
        measured = session.execute(sa.select(Benchmark.p99_ms, Benchmark.baseline_p99_ms).where(
            Benchmark.model == rollout.model, Benchmark.version == rollout.version, Benchmark.hardware_class == cls,
            Benchmark.device_id.in_(devices), Benchmark.ts >= rollout.created_at)).all()
        p99_new = [new for new, _ in measured]
        baselines = [baseline for _, baseline in measured if baseline is not None]
        p99_prev: list[float]
        if measured and len(baselines) == len(measured):
            p99_prev = baselines  # same devices, same moments: like with like
        elif prev_version is None:
            p99_prev = []
        else:
            p99_prev = list(session.scalars(sa.select(Benchmark.p99_ms).where(
                Benchmark.model == prev_model, Benchmark.version == prev_version, Benchmark.hardware_class == cls)))
        requests, errors = _counters(session, rollout.model, rollout.version,
                                     [e for e in group if e.state is ExecutionState.SUCCEEDED])
        observations[cls] = ClassObservation(
            p99_new=p99_new, p99_previous=p99_prev, requests=requests, errors=errors,
            confidence_new=_confidence(session, rollout.model, rollout.version, cls, rollout.created_at),
            confidence_previous=(0.0, 0) if prev_version is None
            else _confidence(session, prev_model, prev_version, cls, None),
        )
    return observations


def _counters(session: Session, model: str, version: str, executions: list[Execution]) -> tuple[int, int]:
    """Requests and model failures of ``model`` ``version`` on these devices since the rollout
    asked them (each execution's creation).

    ``counters`` telemetry (agent ModelRuntime.active_counters) is cumulative per segment:
    one load of one model, named by (boot, ``since``). A segment that began inside the
    window counts whole; one that began before it counts only its growth within it.
    Rows of other models or versions are ignored, so the old version never dilutes the new.
    """
    if not executions:
        return 0, 0
    window = {e.device_id: e.created_at for e in executions}
    rows = session.execute(
        sa.select(TelemetryRecord.device_id, TelemetryRecord.boot, TelemetryRecord.ts, TelemetryRecord.data).where(
            TelemetryRecord.device_id.in_(sorted(window)), TelemetryRecord.kind == TelemetryKind.COUNTERS.value,
            TelemetryRecord.ts >= min(window.values()),
        ).order_by(TelemetryRecord.ts, TelemetryRecord.id)
    )
    segments: dict[tuple[str, int, float], list[ModelCounters]] = defaultdict(list)
    for device, boot, ts, data in rows:
        try:
            counters = ModelCounters.from_dict(data)
        except ProtocolError:  # stored by an older release in another shape: one row must not stall a rollout
            continue
        if ts >= window[device] and (counters.model.model, counters.model.version) == (model, version):
            segments[(device, boot, counters.since)].append(counters)
    requests = errors = 0
    for (device, _, since), seen in segments.items():
        first, last = seen[0], seen[-1]
        began_inside = since >= window[device].timestamp()
        requests += max(0, last.requests - (0 if began_inside else first.requests))
        errors += max(0, last.failures - (0 if began_inside else first.failures))
    return requests, errors


def _confidence(
    session: Session, model: str | None, version: str, cls: str, since: datetime | None
) -> tuple[float, int]:
    query = sa.select(Sample.top1_mean, Sample.count).where(
        Sample.model == model, Sample.version == version, Sample.hardware_class == cls,
        Sample.top1_mean.is_not(None))
    if since is not None:
        query = query.where(Sample.ts >= since)
    rows = [(mean, count) for mean, count in session.execute(query) if count and mean is not None]
    total = sum(count for _, count in rows)
    return (sum(mean * count for mean, count in rows) / total, total) if total else (0.0, 0)


def _mark_bad(
    session: Session, rollout: Rollout, executions: list[Execution], classes: dict[str, str | None],
    failed: list[str], reason: str, now: datetime,
) -> None:
    for execution in executions:
        cls = classes.get(execution.device_id) or "unknown"
        if cls in failed and execution.variant:
            session.merge(BadVariant(
                model=rollout.model, version=rollout.version, variant=execution.variant, hardware_class=cls,
                reason=f"rollout {rollout.id}: {reason}"[:2000], created_at=now,
            ))


# --- publishing: what the database says is owed ------------------------------------------
#
# A transactional outbox: a pass commits each desired state first (the device's
# ``desired`` and ``desired_generation``), publishes after the commit, and then records
# the broker's acknowledgement as ``desired_sent_generation``. No transaction waits on
# the broker, so a slow PUBACK never holds up the MQTT ingest; a desired state committed
# but not acknowledged (the broker was away, or the controller died in between) is
# published again by the next pass, with the same generation, which agents ignore.


def _owed(db: Database, rollout_id: str, now: datetime) -> list[int]:
    """Executions whose device still needs a desired state from this rollout (each is
    checked again under lock before it is sent)."""
    with db.reading() as session:
        rollout = session.get(Rollout, rollout_id)
        if rollout is None:
            return []
        if rollout.state is RolloutState.RUNNING:  # installs: decided by the execution alone
            return list(session.scalars(
                sa.select(Execution.id).where(
                    Execution.rollout_id == rollout_id, Execution.state == ExecutionState.QUEUED,
                    Execution.generation == 0,
                    sa.or_(Execution.next_attempt_at.is_(None), Execution.next_attempt_at <= now),
                ).order_by(Execution.id)
            ))
        owed = []
        for execution, device in session.execute(
            _executions(rollout_id).add_columns(Device).join(Device, Device.id == Execution.device_id)
        ):
            if _desired_for(rollout, execution, device, now) is not None:
                owed.append(execution.id)
        return owed


def _desired_for(rollout: Rollout, execution: Execution, device: Device, now: datetime) -> str | None:
    """Which desired state (install / rollback / hold) is owed, or None.

    Install: the rollout runs and the execution was never sent (or is due for a retry).
    Events name the rollout as their deployment; (rollout, device) is the execution.
    Rollback / hold: the rollout failed, was rolled back or aborted, and the device's
    desired entry for the rollout's model is still this execution's install of the new version
    (the entries of its other models belong to their own rollouts).
    """
    if rollout.state is RolloutState.RUNNING:
        due = execution.next_attempt_at is None or execution.next_attempt_at <= now
        if execution.state is ExecutionState.QUEUED and execution.generation == 0 and due:
            return "install"
        return None
    desired = stored_entry(device.desired, rollout.model) or {}
    still_ours = (desired.get("deployment") == rollout.id and desired.get("action") == Action.INSTALL.value
                  and desired.get("version") == rollout.version)
    if not still_ours:
        return None
    if rollout.state in states.ROLLING_BACK:
        return "rollback" if execution.state is ExecutionState.SUCCEEDED else "hold"
    if rollout.state is RolloutState.ABORTED and execution.state is not ExecutionState.SUCCEEDED:
        return "hold"
    return None


def _publish_batch(
    db: Database, publisher: Publisher, execution_ids: list[int], now: datetime, report: PassReport
) -> None:
    """Up to PUBLISH_BATCH devices: commit their desired states in one transaction (one per
    device made a 10,000-device fleet wait on fsyncs), then publish, then confirm.

    Each changes only the entry of the rollout's model in the device's desired set."""
    batch: list[DesiredSet] = []
    try:
        with db.unit_of_work() as session:
            # Devices before executions, each in id order: the order ingest locks them in.
            device_ids = set(session.scalars(sa.select(Execution.device_id).where(Execution.id.in_(execution_ids))))
            devices = {d.id: d for d in session.scalars(
                sa.select(Device).where(Device.id.in_(sorted(device_ids))).order_by(Device.id).with_for_update()
            )}
            executions = list(session.scalars(  # as of the lock: another pass may have got here first
                sa.select(Execution).where(Execution.id.in_(execution_ids)).order_by(Execution.id).with_for_update()
            ))
            if not executions:
                return
            rollout = session.get_one(Rollout, executions[0].rollout_id)
            spec = RolloutSpec.from_stored(rollout.spec)
            for execution in executions:
                device = devices[execution.device_id]
                kind = _desired_for(rollout, execution, device, now)
                if kind is None:
                    continue
                generation = device.desired_generation + 1
                try:
                    desired = _with_entry(device, _build(kind, rollout, spec, execution, device.id, generation))
                except InvalidInput as e:  # this device only (one model too many): the batch goes on
                    _refuse(execution, str(e))
                    continue
                device.desired, device.desired_generation = desired.to_dict(), generation
                if kind == "install":
                    execution.generation = generation
                    execution.deadline_at = now + timedelta(seconds=spec.device_timeout_s)
                    execution.next_attempt_at = None
                elif kind == "rollback":  # the device's ROLLED_BACK event (a newer generation) settles it
                    execution.detail = f"cloud rollback requested (generation {generation})"
                elif not execution.state.terminal:
                    execution.state = ExecutionState.CANCELED
                    execution.detail = f"rollout {rollout.state.value.lower()}"
                batch.append(desired)
    except ControllerError as e:
        log.warning("executions %s..%s: not decided: %s", execution_ids[0], execution_ids[-1], e)
        report.errors.append(f"executions {execution_ids[0]}..{execution_ids[-1]}: {e}")
        return
    report.published += _send(db, publisher, batch, report)


def _send(db: Database, publisher: Publisher, batch: list[DesiredSet], report: PassReport) -> int:
    """Publish committed desired states and record the broker's acknowledgement; what is not
    acknowledged stays unsent in the database for ``publish_unsent``."""
    if not batch:
        return 0
    try:
        publisher.publish_desired(*batch)
        with db.unit_of_work() as session:
            devices = cast(sa.Table, Device.__table__)  # Core: one executemany, no ORM bulk semantics
            session.execute(
                sa.update(devices)
                .where(devices.c.id == sa.bindparam("b_device"),
                       devices.c.desired_generation == sa.bindparam("b_generation"))
                .values(desired_sent_generation=sa.bindparam("b_generation")),
                # in device id order: the order ingest locks devices in
                [{"b_device": d.device, "b_generation": d.generation} for d in sorted(batch, key=lambda d: d.device)],
            )
    except ControllerError as e:
        log.warning("desired states for %s..%s: publish deferred: %s", batch[0].device, batch[-1].device, e)
        report.errors.append(f"desired states for {batch[0].device}..{batch[-1].device}: {e}")
        return 0
    return len(batch)


def publish_unsent(db: Database, publisher: Publisher, report: PassReport | None = None) -> PassReport:
    """Publish again every committed desired state the broker has not acknowledged."""
    report = report or PassReport()
    with db.reading() as session:
        unsent = stored_desired(session, Device.desired_generation > Device.desired_sent_generation)
    for start in range(0, len(unsent), PUBLISH_BATCH):
        report.published += _send(db, publisher, unsent[start:start + PUBLISH_BATCH], report)
    return report


def _refuse(execution: Execution, reason: str) -> None:
    """An execution whose desired state cannot be built fails with why; one already settled keeps its state."""
    log.warning("execution %s (device %s): %s", execution.id, execution.device_id, reason)
    if not execution.state.terminal:
        execution.state, execution.detail = ExecutionState.FAILED, reason


def _with_entry(device: Device, entry: Desired) -> DesiredSet:
    """The device's desired set with ``entry`` in place of its model's (the other models' entries kept)."""
    desired = desired_set(device).with_entry(entry)
    try:
        desired.validate()  # e.g. one model more than a device serves
    except ProtocolError as e:
        raise InvalidInput(f"cannot build desired state for {device.id}: {e}") from e
    return desired


def _build(
    kind: str, rollout: Rollout, spec: RolloutSpec, execution: Execution, device: str, generation: int
) -> Desired:
    try:
        if kind == "install":
            return Desired(
                device=device, generation=generation, action=Action.INSTALL, deployment=rollout.id,
                model=rollout.model, version=rollout.version, variant=execution.variant,
                target=target_path(rollout.model, rollout.version, execution.variant or ""),
                sampling=spec.sampling, gate=spec.device_gate, window=spec.window,
            )
        if kind == "rollback":
            return Desired(device=device, generation=generation, action=Action.ROLLBACK,
                           deployment=rollout.id, model=rollout.model)
        # hold: stay on what ran before; no deployment, so the agent's report does not touch this execution
        previous = ModelRef.from_dict(execution.previous) if execution.previous else None
        if previous is None:
            return Desired(device=device, generation=generation, action=Action.NONE, model=rollout.model)
        return Desired(
            device=device, generation=generation, action=Action.INSTALL, model=previous.model,
            version=previous.version, variant=previous.variant,
            target=target_path(previous.model, previous.version, previous.variant),
        )
    except ProtocolError as e:
        raise InvalidInput(f"cannot build desired state for {device}: {e}") from e

