"""The latency/accuracy frontier of one model version, per hardware class: pure, no I/O.

Accuracy is what the build measured on its held-out set (one figure per
variant, the same on every class); latency is what devices of the class
measured when they activated the variant (median of their p50 and p99). A
variant is on the frontier of a class when no other variant measured there is
at least as accurate and at least as fast at p99, and better in one of them.
The pick is the planner's: the fastest measured variant at or above the floor.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .planner import Evidence, VariantView


@dataclass(frozen=True)
class Point:
    variant: str
    metric: str | None          # top1, exact_match, box_f1; None: built without truth
    accuracy: float | None
    p50_ms: float | None        # None: no device of the class has measured it
    p99_ms: float | None
    devices: int
    on_frontier: bool
    picked: bool
    note: str = ""              # why it is not eligible (below the floor, no evidence)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _dominated(p: Point, others: Iterable[Point]) -> bool:
    assert p.p99_ms is not None
    mine = p.accuracy if p.accuracy is not None else -1.0
    for q in others:
        if q is p or q.p99_ms is None:
            continue
        theirs = q.accuracy if q.accuracy is not None else -1.0
        if theirs >= mine and q.p99_ms <= p.p99_ms and (theirs > mine or q.p99_ms < p.p99_ms):
            return True
    return False


def frontier(variants: Sequence[VariantView], evidence: Sequence[Evidence], classes: Iterable[str] = (),
             min_accuracy: float | None = None) -> dict[str, list[Point]]:
    """Per hardware class (those with evidence, and ``classes``), every variant as a Point."""
    result: dict[str, list[Point]] = {}
    for cls in sorted({e.hardware_class for e in evidence} | set(classes)):
        measured = {e.variant: e for e in evidence if e.hardware_class == cls}
        points = []
        for v in variants:
            metric, accuracy = v.task_accuracy or (None, None)
            e = measured.get(v.variant)
            under = v.below(min_accuracy)
            note = under.split(": ", 1)[1] if under else ("" if e else "no device of this class has measured it")
            points.append(Point(v.variant, metric, accuracy, e.p50_ms if e else None, e.p99_ms if e else None,
                                e.devices if e else 0, False, False, note))
        timed = [p for p in points if p.p99_ms is not None]
        preference = {v.variant: v.preference for v in variants}
        eligible = sorted((p for p in timed if not p.note), key=lambda p: (p.p99_ms, preference[p.variant], p.variant))
        pick = eligible[0].variant if eligible else None
        result[cls] = [
            Point(p.variant, p.metric, p.accuracy, p.p50_ms, p.p99_ms, p.devices,
                  p.p99_ms is not None and not _dominated(p, timed), p.variant == pick, p.note)
            for p in points
        ]
    return result
