"""The latency/accuracy frontier per hardware class, and the planner's accuracy floor."""
from __future__ import annotations

import pytest

from edgefleet.controller.errors import InvalidInput
from edgefleet.controller.rollout import planner
from edgefleet.controller.rollout.frontier import frontier
from edgefleet.controller.rollout.planner import DeviceView, Evidence, VariantView
from edgefleet.controller.rollout.spec import RolloutSpec
from tests.rollout_fleet import RPI, X86

VARIANTS = [
    VariantView("cpu-int8", "m/1/cpu-int8.onnx", {}, 1, {"top1": 0.93, "top1_drop": 0.05, "agreement": 0.95}),
    VariantView("cpu-fp32", "m/1/cpu-fp32.onnx", {}, 2, {"top1": 0.98, "top1_drop": 0.0, "agreement": 1.0}),
    VariantView("cpu-slow", "m/1/cpu-slow.onnx", {}, 3, {"top1": 0.97, "top1_drop": 0.01}),
]
# int8 is fastest on x86; on the Pi it is slower than fp32 (no fast int8 kernels there)
EVIDENCE = [
    Evidence("x86_64", "cpu-int8", 2.0, 3, 1.5), Evidence("x86_64", "cpu-fp32", 4.0, 3, 3.0),
    Evidence("x86_64", "cpu-slow", 9.0, 1, 8.0),
    Evidence("rpi-4", "cpu-int8", 12.0, 2, 10.0), Evidence("rpi-4", "cpu-fp32", 8.0, 2, 7.0),
]


def _marks(points, attr: str) -> set[str]:
    return {p.variant for p in points if getattr(p, attr)}


def test_frontier_per_class_marks_the_undominated_and_the_pick():
    found = frontier(VARIANTS, EVIDENCE, classes=["jetson"])
    x86, rpi = found["x86_64"], found["rpi-4"]
    assert _marks(x86, "on_frontier") == {"cpu-int8", "cpu-fp32"}    # slow is beaten by fp32 on both axes
    assert _marks(x86, "picked") == {"cpu-int8"}                      # no floor: the fastest
    assert _marks(rpi, "on_frontier") == {"cpu-fp32"} and _marks(rpi, "picked") == {"cpu-fp32"}
    slow = next(p for p in rpi if p.variant == "cpu-slow")
    assert slow.p99_ms is None and slow.devices == 0 and "no device of this class" in slow.note
    fp32 = next(p for p in x86 if p.variant == "cpu-fp32")
    assert (fp32.metric, fp32.accuracy, fp32.p50_ms, fp32.p99_ms, fp32.devices) == ("top1", 0.98, 3.0, 4.0, 3)
    assert not any(p.on_frontier or p.picked for p in found["jetson"])  # a class with no evidence yet


def test_floor_moves_the_pick_and_the_planner_explains_it():
    found = frontier(VARIANTS, EVIDENCE, min_accuracy=0.95)
    assert _marks(found["x86_64"], "picked") == {"cpu-fp32"}
    int8 = next(p for p in found["x86_64"] if p.variant == "cpu-int8")
    assert int8.on_frontier and "top-1 0.93 below the floor 0.95" in int8.note
    device = DeviceView("x1", {}, X86, "x86_64", online=True)
    choice = planner.choose_variant(device, VARIANTS, EVIDENCE, min_accuracy=0.95)
    assert choice.variant == "cpu-fp32"
    assert "at or above the accuracy floor 0.95: 4 ms over 3 device(s)" in choice.reason
    assert "not cpu-int8: top-1 0.93 below the floor 0.95" in choice.reason
    assert planner.choose_variant(device, VARIANTS, EVIDENCE).variant == "cpu-int8"
    pi = DeviceView("p1", {}, RPI, "rpi-4", online=True)
    assert planner.choose_variant(pi, VARIANTS, EVIDENCE, min_accuracy=0.99).variant is None  # none is that good
    unknown = [VariantView("cpu-fp32", "t", {}, 2, {"agreement": 1.0})]
    refused = planner.choose_variant(pi, unknown, [], min_accuracy=0.5)
    assert refused.variant is None and "accuracy unknown" in refused.reason


def test_min_accuracy_in_the_manifest():
    spec = RolloutSpec("m", "1", "site=berlin", min_accuracy=0.95)
    manifest = spec.to_manifest("r")
    assert manifest["spec"]["gates"]["min_accuracy"] == 0.95
    assert RolloutSpec.from_manifest(manifest).min_accuracy == 0.95
    manifest["spec"]["gates"]["min_accuracy"] = "97.5%"
    assert RolloutSpec.from_manifest(manifest).min_accuracy == pytest.approx(0.975)
    manifest["spec"]["gates"]["min_accuracy"] = 1.5
    with pytest.raises(InvalidInput, match="min_accuracy"):
        RolloutSpec.from_manifest(manifest)
