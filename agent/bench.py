"""The on-device benchmark, one protocol for `fleet-agent bench` and the activation gate.

Modelled on MLPerf Inference's SingleStream scenario: session creation and
warm-up are timed apart (cold start), then queries are issued one after the
other, each as soon as the previous one returns, until both the minimum
duration and the minimum query count are reached. An Offline figure (batched
throughput) follows when a batch size is given.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from edgefleet.common.errors import EdgefleetError
from edgefleet.common.protocol import BenchmarkResult

from .errors import AgentError
from .runtime import LoadedModel, ModelRuntime, RuntimeOptions, TensorSpec

WARMUP_QUERIES = 5
OFFLINE_SHARE = 0.5  # the Offline run lasts this share of the SingleStream duration


def table(result: BenchmarkResult) -> str:
    rows = [
        ("model", f"{result.model} {result.version}"),
        ("provider", result.provider),
        ("session create", f"{result.session_create_ms:.1f} ms"),
        ("first query", f"{result.first_query_ms:.2f} ms"),
        ("queries", f"{result.queries} in {result.duration_s:.2f} s"),
        ("latency p50/p90/p99/max",
         f"{result.p50_ms:.3f} / {result.p90_ms:.3f} / {result.p99_ms:.3f} / {result.max_ms:.3f} ms"),
        ("SingleStream throughput", f"{result.throughput_qps:.1f} queries/s"),
        ("Offline throughput", "skipped" if result.offline_samples_per_s is None
         else f"{result.offline_samples_per_s:.1f} samples/s (batch {result.offline_batch})"),
        ("peak RSS", f"{result.peak_rss_mb:.1f} MiB"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def synthesize(specs: tuple[TensorSpec, ...], batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs from the model's metadata: dynamic dimensions become ``batch`` (first) or 1."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for spec in specs:
        shape = tuple((batch if i == 0 else 1) if d is None else d for i, d in enumerate(spec.shape))
        if spec.dtype.kind == "f":
            inputs[spec.name] = rng.random(shape).astype(spec.dtype)
        elif spec.dtype.kind == "b":
            inputs[spec.name] = rng.random(shape) < 0.5
        else:
            inputs[spec.name] = np.zeros(shape, spec.dtype)
    return inputs


def batched(inputs: Mapping[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """Repeat samples along axis 0 up to ``batch`` rows."""
    out = {}
    for name, array in inputs.items():
        reps = -(-batch // len(array))
        out[name] = np.concatenate([array] * reps)[:batch]
    return out


def peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _time(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def _percentile(sorted_ms: np.ndarray, q: float) -> float:
    # MLPerf takes the sample at ceil(q * n): never under-reports the tail
    index = min(len(sorted_ms) - 1, max(0, int(np.ceil(q / 100.0 * len(sorted_ms))) - 1))
    return float(sorted_ms[index])


def run_benchmark(
    loaded: LoadedModel,
    seconds: float = 1.0,
    min_queries: int = 20,
    batch: int = 8,
    inputs: Mapping[str, np.ndarray] | None = None,
) -> BenchmarkResult:
    """Benchmark ``loaded`` directly (not through the serving runtime).

    ``inputs`` holds samples along axis 0 (a golden set's, say); SingleStream
    cycles through them one sample at a time. Without them inputs are
    synthesized. ``batch`` 0 skips the Offline run.
    """
    pool = dict(inputs) if inputs else synthesize(loaded.inputs, batch=1)
    (stream,) = _single_stream([loaded], pool, seconds, min_queries)
    offline = _offline(loaded, pool, batch, seconds * OFFLINE_SHARE) if batch > 0 else None
    return _result(loaded, stream, batch, offline)


def run_paired(
    candidate: LoadedModel,
    baseline: LoadedModel,
    seconds: float = 1.0,
    min_queries: int = 20,
    inputs: Mapping[str, np.ndarray] | None = None,
) -> tuple[BenchmarkResult, BenchmarkResult]:
    """SingleStream on two models query by query in turn, so that a busy moment on a
    shared device slows both alike and the comparison of their tails stays fair."""
    pool = dict(inputs) if inputs else synthesize(candidate.inputs, batch=1)
    new, old = _single_stream([candidate, baseline], pool, seconds, min_queries)
    return _result(candidate, new, 0, None), _result(baseline, old, 0, None)


@dataclass
class _Stream:
    first_ms: float
    latencies_s: list[float]
    duration_s: float


def _single_stream(
    models: list[LoadedModel], pool: Mapping[str, np.ndarray], seconds: float, min_queries: int
) -> list[_Stream]:
    samples = min(len(a) for a in pool.values())
    queries = [{k: v[i:i + 1] for k, v in pool.items()} for i in range(samples)]
    first = [_time(partial(m.run, queries[0])) * 1000.0 for m in models]
    for i in range(1, WARMUP_QUERIES):
        for model in models:
            model.run(queries[i % samples])
    latencies: list[list[float]] = [[] for _ in models]
    started = time.perf_counter()
    while len(latencies[0]) < min_queries or time.perf_counter() - started < seconds:
        query = queries[len(latencies[0]) % samples]
        for model, timed in zip(models, latencies, strict=True):
            timed.append(_time(partial(model.run, query)))
    duration = time.perf_counter() - started
    # each model's own busy time: in a paired run the other model's queries are not its duration
    return [
        _Stream(f, timed, duration if len(models) == 1 else sum(timed))
        for f, timed in zip(first, latencies, strict=True)
    ]


def _result(loaded: LoadedModel, stream: _Stream, batch: int, offline: float | None) -> BenchmarkResult:
    ms = np.sort(np.asarray(stream.latencies_s) * 1000.0)
    return BenchmarkResult(
        model=loaded.name,
        version=loaded.version,
        provider=loaded.provider,
        session_create_ms=loaded.load_ms,
        first_query_ms=stream.first_ms,
        warmup_queries=WARMUP_QUERIES,
        queries=len(ms),
        duration_s=stream.duration_s,
        p50_ms=_percentile(ms, 50),
        p90_ms=_percentile(ms, 90),
        p99_ms=_percentile(ms, 99),
        max_ms=float(ms[-1]),
        mean_ms=float(ms.mean()),
        throughput_qps=len(ms) / stream.duration_s,
        offline_batch=batch if offline is not None else 0,
        offline_samples_per_s=offline,
        peak_rss_mb=peak_rss_mb(),
    )


def _offline(loaded: LoadedModel, pool: Mapping[str, np.ndarray], batch: int, seconds: float) -> float | None:
    """Samples per second with ``batch`` samples per call; None if the model's batch dimension is fixed."""
    if any(spec.shape and spec.shape[0] is not None and spec.shape[0] != batch for spec in loaded.inputs):
        return None
    feed = batched(pool, batch)
    loaded.run(feed)  # warm-up: the first batch of a new size allocates
    calls, started = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - started < seconds:
        loaded.run(feed)
        calls += 1
    return calls * batch / (time.perf_counter() - started)


# --- `fleet-agent bench` -----------------------------------------------------


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="fleet-agent bench",
        description="Benchmark an ONNX model the way the activation gate does (MLPerf SingleStream + Offline).",
        epilog="example: fleet-agent bench model.onnx --seconds 5 --json",
    )
    parser.add_argument("model", nargs="?", type=Path, help="ONNX model file (default: the agent's active model)")
    parser.add_argument("--seconds", type=float, default=5.0, help="minimum SingleStream duration (default: 5)")
    parser.add_argument("--min-queries", type=int, default=100, help="minimum SingleStream queries (default: 100)")
    parser.add_argument("--batch", type=int, default=8, help="Offline batch size; 0 skips Offline (default: 8)")
    parser.add_argument("--golden", type=Path, help="take inputs from this golden set instead of synthesizing them")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default: 1)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def bench_command(args: argparse.Namespace, default_model: Callable[[], Path] | None = None) -> int:
    """Run ``fleet-agent bench``; ``default_model`` finds the active model when none is given."""
    from edgefleet.common.golden import GoldenSet

    try:
        model = args.model or (default_model() if default_model else None)
        if model is None:
            raise AgentError("no MODEL given and no active model to default to; pass a path to an .onnx file")
        loaded = ModelRuntime(RuntimeOptions(intra_op_threads=args.threads)).load(model)
        inputs = GoldenSet.load(args.golden).inputs if args.golden else None
        result = run_benchmark(loaded, args.seconds, args.min_queries, args.batch, inputs)
    except EdgefleetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result.to_dict(), indent=2) if args.json else table(result))
    return 0


def main(argv: list[str] | None = None, default_model: Callable[[], Path] | None = None) -> int:
    return bench_command(build_parser().parse_args(argv), default_model)


if __name__ == "__main__":
    sys.exit(main())
