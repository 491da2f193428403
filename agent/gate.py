"""The activation gate: a freshly loaded model must pass its golden set, then the benchmark.

The benchmark fails a model whose p99 exceeds the declared budget, or exceeds
the previous version's p99 on this device by more than the allowed regression.
When the previous version is still loaded (swapping side by side), both are
measured query by query in turn, so load on a shared device cannot tip the
comparison either way; otherwise the p99 recorded when it was activated is used.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from edgefleet.common.errors import EdgefleetError
from edgefleet.common.golden import GoldenSet
from edgefleet.common.protocol import P99_NOISE_FLOOR_MS as NOISE_FLOOR_MS
from edgefleet.common.protocol import Gate, GateReport, GoldenCheck

from .bench import run_benchmark, run_paired
from .runtime import LoadedModel


@dataclass(frozen=True)
class ActivationGateResult:
    passed: bool
    reason: str          # one line, for the event's detail
    report: GateReport   # what was measured, for the event and the benchmark telemetry


def run_gate(
    loaded: LoadedModel,
    golden_path: Path,
    gate: Gate,
    previous_p99_ms: float | None,
    noise_floor_ms: float = NOISE_FLOOR_MS,
    baseline: LoadedModel | None = None,
) -> ActivationGateResult:
    report = GateReport(p99_budget_ms=gate.p99_budget_ms, max_p99_regression=gate.max_p99_regression,
                        previous_p99_ms=previous_p99_ms)
    try:
        golden = GoldenSet.load(golden_path)
        verdict = golden.check(loaded.run)
    except (EdgefleetError, OSError) as e:
        return ActivationGateResult(False, f"golden set could not run: {e}", report)
    report = replace(report, golden=GoldenCheck(passed=verdict.passed, max_abs_diff=verdict.max_abs_diff,
                                                atol=golden.atol, rtol=golden.rtol, samples=golden.samples))
    if not verdict.passed:
        return ActivationGateResult(False, f"golden set failed: {verdict.detail}", report)

    try:
        if baseline is None:
            result = run_benchmark(loaded, gate.bench_seconds, gate.bench_min_queries, batch=0, inputs=golden.inputs)
        else:
            result, before = run_paired(loaded, baseline, gate.bench_seconds, gate.bench_min_queries, golden.inputs)
            previous_p99_ms = before.p99_ms
            report = replace(report, previous_p99_ms=previous_p99_ms, paired=True)
    except EdgefleetError as e:
        return ActivationGateResult(False, f"benchmark could not run: {e}", report)
    report = replace(report, benchmark=result)

    if gate.p99_budget_ms is not None and result.p99_ms > gate.p99_budget_ms:
        over = f"p99 {result.p99_ms:.3f} ms is over the budget of {gate.p99_budget_ms:g} ms"
        return ActivationGateResult(False, over, report)
    if previous_p99_ms is not None:
        limit = max(previous_p99_ms * (1 + gate.max_p99_regression), previous_p99_ms + noise_floor_ms)
        report = replace(report, p99_limit_ms=limit)
        if result.p99_ms > limit:
            return ActivationGateResult(
                False,
                f"p99 {result.p99_ms:.3f} ms regresses past {limit:.3f} ms "
                f"(previous {previous_p99_ms:.3f} ms + {gate.max_p99_regression:.0%})",
                report,
            )
    return ActivationGateResult(True, f"golden set passed ({verdict.detail}); p99 {result.p99_ms:.3f} ms", report)
