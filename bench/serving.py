"""Serving overhead: an Open Inference Protocol request vs a raw InferenceSession.run.

Same process, same session, same input: the raw call, an OIP request with the
binary tensor extension and one with JSON tensors take turns, query after
query, over one keep-alive connection.

    python -m bench.serving [--models digits,resnet50] [--queries 500] [--resnet-queries 30]
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench._common import DEFAULT_CACHE, OipClient, summary_ms, table
from edgefleet.agent.bench import synthesize
from edgefleet.agent.runtime import ModelRuntime, RuntimeOptions
from edgefleet.agent.serve import InferenceServer
from edgefleet.common.protocol import ModelRef

WARMUP = 3
JSON_MAX_VALUES = 100_000  # JSON for a 150k-float image measures the JSON codec, not the server


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
    runtime.swap(loaded)
    inputs = synthesize(loaded.inputs, batch=1)
    with InferenceServer(runtime, "127.0.0.1:0", 64 << 20) as server:
        client = OipClient(server.url, name)
        calls: dict[str, Callable[[], object]] = {
            "raw": lambda: loaded.session.run(None, inputs),
            "binary": lambda: _ok(client.infer(inputs, binary=True)),
        }
        if sum(v.size for v in inputs.values()) <= JSON_MAX_VALUES:
            calls["json"] = lambda: _ok(client.infer(inputs, binary=False))
        try:
            times = _interleaved(calls, queries)
        finally:
            client.close()
    runtime.close()
    return {"model": name, "queries": queries, **{mode: summary_ms(t) for mode, t in times.items()}}


def report(results: list[dict]) -> str:
    rows = []
    for r in results:
        json_p50 = r["json"]["p50"] if "json" in r else "—"
        rows.append((r["model"], r["queries"], r["raw"]["p50"], r["raw"]["p99"], r["binary"]["p50"],
                     r["binary"]["p99"], json_p50, f"{r['binary']['p50'] / r['raw']['p50']:.2f}x",
                     f"{r['binary']['p50'] - r['raw']['p50']:.3f}"))
    return "\n".join([
        "### Serving overhead: OIP request vs raw InferenceSession.run (same process, same session)",
        "",
        table(["model", "queries", "raw p50 ms", "raw p99 ms", "OIP binary p50 ms", "OIP binary p99 ms",
               "OIP JSON p50 ms", "OIP/raw p50", "added ms (p50)"], rows),
    ])


def main(argv: list[str] | None = None) -> int:
    from bench import models

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="digits,resnet50", help="comma-separated: digits, resnet50")
    parser.add_argument("--queries", type=int, default=500, help="queries per mode for digits")
    parser.add_argument("--resnet-queries", type=int, default=30, help="queries per mode for resnet50")
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
