"""The rollout planner: pure decisions, no I/O.

Given a spec and plain views of devices, variants, evidence and stage
observations, it decides stage membership, the variant per device (and why),
the gate verdicts of a stage, and the next rollout state (the one transition
table). The engine reads the database, calls these, and writes the results.
"""
from __future__ import annotations

import enum
import hashlib
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from edgefleet.common.hardware import HardwareProfile, Requirements
from edgefleet.common.protocol import P99_NOISE_FLOOR_MS as NOISE_FLOOR_MS
from edgefleet.common.protocol import ExecutionState

from ..accuracy import TITLES, task_metric
from .selector import Selector
from .spec import RolloutSpec, percent
from .states import Verdict

# Device-set terminal states that count against the new version (TIMED_OUT: it never proved healthy).
FAILURE_STATES = frozenset(
    {ExecutionState.FAILED, ExecutionState.ROLLED_BACK, ExecutionState.REJECTED, ExecutionState.TIMED_OUT}
)
# Fewer sampled rows than this on either side: the mean top-1 is noise, not a shift (NO_DATA;
# while the new version's samples are still short of it, the stage waits for them after the bake).
MIN_CONFIDENCE_SAMPLES = 20


# --- inputs ------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceView:
    id: str
    labels: Mapping[str, str] = field(default_factory=dict)
    hardware: Mapping[str, Any] = field(default_factory=dict)   # HardwareProfile.to_dict()
    hardware_class: str = "unknown"
    online: bool = False
    model: str | None = None      # what it runs now (reported)
    version: str | None = None
    variant: str | None = None

    @property
    def profile(self) -> HardwareProfile:
        return HardwareProfile.from_dict(dict(self.hardware) or {"arch": "unknown"})


@dataclass(frozen=True)
class VariantView:
    """One signed variant of the version being rolled out (a TUF target)."""

    variant: str
    target: str
    requirements: Mapping[str, Any] = field(default_factory=dict)
    preference: int = 0
    accuracy: Mapping[str, Any] = field(default_factory=dict)

    @property
    def within_accuracy_bound(self) -> bool:
        """The bundle records the drop and, when it set one, the bound it was built against."""
        drop, bound = self.accuracy.get("top1_drop"), self.accuracy.get("max_top1_drop")
        if self.accuracy.get("within_bound") is False:
            return False
        return drop is None or bound is None or float(drop) <= float(bound)

    @property
    def task_accuracy(self) -> tuple[str, float] | None:
        """(metric, value) the build measured on its held-out set; None if it had no truth."""
        return task_metric(self.accuracy)

    def below(self, floor: float | None) -> str | None:
        """Why this variant is under the accuracy floor, or None when it is not (or there is none)."""
        if floor is None:
            return None
        measured = self.task_accuracy
        if measured is None:
            return f"{self.variant}: accuracy unknown (built without a labelled --eval set), floor {floor:.4g}"
        metric, value = measured
        if value >= floor - 1e-9:
            return None
        return f"{self.variant}: {TITLES[metric]} {value:.4g} below the floor {floor:.4g}"


@dataclass(frozen=True)
class VariantChoice:
    device: str
    hardware_class: str
    variant: str | None     # None: no variant fits
    target: str | None
    reason: str


# --- selection and stage membership -------------------------------------------


def select(selector: str, devices: Iterable[DeviceView]) -> list[DeviceView]:
    parsed = Selector.parse(selector)
    return [d for d in devices if parsed.matches(d.labels, {**d.hardware, "hardware_class": d.hardware_class})]


def stable_rank(rollout_id: str, device_id: str) -> str:
    """A device's place in a rollout: stable across restarts, different per rollout."""
    return hashlib.sha256(f"{rollout_id}\0{device_id}".encode()).hexdigest()


def spread_order(rollout_id: str, devices: Sequence[DeviceView]) -> list[DeviceView]:
    """Devices of one hardware class in rollout order, alternating between label groups
    so that early stages see every site/environment, not the first one hashed."""
    groups: dict[tuple, list[DeviceView]] = defaultdict(list)
    for device in devices:
        groups[tuple(sorted(device.labels.items()))].append(device)
    queues = [sorted(g, key=lambda d: stable_rank(rollout_id, d.id)) for g in groups.values()]
    queues.sort(key=lambda q: stable_rank(rollout_id, q[0].id))
    ordered: list[DeviceView] = []
    while any(queues):
        for queue in queues:
            if queue:
                ordered.append(queue.pop(0))
    return ordered


def stage_quota(total: int, stages: Sequence[float], min_per_stage: int) -> list[int]:
    """Cumulative devices of one class through each stage: the stage share, but at least
    ``min_per_stage`` more than the previous stage while devices remain."""
    quota, done = [], 0
    for share in stages:
        done = min(total, max(math.ceil(share * total - 1e-9), done + min_per_stage))
        quota.append(done)
    quota[-1] = total
    return quota


def by_class(devices: Iterable[DeviceView]) -> dict[str, list[DeviceView]]:
    classes: dict[str, list[DeviceView]] = defaultdict(list)
    for device in devices:
        classes[device.hardware_class].append(device)
    return dict(sorted(classes.items()))


def stage_members(
    rollout_id: str, spec: RolloutSpec, devices: Sequence[DeviceView], stage: int, started: Iterable[str] = ()
) -> list[DeviceView]:
    """Devices (not yet started) that join through ``stage``: per class, in rollout order,
    until the class's cumulative quota counts the devices already started too."""
    started = set(started)
    members: list[DeviceView] = []
    for devices_of_class in by_class(devices).values():
        quota = stage_quota(len(devices_of_class), spec.stages, spec.min_devices_per_stage)[stage]
        have = sum(1 for d in devices_of_class if d.id in started)
        for device in spread_order(rollout_id, devices_of_class):
            if have >= quota:
                break
            if device.id not in started:
                members.append(device)
                have += 1
    return members


# --- variant choice --------------------------------------------------------------


@dataclass(frozen=True)
class Evidence:
    """Measured on-device latency of one variant on one hardware class."""

    hardware_class: str
    variant: str
    p99_ms: float
    devices: int = 1
    p50_ms: float | None = None


def choose_variant(
    device: DeviceView,
    variants: Sequence[VariantView],
    evidence: Iterable[Evidence] = (),
    bad: Iterable[tuple[str, str]] = (),
    min_accuracy: float | None = None,
) -> VariantChoice:
    """Among the variants the device can run (requirements met, within the accuracy bound,
    at or above the rollout's accuracy floor, not marked bad for its class), the lowest
    measured p99 on its class; without evidence, the declared preference order."""
    bad = set(bad)
    profile = device.profile
    cls = device.hardware_class
    fitting, refused = [], []
    for v in sorted(variants, key=lambda v: (v.preference, v.variant)):
        unmet = Requirements.from_dict(dict(v.requirements)).unmet(profile)
        if (v.variant, cls) in bad:
            refused.append(f"{v.variant}: marked bad on {cls}")
        elif unmet:
            refused.append(f"{v.variant}: {'; '.join(unmet)}")
        elif not v.within_accuracy_bound:
            refused.append(f"{v.variant}: outside the accuracy bound")
        elif (under := v.below(min_accuracy)) is not None:
            refused.append(under)
        else:
            fitting.append(v)
    if not fitting:
        why = " | ".join(refused) if refused else "the version has no variants"
        return VariantChoice(device.id, cls, None, None, f"no variant fits: {why}")
    measured = {e.variant: e for e in evidence if e.hardware_class == cls}
    timed = sorted((measured[v.variant].p99_ms, v.preference, v.variant, v) for v in fitting if v.variant in measured)
    # what the floor (or a bound) ruled out is part of the explanation
    skipped = f"; not {' | '.join(refused)}" if refused and min_accuracy is not None else ""
    if timed:
        best = timed[0][3]
        others = ", ".join(f"{name} {p99:.3g} ms" for p99, _, name, _ in timed[1:])
        floor = "" if min_accuracy is None else f" at or above the accuracy floor {min_accuracy:.4g}"
        reason = (f"lowest measured p99 on {cls}{floor}: {timed[0][0]:.3g} ms over "
                  f"{measured[best.variant].devices} device(s)")
        reason += (f" (vs {others})" if others else "") + skipped
        return VariantChoice(device.id, cls, best.variant, best.target, reason)
    best = fitting[0]
    rest = ", ".join(v.variant for v in fitting[1:])
    reason = f"no evidence on {cls} yet; declared preference {best.preference}" + (f" (before {rest})" if rest else "")
    return VariantChoice(device.id, cls, best.variant, best.target, reason + skipped)


@dataclass(frozen=True)
class StagePlan:
    stage: int
    share: float
    choices: list[VariantChoice]


@dataclass(frozen=True)
class Plan:
    rollout_id: str
    stages: list[StagePlan]
    unfit: list[VariantChoice]       # selected devices no variant fits

    @property
    def device_count(self) -> int:
        return sum(len(s.choices) for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        def choice(c: VariantChoice) -> dict[str, Any]:
            return {"device": c.device, "hardware_class": c.hardware_class, "variant": c.variant, "reason": c.reason}

        return {
            "rollout": self.rollout_id,
            "stages": [
                {"stage": s.stage, "share": s.share, "devices": [choice(c) for c in s.choices]} for s in self.stages
            ],
            "unfit": [choice(c) for c in self.unfit],
        }


def plan(
    rollout_id: str,
    spec: RolloutSpec,
    devices: Sequence[DeviceView],
    variants: Sequence[VariantView],
    evidence: Iterable[Evidence] = (),
    bad: Iterable[tuple[str, str]] = (),
) -> Plan:
    """The whole rollout as it would go now (what --dry-run prints)."""
    evidence, bad = list(evidence), set(bad)
    choices = {d.id: choose_variant(d, variants, evidence, bad, spec.min_accuracy) for d in devices}
    fit = [d for d in devices if choices[d.id].variant is not None]
    started: set[str] = set()
    stages = []
    for index, share in enumerate(spec.stages):
        members = stage_members(rollout_id, spec, fit, index, started)
        started.update(d.id for d in members)
        stages.append(StagePlan(index, share, [choices[d.id] for d in members]))
    unfit = [choices[d.id] for d in devices if choices[d.id].variant is None]
    return Plan(rollout_id, stages, unfit)


# --- gates ---------------------------------------------------------------------


@dataclass(frozen=True)
class StateCount:
    """How many of a stage's executions on one hardware class are in one state: the gates and
    the stage's decision need no more, so a pass reads counts, not a row per device."""

    hardware_class: str
    state: ExecutionState
    count: int


@dataclass(frozen=True)
class ClassObservation:
    """What one hardware class showed during a stage."""

    p99_new: Sequence[float] = ()         # on-device benchmark p99 (ms) of the new version
    p99_previous: Sequence[float] = ()    # same class, the version it replaces
    requests: int = 0                     # inference counters of the new version
    errors: int = 0
    confidence_new: tuple[float, int] = (0.0, 0)       # (mean top-1 confidence, samples)
    confidence_previous: tuple[float, int] = (0.0, 0)


@dataclass(frozen=True)
class GateVerdict:
    gate: str
    hardware_class: str | None
    value: float | None
    threshold: float
    verdict: Verdict
    awaiting: str = ""   # NO_DATA with its evidence still arriving (what is short): the stage waits
    samples: int = 0     # the evidence behind the value: devices, benchmarks, requests or sampled rows

    @property
    def passed(self) -> bool:
        return self.verdict is not Verdict.FAIL

    @property
    def where(self) -> str:
        return f"{self.gate} on {self.hardware_class or 'all'}"

    def describe(self) -> str:
        if self.value is not None:
            value = f"{self.value:.3g}" + (f" ({self.awaiting})" if self.awaiting else "")
        else:
            value = f"no data ({self.awaiting})" if self.awaiting else "no data"
        return f"{self.where}: {value} (limit {self.threshold:.3g}) {self.verdict.value}"


class StageDecision(str, enum.Enum):
    WAIT = "wait"
    PASS = "pass"  # noqa: S105 (a verdict, not a password)
    FAIL = "fail"


@dataclass(frozen=True)
class StageOutcome:
    decision: StageDecision
    verdicts: list[GateVerdict]
    reason: str


def _judge(
    gate: str, cls: str, value: float | None, threshold: float, samples: int, awaiting: str = ""
) -> GateVerdict:
    if value is None:
        return GateVerdict(gate, cls, None, threshold, Verdict.NO_DATA, awaiting, samples)
    return GateVerdict(gate, cls, value, threshold, Verdict.PASS if value <= threshold else Verdict.FAIL,
                       samples=samples)


def _p99_verdict(cls: str, seen: ClassObservation, threshold: float) -> GateVerdict:
    """The p99 regression as a ratio; one within the agent's noise floor passes however
    large the ratio, since a 30 us model doubles its p99 on a scheduler hiccup."""
    samples = len(seen.p99_new)
    if not (seen.p99_new and seen.p99_previous):
        return _judge("p99_regression", cls, None, threshold, samples)
    new, previous = statistics.median(seen.p99_new), statistics.median(seen.p99_previous)
    verdict = _judge("p99_regression", cls, new / previous - 1, threshold, samples)
    if new - previous <= NOISE_FLOOR_MS:
        return replace(verdict, verdict=Verdict.PASS)
    return verdict


def _required(verdict: GateVerdict, min_samples: int) -> GateVerdict:
    """With ``min_samples``, a gate passes only on a value measured over that many samples;
    short of them it waits (NO_DATA, awaiting). A failing value still fails at once."""
    if not min_samples or verdict.verdict is Verdict.FAIL:
        return verdict
    if verdict.value is not None and verdict.samples >= min_samples:
        return verdict
    short = verdict.awaiting or f"{verdict.samples} of {min_samples} samples"
    return replace(verdict, verdict=Verdict.NO_DATA, awaiting=short)


def gate_verdicts(
    spec: RolloutSpec, counts: Sequence[StateCount], observations: Mapping[str, ClassObservation]
) -> list[GateVerdict]:
    """Every gate per hardware class present in the stage. A gate without data is NO_DATA:
    shown, not failing, when no evidence is coming (no previous version to compare with, no
    traffic, sampling off, every device cancelled); ``awaiting`` when it is still arriving
    (the new version's samples short of MIN_CONFIDENCE_SAMPLES), and then the stage waits."""
    verdicts = []
    classes = sorted({e.hardware_class for e in counts})
    for cls in classes:
        mine = [e for e in counts if e.hardware_class == cls and e.state is not ExecutionState.CANCELED]
        total = sum(e.count for e in mine)
        failed = sum(e.count for e in mine if e.state in FAILURE_STATES)
        seen = observations.get(cls, ClassObservation())
        error_rate = seen.errors / seen.requests if seen.requests else None
        verdicts += [_required(v, spec.min_samples) for v in (
            _judge("failure_rate", cls, failed / total if total else None, spec.max_failure_rate, total),
            _p99_verdict(cls, seen, spec.max_p99_regression),
            _judge("error_rate", cls, error_rate, spec.max_error_rate, seen.requests),
            _confidence_verdict(cls, seen, spec.max_confidence_shift),
        )]
    return verdicts


def _confidence_verdict(cls: str, seen: ClassObservation, threshold: float) -> GateVerdict:
    (new_mean, new_n), (previous_mean, previous_n) = seen.confidence_new, seen.confidence_previous
    if min(new_n, previous_n) >= MIN_CONFIDENCE_SAMPLES:
        return _judge("confidence_shift", cls, abs(new_mean - previous_mean), threshold, new_n)
    # the previous version's figure is final; the new one's grows while its devices sample
    arriving = previous_n >= MIN_CONFIDENCE_SAMPLES and new_n > 0
    awaiting = f"{new_n} of {MIN_CONFIDENCE_SAMPLES} samples" if arriving else ""
    return _judge("confidence_shift", cls, None, threshold, new_n, awaiting)


IN_FLIGHT = frozenset({
    ExecutionState.DOWNLOADING, ExecutionState.VERIFYING, ExecutionState.STAGED, ExecutionState.ACTIVATING,
})


def decide_stage(
    spec: RolloutSpec,
    counts: Sequence[StateCount],
    observations: Mapping[str, ClassObservation],
    seconds_since_finished: float | None,
) -> StageOutcome:
    """PASS once every device of the stage is terminal, the gates hold and the bake time
    passed; FAIL as soon as a gate fails (during the bake, or when the failure rate is
    beyond the limit before every device finished); else WAIT. After the bake a gate
    whose evidence is still arriving (or, with ``min_samples``, any gate short of that many
    samples) holds the stage until :func:`stage_deadline_s`, then fails it (``rollout
    promote`` goes on without it); without ``min_samples`` a gate no evidence can reach
    passes as NO_DATA, named in the reason.

    An early failure still waits for devices in the middle of an update: they are safe
    behind their own on-device gate, and their outcome completes the verdict for every
    hardware class (and which variants get marked bad). Devices not yet started are
    cancelled."""
    pending = sum(e.count for e in counts if not e.state.terminal)
    if pending:
        early = [
            v for v in gate_verdicts(spec, counts, {})
            if v.gate == "failure_rate" and v.verdict is Verdict.FAIL
        ]
        in_flight = any(e.count for e in counts if e.state in IN_FLIGHT)
        if early and not in_flight:
            return StageOutcome(StageDecision.FAIL, early, "; ".join(v.describe() for v in early))
        return StageOutcome(StageDecision.WAIT, [], f"{pending} device(s) still updating")
    verdicts = gate_verdicts(spec, counts, observations)
    failed = [v for v in verdicts if not v.passed]
    if failed:  # bad news does not wait for the bake time
        return StageOutcome(StageDecision.FAIL, verdicts, "; ".join(v.describe() for v in failed))
    if seconds_since_finished is not None and seconds_since_finished < spec.bake_s:
        left = spec.bake_s - seconds_since_finished
        return StageOutcome(StageDecision.WAIT, [], f"baking, {left:.0f}s left")
    awaiting = [v.describe() for v in verdicts if v.awaiting]
    if awaiting and seconds_since_finished is not None and seconds_since_finished >= stage_deadline_s(spec):
        return StageOutcome(StageDecision.FAIL, verdicts,
                            f"no data by the stage deadline ({stage_deadline_s(spec):.0f}s after its devices "
                            f"finished): {'; '.join(awaiting)}")
    if awaiting:
        return StageOutcome(StageDecision.WAIT, verdicts, f"waiting for evidence: {'; '.join(awaiting)}")
    no_data = [v.where for v in verdicts if v.verdict is Verdict.NO_DATA]
    reason = "all gates hold" + (f"; no data: {', '.join(no_data)}" if no_data else "")
    return StageOutcome(StageDecision.PASS, verdicts, reason)


def stage_deadline_s(spec: RolloutSpec) -> float:
    """How long after its devices finished a stage may wait for evidence: the bake time, then
    as long again as a device may take (``device_timeout``); then a gate still short fails it."""
    return spec.bake_s + spec.device_timeout_s


def failed_classes(verdicts: Iterable[GateVerdict]) -> list[str]:
    return sorted({v.hardware_class for v in verdicts if not v.passed and v.hardware_class})


def stage_label(spec: RolloutSpec, stage: int) -> str:
    return f"{stage + 1}/{len(spec.stages)} ({percent(spec.stages[stage])})"
