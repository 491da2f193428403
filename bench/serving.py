"""Serving overhead: an Open Inference Protocol request vs a raw InferenceSession.run.

The agent runs as a real process (``fleet-agent serve MODEL``), as on a device;
this process loads the same model file with the same session options and
times, query after query in turn, its raw ``InferenceSession.run`` and one
request over each front end, each on its own keep-alive connection: REST
with the binary tensor extension, REST with JSON tensors, and gRPC (when
grpcio is installed). Requests are encoded once; every answer is read whole.
"Added" is the request's time minus the raw run's, p50 against p50.

    python -m bench.serving [--models digits,resnet50] [--queries 2000] [--resnet-queries 60]
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench._common import DEFAULT_CACHE, OipClient, ServeProcess, summary_ms, table
from edgefleet.agent.bench import synthesize
from edgefleet.agent.runtime import ModelRuntime, RuntimeOptions
from edgefleet.common.protocol import ModelRef

WARMUP = 5
JSON_MAX_VALUES = 100_000  # JSON for a 150k-float image measures the JSON codec, not the server
MODES = ("raw", "rest-binary", "rest-json", "grpc")


def _interleaved(calls: dict[str, Callable[[], object]], queries: int) -> dict[str, list[float]]:
    """Time each call ``queries`` times, round-robin, so drift (CPU clock, neighbours) hits all modes alike."""
    for call in calls.values():
        for _ in range(WARMUP):
            call()
    times: dict[str, list[float]] = {mode: [] for mode in calls}
    for _ in range(queries):
        for mode, call in calls.items():
            started = time.perf_counter()
            call()
            times[mode].append(time.perf_counter() - started)
    return times


def _ok(status: int) -> None:
    if status != 200:
        raise RuntimeError(f"the server answered HTTP {status}")


def measure(name: str, path: Path, queries: int, threads: int) -> dict:
    runtime = ModelRuntime(RuntimeOptions(intra_op_threads=threads))
    loaded = runtime.load(path, ModelRef(model=name, version="1", variant="cpu-fp32"))
    session = loaded.session
    assert session is not None
    inputs = synthesize(loaded.inputs, batch=1)
    with ServeProcess(path, name, "--threads", str(threads), "--max-request-bytes", str(64 << 20)) as agent:
        binary, json_ = OipClient(agent.url, name), OipClient(agent.url, name)
        binary_request = binary.prepare(inputs, binary=True)
        calls: dict[str, Callable[[], object]] = {
            "raw": lambda: session.run(None, inputs),
            "rest-binary": lambda: _ok(binary.send(binary_request)),
        }
        if sum(v.size for v in inputs.values()) <= JSON_MAX_VALUES:
            json_request = json_.prepare(inputs, binary=False)
            calls["rest-json"] = lambda: _ok(json_.send(json_request))
        try:
            times = _interleaved(calls, queries)
        finally:
            binary.close()
            json_.close()
    runtime.close()
    return {"model": name, "queries": queries, **{mode: summary_ms(t) for mode, t in times.items()}}


def report(results: list[dict]) -> str:
    rows = []
    for r in results:
        raw = r["raw"]["p50"]
        for mode in MODES:
            if mode not in r:
                continue
            added = "—" if mode == "raw" else f"{r[mode]['p50'] - raw:.3f}"
            ratio = f"{r[mode]['p50'] / raw:.3f}x"
            rows.append((r["model"], mode, r["queries"], r[mode]["p50"], r[mode]["p99"], added, ratio))
    return "\n".join([
        "### Serving overhead: OIP request to `fleet-agent serve` vs raw InferenceSession.run (same model file)",
        "",
        table(["model", "mode", "queries", "p50 ms", "p99 ms", "added ms (p50)", "vs raw p50"], rows),
    ])


def main(argv: list[str] | None = None) -> int:
    from bench import models

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="digits,resnet50", help="comma-separated: digits, resnet50")
    parser.add_argument("--queries", type=int, default=2000, help="queries per mode for digits")
    parser.add_argument("--resnet-queries", type=int, default=60, help="queries per mode for resnet50")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args(argv)
    makers = {"digits": (lambda: models.digits(args.cache).model, args.queries),
              "resnet50": (lambda: models.resnet50(args.cache), args.resnet_queries)}
    chosen = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in makers]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(makers)}")
    results = [measure(m, makers[m][0](), makers[m][1], args.threads) for m in chosen]
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
