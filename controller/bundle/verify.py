"""Check a built bundle locally: every listed variant loads and passes its own golden set."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgefleet.common.errors import GoldenFormatError
from edgefleet.common.golden import GoldenSet

from .evaluate import cpu_session
from .report import BundleReport, ReportedVariant
from .variants import CUDA_FP16


@dataclass(frozen=True)
class VariantCheck:
    variant: str
    passed: bool
    max_abs_diff: float
    detail: str


def verify_bundle(out: Path) -> list[VariantCheck]:
    return [_check(variant) for variant in BundleReport.read(out).variants]


def _check(variant: ReportedVariant) -> VariantCheck:
    session, _ = cpu_session(variant.file, fp16=variant.name == CUDA_FP16)
    try:
        golden = GoldenSet.load(variant.golden)
    except GoldenFormatError as e:
        return VariantCheck(variant.name, False, float("inf"), str(e))
    names = [o.name for o in session.get_outputs()]
    result = golden.check(lambda inputs: dict(zip(names, session.run(names, inputs), strict=True)))
    return VariantCheck(variant.name, result.passed, result.max_abs_diff, result.detail)
