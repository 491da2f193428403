"""The activation gate against real models: golden set, then the p99 budget and regression bound."""
from __future__ import annotations

import numpy as np
import pytest

from edgefleet.agent.bench import run_benchmark
from edgefleet.agent.gate import run_gate
from edgefleet.agent.runtime import ModelRuntime
from edgefleet.common.golden import GoldenSet
from edgefleet.common.protocol import Gate

GATE = Gate(p99_budget_ms=None, max_p99_regression=0.5, bench_seconds=0.2, bench_min_queries=50)


@pytest.fixture(scope="module")
def golden(digits, tmp_path_factory):
    loaded = ModelRuntime().load(digits.model)
    inputs = np.load(digits.eval_data)["input"][:16]
    outputs = loaded.run({"input": inputs})
    path = tmp_path_factory.mktemp("golden") / "cpu-fp32.golden.npz"
    return GoldenSet({"input": inputs}, outputs, atol=1e-4, rtol=1e-3, top1=True).save(path)


def test_digits_passes_and_reports_its_numbers(digits, golden):
    result = run_gate(ModelRuntime().load(digits.model), golden, GATE, previous_p99_ms=None)
    assert result.passed, result.reason
    golden, benchmark = result.report.golden, result.report.benchmark
    assert golden is not None and golden.passed and golden.max_abs_diff < 1e-4 and golden.samples == 16
    assert benchmark is not None and 0 < benchmark.p50_ms <= benchmark.p99_ms and benchmark.queries >= 50


def test_wrong_digits_fails_the_golden_set(wrong_model, golden):
    result = run_gate(ModelRuntime().load(wrong_model), golden, GATE, previous_p99_ms=None)
    assert not result.passed
    assert result.reason.startswith("golden set failed") and "\n" not in result.reason
    assert result.report.golden is not None and not result.report.golden.passed
    assert result.report.benchmark is None  # no benchmark for a wrong model


def test_slow_digits_fails_the_regression_bound_against_digits(digits, slow_model, golden):
    runtime = ModelRuntime()
    previous = run_benchmark(runtime.load(digits.model), seconds=0.3, min_queries=200, batch=0).p99_ms
    result = run_gate(runtime.load(slow_model), golden, GATE, previous_p99_ms=previous)
    assert not result.passed
    assert "regresses past" in result.reason
    report = result.report
    assert report.benchmark is not None and report.p99_limit_ms is not None
    assert report.benchmark.p99_ms > report.p99_limit_ms >= previous and not report.paired


def test_p99_budget(digits, golden):
    tight = Gate(p99_budget_ms=0.000001, bench_seconds=0.0, bench_min_queries=10)
    result = run_gate(ModelRuntime().load(digits.model), golden, tight, previous_p99_ms=None)
    assert not result.passed and "over the budget" in result.reason


def test_unreadable_golden_set_fails_with_a_reason(digits, tmp_path):
    bad = tmp_path / "bad.golden.npz"
    bad.write_bytes(b"not a zip")
    result = run_gate(ModelRuntime().load(digits.model), bad, GATE, previous_p99_ms=None)
    assert not result.passed and result.reason.startswith("golden set could not run")
    result = run_gate(ModelRuntime().load(digits.model), tmp_path / "missing.npz", GATE, previous_p99_ms=None)
    assert not result.passed and "could not run" in result.reason
