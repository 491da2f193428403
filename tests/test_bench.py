"""The benchmark protocol shared by `fleet-agent bench` and the gate."""
from __future__ import annotations

import json

import numpy as np

from edgefleet.agent import bench
from edgefleet.agent.runtime import ModelRuntime


def test_run_benchmark_reports_single_stream_and_offline(digits):
    loaded = ModelRuntime().load(digits.model)
    result = bench.run_benchmark(loaded, seconds=0.05, min_queries=30, batch=16)
    assert result.queries >= 30
    assert 0 < result.p50_ms <= result.p90_ms <= result.p99_ms <= result.max_ms
    assert result.provider == "CPUExecutionProvider"
    assert result.session_create_ms > 0 and result.first_query_ms > 0
    assert result.offline_batch == 16 and result.offline_samples_per_s > 0
    assert result.peak_rss_mb > 10
    assert set(result.to_dict()) >= {"p50_ms", "p90_ms", "p99_ms", "max_ms", "throughput_qps", "peak_rss_mb"}


def test_benchmark_cycles_through_given_inputs(digits):
    loaded = ModelRuntime().load(digits.model)
    data = np.load(digits.eval_data)["input"][:7]
    result = bench.run_benchmark(loaded, seconds=0.0, min_queries=10, batch=0, inputs={"input": data})
    assert result.queries == 10 and result.offline_samples_per_s is None and result.offline_batch == 0


def test_synthesize_fills_dynamic_dims():
    from edgefleet.agent.runtime import TensorSpec

    specs = (TensorSpec("x", "FP32", np.dtype(np.float32), (None, 3, None)),
             TensorSpec("n", "INT64", np.dtype(np.int64), (2,)))
    inputs = bench.synthesize(specs, batch=4)
    assert inputs["x"].shape == (4, 3, 1) and inputs["x"].dtype == np.float32
    assert inputs["n"].shape == (2,) and inputs["n"].dtype == np.int64


def test_percentile_never_under_reports_the_tail():
    ms = np.arange(1, 101, dtype=float)
    assert bench._percentile(ms, 99) == 99.0 and bench._percentile(ms, 50) == 50.0
    assert bench._percentile(np.array([1.0, 100.0]), 99) == 100.0


def test_bench_command_json_and_missing_model(digits, capsys):
    assert bench.main([str(digits.model), "--seconds", "0", "--min-queries", "5", "--batch", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["queries"] == 5 and result["offline_batch"] == 2
    assert bench.main(["--seconds", "0"]) == 1
    assert "no MODEL given" in capsys.readouterr().err
    assert bench.main(["--seconds", "0", "--min-queries", "5"], default_model=lambda: digits.model) == 0
    assert "latency p50/p90/p99/max" in capsys.readouterr().out


def test_bench_command_on_a_broken_model_is_one_error_line(broken_model, capsys):
    assert bench.main([str(broken_model)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot load model") and err.count("\n") == 1
