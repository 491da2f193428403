"""Hot-swap under load: requests served and failed during N swaps, p99 during swaps vs steady state.

The agent's server serves two models, each from its own runtime (as a device serving
several models does). Client threads send binary OIP requests back to back to both
while the main thread loads a new session of the first, swaps it in and waits for the
old one to drain, N times; the second is never swapped. "During a swap" are the
requests in flight at any moment of a load+swap+drain; the baseline is the same load
with no swap, measured first in the same run.

    python -m bench.swap [--swaps 100] [--clients 2] [--steady-seconds 5] [--model M.onnx]
"""
from __future__ import annotations

import argparse
import bisect
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench._common import DEFAULT_CACHE, OipClient, digits_model, summary_ms, table
from edgefleet.agent.runtime import ModelRuntime
from edgefleet.agent.serve import InferenceServer
from edgefleet.agent.served import ServedModels
from edgefleet.common.protocol import ModelRef


class LoadGenerator:
    """Clients that record (start time, latency, HTTP status) of every request."""

    def __init__(self, url: str, model: str, inputs: dict[str, np.ndarray], clients: int) -> None:
        self.url, self.model, self.inputs = url, model, inputs
        self.stop = threading.Event()
        self.records: list[tuple[float, float, int]] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run) for _ in range(clients)]

    def _run(self) -> None:
        client = OipClient(self.url, self.model)
        local = []
        try:
            while not self.stop.is_set():
                started = time.perf_counter()
                try:
                    status = client.infer(self.inputs)
                except OSError:
                    status = 0  # a dropped connection counts as a failed request
                    client.close()
                    client = OipClient(self.url, self.model)
                local.append((started, time.perf_counter() - started, status))
        finally:
            client.close()
            with self.lock:
                self.records.extend(local)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()

    def select(self, keep: Callable[[float, float], bool]) -> tuple[list[float], int]:
        """Latencies of the requests for which ``keep(start, end)`` holds, and how many of them failed."""
        picked = [(lat, status) for t, lat, status in self.records if keep(t, t + lat)]
        return [lat for lat, _ in picked], sum(status != 200 for _, status in picked)


def overlaps(intervals: list[tuple[float, float]]) -> Callable[[float, float], bool]:
    starts = [a for a, _ in intervals]

    def keep(start: float, end: float) -> bool:
        i = bisect.bisect_right(starts, end) - 1  # the last swap that began before the request ended
        return i >= 0 and intervals[i][1] >= start

    return keep


SWAPPED, BYSTANDER = "digits", "bystander"


def run(model: Path, swaps: int, clients: int, steady_seconds: float, interval: float) -> dict:
    runtime, other = ModelRuntime(), ModelRuntime()
    name = SWAPPED
    first = runtime.load(model, ModelRef(model=name, version="0", variant="cpu-fp32"))
    runtime.swap(first)
    other.swap(other.load(model, ModelRef(model=BYSTANDER, version="0", variant="cpu-fp32")))
    inputs = {first.inputs[0].name: np.random.default_rng(0).random((1, 64), dtype=np.float32)}
    retired = []
    served = ServedModels({SWAPPED: runtime, BYSTANDER: other})
    with InferenceServer(served, "127.0.0.1:0", 1 << 20) as server:
        load = LoadGenerator(server.url, name, inputs, clients)
        bystander = LoadGenerator(server.url, BYSTANDER, inputs, clients)
        load.start()
        bystander.start()
        t0 = time.perf_counter()
        time.sleep(steady_seconds)
        t1 = time.perf_counter()
        swapping = []  # (start, end) of each load + swap + drain of the old session
        for i in range(1, swaps + 1):
            started = time.perf_counter()
            old = runtime.swap(runtime.load(model, ModelRef(model=name, version=str(i), variant="cpu-fp32")))
            assert old is not None  # a model was active
            old.wait_released(5)
            swapping.append((started, time.perf_counter()))
            retired.append(old)
            time.sleep(interval)
        time.sleep(0.2)  # let requests started during the last swap finish
        load.finish()
        bystander.finish()
    served.close()
    released = sum(old.released for old in retired)
    return {
        "swaps": swaps, "clients": clients, "released": released, "interval": interval,
        "swap_ms": summary_ms([b - a for a, b in swapping]),
        **_phases(load, t0, t1, swapping),
        BYSTANDER: _phases(bystander, t0, t1, swapping),
        "failed_total": sum(status != 200 for _, _, status in load.records + bystander.records),
        "requests_total": len(load.records) + len(bystander.records),
    }


def _phases(load: LoadGenerator, t0: float, t1: float, swapping: list[tuple[float, float]]) -> dict:
    steady, steady_failed = load.select(lambda start, end: t0 <= start and end < t1)
    during, during_failed = load.select(overlaps(swapping))
    return {"steady": {"requests": len(steady), "failed": steady_failed, **summary_ms(steady)},
            "during": {"requests": len(during), "failed": during_failed, **summary_ms(during)}}


def report(result: dict) -> str:
    rows = [
        (f"{model}: {phase}", r["requests"], r["failed"], r["p50"], r["p99"], r["max"])
        for model, phases in ((f"{SWAPPED} (swapped)", result), (f"{BYSTANDER} (not swapped)", result[BYSTANDER]))
        for phase, r in (("steady state", phases["steady"]), ("in flight during a swap", phases["during"]))
    ]
    ratio = result["during"]["p99"] / result["steady"]["p99"]
    beside = result[BYSTANDER]["during"]["p99"] / result[BYSTANDER]["steady"]["p99"]
    return "\n".join([
        f"### Hot-swap under load, two models served ({result['clients']} clients per model; {result['swaps']} "
        f"swaps of {SWAPPED}, one every {result['interval'] * 1000:.0f} ms, each load+swap+drain p50 "
        f"{result['swap_ms']['p50']:.1f} ms; {result['released']}/{result['swaps']} old sessions released)",
        "",
        table(["model: phase", "requests", "failed", "p50 ms", "p99 ms", "max ms"], rows),
        "",
        f"p99 during swaps / steady state: **{ratio:.2f}x** for the swapped model, {beside:.2f}x for the other; "
        f"requests failed in the whole run: **{result['failed_total']}** of {result['requests_total']}",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--swaps", type=int, default=100)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--steady-seconds", type=float, default=5.0)
    parser.add_argument("--interval", type=float, default=0.02, help="pause between swaps, seconds")
    parser.add_argument("--model", type=Path, help="ONNX model with a [N,64] float input (default: digits)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args(argv)
    result = run(args.model or digits_model(args.cache), args.swaps, args.clients, args.steady_seconds, args.interval)
    print(report(result))
    return 0 if result["failed_total"] == 0 and result["released"] == args.swaps else 1


if __name__ == "__main__":
    sys.exit(main())
