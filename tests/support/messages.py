"""Well-formed wire payloads for tests that play the agent's part."""
from __future__ import annotations

from typing import Any

from edgefleet.common.protocol import (
    BenchmarkReport,
    BenchmarkResult,
    CounterSnapshot,
    GateReport,
    Heartbeat,
    ModelCounters,
    ModelRef,
)


def benchmark_result(p99_ms: float, **changes: Any) -> BenchmarkResult:
    fields: dict[str, Any] = {
        "model": "digits", "version": "1.0", "provider": "CPUExecutionProvider", "session_create_ms": 5.0,
        "first_query_ms": 1.0, "warmup_queries": 5, "queries": 100, "duration_s": 1.0, "p50_ms": p99_ms / 2,
        "p90_ms": p99_ms * 0.9, "p99_ms": p99_ms, "max_ms": p99_ms * 1.5, "mean_ms": p99_ms / 2,
        "throughput_qps": 100.0, "offline_batch": 0, "offline_samples_per_s": None, "peak_rss_mb": 50.0,
    }
    return BenchmarkResult(**{**fields, **changes})


def benchmark_report(ref: ModelRef, p99_ms: float, paired_previous_ms: float | None = None) -> BenchmarkReport:
    """What the agent's gate sends; with ``paired_previous_ms`` the replaced model was timed in turn."""
    gate = GateReport(p99_budget_ms=None, max_p99_regression=0.5, previous_p99_ms=paired_previous_ms,
                      paired=paired_previous_ms is not None,
                      benchmark=benchmark_result(p99_ms, model=ref.model, version=ref.version))
    return BenchmarkReport(model=ref, gate=gate)


def counter_snapshot(requests: int = 0, failures: int = 0) -> CounterSnapshot:
    return CounterSnapshot(requests=requests, rejected=0, failures=failures,
                           latency_buckets_ms=(1.0,), latency_counts=(requests, 0))


def heartbeat(uptime_s: float = 1.0) -> Heartbeat:
    return Heartbeat(uptime_s=uptime_s, active=(), counters=counter_snapshot())


def model_counters(ref: ModelRef, requests: int = 0, failures: int = 0, since: float = 0.0) -> ModelCounters:
    return ModelCounters.of(ref, since, counter_snapshot(requests, failures))
