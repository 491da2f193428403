"""The pure planner: stage spreading, variant choice, gate verdicts."""
from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from edgefleet.common.protocol import ExecutionState as E
from edgefleet.controller.rollout import planner
from edgefleet.controller.rollout.planner import (
    ClassObservation,
    DeviceView,
    Evidence,
    StageDecision,
    StateCount,
    VariantView,
)
from edgefleet.controller.rollout.states import Verdict
from tests.rollout_fleet import RPI, X86, spec_for

CUDA: dict[str, Any] = {**X86, "providers": ["CPUExecutionProvider", "CUDAExecutionProvider"], "hardware_class": "x86_64-cuda"}
VARIANTS = [
    VariantView("cuda-fp16", "m/1/cuda-fp16.onnx", {"providers": ["CUDAExecutionProvider"]}, 0),
    VariantView("cpu-int8", "m/1/cpu-int8.onnx", {"arch": ["x86_64"], "cpu_features": ["avx2"]}, 1),
    VariantView("cpu-fp32", "m/1/cpu-fp32.onnx", {}, 2),
]


def fleet(per_class: int = 20) -> list[DeviceView]:
    devices = []
    for cls, hardware in (("x86_64", X86), ("rpi-4", RPI), ("x86_64-cuda", CUDA)):
        for i in range(per_class):
            site = ("berlin", "paris", "tokyo", "oslo")[i % 4]
            devices.append(DeviceView(f"{cls}-{i}", {"site": site}, hardware, cls, online=True))
    return devices


def test_stage_quota():
    assert planner.stage_quota(100, (0.05, 0.25, 1.0), 1) == [5, 25, 100]
    assert planner.stage_quota(10, (0.05, 0.25, 1.0), 1) == [1, 3, 10]
    assert planner.stage_quota(10, (0.05, 0.25, 1.0), 3) == [3, 6, 10]
    assert planner.stage_quota(2, (0.05, 0.25, 1.0), 1) == [1, 2, 2]


def test_stages_are_spread_across_classes_and_label_groups():
    devices = [*fleet(20), DeviceView("lonely-rpi5", {"site": "berlin"}, {**RPI, "device_model": "Raspberry Pi 5"},
                                      "rpi-5", online=False)]
    plan = planner.plan("r1", spec_for(stages=(0.05, 0.25, 1.0), min_devices_per_stage=2), devices, VARIANTS)
    first = plan.stages[0].choices
    classes = Counter(c.hardware_class for c in first)
    assert classes == {"x86_64": 2, "rpi-4": 2, "x86_64-cuda": 2, "rpi-5": 1}  # every class, even a lone one
    by_device = {d.id: d for d in devices}
    for cls in ("x86_64", "rpi-4"):
        sites = {by_device[c.device].labels["site"] for c in first if c.hardware_class == cls}
        assert len(sites) == 2  # two label groups, not the first one hashed twice
    # cumulative shares, every device exactly once
    sizes = [len(s.choices) for s in plan.stages]
    assert sizes == [7, 9, 45] and plan.device_count == len(devices)
    assert len({c.device for s in plan.stages for c in s.choices}) == len(devices)


def test_membership_is_deterministic_per_rollout_and_stable_for_started_devices():
    devices = fleet(20)
    spec = spec_for(stages=(0.1, 1.0))
    a = planner.stage_members("r1", spec, devices, 0)
    assert [d.id for d in a] == [d.id for d in planner.stage_members("r1", spec, list(reversed(devices)), 0)]
    assert {d.id for d in a} != {d.id for d in planner.stage_members("r2", spec, devices, 0)}
    # once stage 0 started, recomputing it adds nobody; stage 1 adds exactly the rest
    started = {d.id for d in a}
    assert planner.stage_members("r1", spec, devices, 0, started) == []
    rest = planner.stage_members("r1", spec, devices, 1, started)
    assert started.isdisjoint(d.id for d in rest) and len(rest) + len(started) == len(devices)


def test_variant_by_preference_without_evidence():
    x86, rpi, cuda = (DeviceView("d", {}, hw, hw["hardware_class"]) for hw in (X86, RPI, CUDA))
    assert planner.choose_variant(cuda, VARIANTS).variant == "cuda-fp16"
    choice = planner.choose_variant(x86, VARIANTS)
    assert choice.variant == "cpu-int8" and "no evidence on x86_64 yet; declared preference 1" in choice.reason
    assert planner.choose_variant(rpi, VARIANTS).variant == "cpu-fp32"
    assert choice.target == "m/1/cpu-int8.onnx"


def test_variant_by_evidence_from_the_same_class():
    cuda = DeviceView("d", {}, CUDA, "x86_64-cuda")
    proof = [
        Evidence("x86_64-cuda", "cuda-fp16", 4.0, 3),
        Evidence("x86_64-cuda", "cpu-int8", 1.5, 2),
        Evidence("x86_64", "cpu-fp32", 0.1, 9),   # another class: ignored
    ]
    choice = planner.choose_variant(cuda, VARIANTS, proof)
    assert choice.variant == "cpu-int8"
    assert "lowest measured p99 on x86_64-cuda: 1.5 ms over 2 device(s) (vs cuda-fp16 4 ms)" in choice.reason


def test_bad_variant_and_accuracy_bound_are_excluded():
    x86 = DeviceView("d", {}, X86, "x86_64")
    choice = planner.choose_variant(x86, VARIANTS, bad={("cpu-int8", "x86_64")})
    assert choice.variant == "cpu-fp32"
    assert planner.choose_variant(DeviceView("e", {}, RPI, "rpi-4"), VARIANTS, bad={("cpu-int8", "x86_64")}
                                  ).variant == "cpu-fp32"
    loose = [VariantView("cpu-int8", "t", {}, 0, {"top1_drop": 0.05, "max_top1_drop": 0.01}), VARIANTS[2]]
    assert planner.choose_variant(x86, loose).variant == "cpu-fp32"


def test_devices_no_variant_fits_are_listed_with_reasons():
    arm_only = [VariantView("arm-int8", "t", {"arch": ["aarch64"], "cpu_features": ["dotprod"]}, 0)]
    plan = planner.plan("r1", spec_for(), [DeviceView("x", {}, X86, "x86_64"), DeviceView("p", {}, RPI, "rpi-4")],
                        arm_only)
    assert plan.device_count == 0
    reasons = {c.device: c.reason for c in plan.unfit}
    assert "arch x86_64 is not one of aarch64" in reasons["x"] and "CPU lacks dotprod" in reasons["p"]
    assert plan.to_dict()["unfit"][0]["variant"] is None


def execs(cls: str, *states: E) -> list[StateCount]:
    """The stage's counts for these executions on ``cls``, one state each."""
    return [StateCount(cls, state, n) for state, n in Counter(states).items()]


def test_gate_verdicts_per_class():
    spec = spec_for(max_failure_rate=0.2, max_p99_regression=0.15, max_error_rate=0.01, max_confidence_shift=0.1)
    executions = execs("x86_64", E.SUCCEEDED, E.SUCCEEDED, E.SUCCEEDED, E.FAILED) + execs("rpi-4", E.SUCCEEDED)
    seen = {
        "x86_64": ClassObservation(p99_new=[1.0, 1.1, 1.2], p99_previous=[1.0, 1.0], requests=1000, errors=2,
                                   confidence_new=(0.90, 100), confidence_previous=(0.93, 400)),
        "rpi-4": ClassObservation(p99_new=[13.0], p99_previous=[10.0], requests=0,
                                  confidence_new=(0.5, 50), confidence_previous=(0.9, 50)),
    }
    verdicts = {(v.gate, v.hardware_class): v for v in planner.gate_verdicts(spec, executions, seen)}
    assert verdicts[("failure_rate", "x86_64")].value == 0.25 and verdicts[("failure_rate", "x86_64")].verdict is Verdict.FAIL
    assert verdicts[("p99_regression", "x86_64")].value == pytest.approx(0.1)
    assert verdicts[("p99_regression", "x86_64")].verdict is Verdict.PASS
    assert verdicts[("p99_regression", "rpi-4")].value == pytest.approx(0.3)
    assert verdicts[("p99_regression", "rpi-4")].verdict is Verdict.FAIL
    assert verdicts[("error_rate", "x86_64")].value == pytest.approx(0.002)
    assert verdicts[("error_rate", "rpi-4")].verdict is Verdict.NO_DATA
    assert verdicts[("confidence_shift", "x86_64")].verdict is Verdict.PASS
    assert verdicts[("confidence_shift", "rpi-4")].verdict is Verdict.FAIL
    assert planner.failed_classes(verdicts.values()) == ["rpi-4", "x86_64"]


def test_stage_decision():
    spec = spec_for(bake_s=600, max_failure_rate=0.3)
    running = execs("x86_64", E.SUCCEEDED, E.DOWNLOADING, E.QUEUED, E.QUEUED)
    assert planner.decide_stage(spec, running, {}, None).decision is StageDecision.WAIT
    done = execs("x86_64", E.SUCCEEDED, E.SUCCEEDED, E.TIMED_OUT, E.SUCCEEDED)
    baking = planner.decide_stage(spec, done, {}, 100)
    assert baking.decision is StageDecision.WAIT and "baking, 500s left" in baking.reason
    passed = planner.decide_stage(spec, done, {}, 601)
    assert passed.decision is StageDecision.PASS and {v.gate for v in passed.verdicts} >= {"failure_rate"}
    # two of four already failed: 50% > 30% whatever the rest do; the one mid-update finishes first
    mid_update = planner.decide_stage(spec, execs("rpi-4", E.FAILED, E.ROLLED_BACK, E.QUEUED, E.STAGED), {}, None)
    assert mid_update.decision is StageDecision.WAIT
    early = planner.decide_stage(spec, execs("rpi-4", E.FAILED, E.ROLLED_BACK, E.QUEUED, E.SUCCEEDED), {}, None)
    assert early.decision is StageDecision.FAIL and "failure_rate on rpi-4: 0.5 (limit 0.3) FAIL" in early.reason
    slow = planner.decide_stage(spec, execs("rpi-4", E.SUCCEEDED), {"rpi-4": ClassObservation([20.0], [10.0])}, 601)
    assert slow.decision is StageDecision.FAIL and "p99_regression on rpi-4: 1" in slow.reason


def test_no_data_waits_only_while_evidence_is_arriving():
    spec = spec_for(bake_s=600)
    done = execs("x86_64", E.SUCCEEDED, E.SUCCEEDED)

    def after_bake(new_samples: int, previous_samples: int = 400) -> planner.StageOutcome:
        seen = ClassObservation(p99_new=[1.0], p99_previous=[1.0], requests=100,
                                confidence_new=(0.9, new_samples), confidence_previous=(0.9, previous_samples))
        return planner.decide_stage(spec, done, {"x86_64": seen}, 601)

    # the new version is being sampled, short of the floor: the stage holds for the rest
    short = after_bake(12)
    assert short.decision is StageDecision.WAIT
    assert short.reason == "waiting for evidence: confidence_shift on x86_64: no data (12 of 20 samples) (limit 0.2) NO_DATA"
    assert after_bake(20).decision is StageDecision.PASS and after_bake(20).reason == "all gates hold"
    # no evidence can come (sampling off; the previous version's figure too thin): shown, not failing
    for sampling_off in (after_bake(0), after_bake(12, previous_samples=5)):
        assert sampling_off.decision is StageDecision.PASS
        assert sampling_off.reason == "all gates hold; no data: confidence_shift on x86_64"
    # waiting for evidence never hides a gate that already failed
    failing = planner.decide_stage(spec, execs("x86_64", E.SUCCEEDED, E.FAILED), {"x86_64": ClassObservation(
        confidence_new=(0.9, 12), confidence_previous=(0.9, 400))}, 601)
    assert failing.decision is StageDecision.FAIL


def test_a_failing_gate_does_not_wait_for_the_bake():
    spec = spec_for(bake_s=600)
    slow = planner.decide_stage(spec, execs("rpi-4", E.SUCCEEDED), {"rpi-4": ClassObservation([20.0], [10.0])}, 5)
    assert slow.decision is StageDecision.FAIL


def test_p99_regression_within_the_noise_floor_passes():
    def p99_gate(new: float, previous: float):
        seen = {"x86_64": ClassObservation(p99_new=[new], p99_previous=[previous])}
        verdicts = planner.gate_verdicts(spec_for(), execs("x86_64", E.SUCCEEDED), seen)
        return next(v for v in verdicts if v.gate == "p99_regression")

    tiny = p99_gate(0.05, 0.03)           # +67%, but 20 us: scheduler noise
    assert tiny.passed and tiny.value == pytest.approx(0.6667, rel=1e-3)
    assert not p99_gate(3.0, 1.0).passed  # +200% and 2 ms: a real regression
