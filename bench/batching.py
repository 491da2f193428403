"""Dynamic batching: throughput and latency with 1 and 8 concurrent clients, batching off and on.

Two models: digits (13 µs a call, the required case) and slow-digits (bench/models.py: the
same inputs and outputs behind 48 512x512 layers, whose weights a one-row call streams from
memory just as an eight-row call does: a model that is the bottleneck, where batching pays).

The agent runs as a real process (``fleet-agent serve MODEL``, then the same
with ``--max-batch-size`` and ``--max-queue-delay-us``); each client is a
process of its own sending one-row binary OIP requests back to back on a
keep-alive connection for ``--seconds``. The settings take turns over
``--rounds`` rounds (both agents run throughout; only one is loaded at a time)
so that the machine's drift hits them alike; throughput is
all clients' answered requests per second, latencies are per request. Then the
runtime alone, without HTTP: threads calling ``ModelRuntime.infer`` in this
process, with how many requests each session call answered.

    python -m bench.batching [--seconds 2] [--rounds 3] [--models digits,slow-digits]
        [--max-batch-size 8] [--max-queue-delay-us 0]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import threading
import time
from multiprocessing.synchronize import Event
from pathlib import Path

import numpy as np

from bench._common import DEFAULT_CACHE, OipClient, ServeProcess, summary_ms, table
from edgefleet.agent.batching import BatchPolicy
from edgefleet.agent.runtime import ModelRuntime, RuntimeOptions

WARMUP = 20
RUNTIME_THREADS = 8
CLIENTS = (1, 8)


def _client(url: str, start: Event, seconds: float, out: mp.Queue) -> None:
    client = OipClient(url, "digits")
    x = {"input": np.random.default_rng().random((1, 64), dtype=np.float32)}
    request = client.prepare(x)
    for _ in range(WARMUP):
        client.send(request)
    latencies, failed = [], 0
    start.wait()
    deadline = time.perf_counter() + seconds
    while (began := time.perf_counter()) < deadline:
        if client.send(request) != 200:
            failed += 1
        latencies.append(time.perf_counter() - began)
    client.close()
    out.put((latencies, failed))


def measure(url: str, clients: int, seconds: float) -> tuple[list[float], int, float]:
    """(every request's latency, failures, seconds) of ``clients`` processes at once."""
    context = mp.get_context("fork")
    start, out = context.Event(), context.Queue()
    procs = [context.Process(target=_client, args=(url, start, seconds, out)) for _ in range(clients)]
    for p in procs:
        p.start()
    time.sleep(0.5)  # every client connected and warmed up
    start.set()
    results = [out.get(timeout=seconds + 60) for _ in procs]
    for p in procs:
        p.join()
    return [lat for lats, _ in results for lat in lats], sum(f for _, f in results), seconds


def measure_runtime(model: Path, batching: BatchPolicy | None, threads: int, seconds: float) -> dict:
    """The runtime alone (no HTTP): ``threads`` threads calling ``ModelRuntime.infer`` back to back."""
    runtime = ModelRuntime(RuntimeOptions(batching=batching))
    loaded = runtime.load(model)
    runtime.swap(loaded)
    x = {"input": np.random.default_rng(0).random((1, 64), dtype=np.float32)}
    done = [0] * threads
    deadline = time.perf_counter() + seconds

    def loop(i: int) -> None:
        while time.perf_counter() < deadline:
            runtime.infer(x)
            done[i] += 1

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    batcher = loaded.batcher
    per_call = batcher.requests / batcher.calls if batcher is not None and batcher.calls else 1.0
    runtime.close()
    return {"batching": "on" if batching else "off", "rps": sum(done) / seconds, "per_call": per_call}


def run(name: str, model: Path, seconds: float, rounds: int, batch: int, delay_us: int) -> list[dict]:
    settings = {"off": (), "on": ("--max-batch-size", str(batch), "--max-queue-delay-us", str(delay_us))}
    collected: dict[tuple[str, int], list[tuple[list[float], int, float]]] = {}
    # both agents up at once (the idle one costs nothing): the settings take turns slice by slice
    with ServeProcess(model, "digits", *settings["off"]) as off, ServeProcess(model, "digits", *settings["on"]) as on:
        for _ in range(rounds):
            for clients in CLIENTS:
                for setting, agent in (("off", off), ("on", on)):
                    collected.setdefault((setting, clients), []).append(measure(agent.url, clients, seconds))
    results = []
    for (setting, clients), runs in collected.items():
        latencies = [lat for lats, _, _ in runs for lat in lats]
        results.append({"model": name, "batching": setting, "clients": clients, "requests": len(latencies),
                        "failed": sum(f for _, f, _ in runs), "rps": len(latencies) / sum(s for _, _, s in runs),
                        **summary_ms(latencies)})
    return sorted(results, key=lambda r: (r["clients"], r["batching"]))


def report(results: list[dict], runtime_only: list[dict], batch: int, delay_us: int, seconds: float,
           rounds: int) -> str:
    """The tables, and per model and client count the throughput ratio and p99s read from the same figures."""
    rows = [(r["model"], r["clients"], f"on (max {batch}, {delay_us} µs)" if r["batching"] == "on" else "off",
             r["requests"], r["failed"], f"{r['rps']:,.0f}", r["p50"], r["p99"]) for r in results]
    by = {(r["model"], r["clients"], r["batching"]): r for r in results}
    lines = [f"### Dynamic batching, one-row requests over REST ({rounds} rounds of {seconds:g} s per setting)", "",
             table(["model", "clients", "batching", "requests", "failed", "requests/s", "p50 ms", "p99 ms"], rows), ""]
    for model in dict.fromkeys(r["model"] for r in results):
        for clients in CLIENTS:
            on, off = by[(model, clients, "on")], by[(model, clients, "off")]
            lines.append(f"{model}, {clients} client(s): batching gives **{on['rps'] / off['rps']:.2f}x** the "
                         f"throughput, p99 {on['p99']:.3f} ms vs {off['p99']:.3f} ms")
    summary = [(r["model"], r["batching"], f"{r['rps']:,.0f}", f"{r['per_call']:.2f}") for r in runtime_only]
    lines += ["", f"The runtime alone, no HTTP: {RUNTIME_THREADS} threads calling ModelRuntime.infer in one "
              f"process for {seconds:g} s each", "",
              table(["model", "batching", "requests/s", "requests per session call"], summary)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from bench import models

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per setting and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-queue-delay-us", type=int, default=0)
    parser.add_argument("--models", default="digits,slow-digits", help="comma-separated: digits, slow-digits")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args(argv)
    makers = {"digits": lambda: models.digits(args.cache).model, "slow-digits": lambda: models.slow_digits(args.cache)}
    chosen = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in makers]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(makers)}")
    policy = BatchPolicy(args.max_batch_size, args.max_queue_delay_us)
    results, runtime_only = [], []
    for name in chosen:
        model = makers[name]()
        results += run(name, model, args.seconds, args.rounds, args.max_batch_size, args.max_queue_delay_us)
        runtime_only += [{"model": name, **measure_runtime(model, batching, RUNTIME_THREADS, args.seconds)}
                         for batching in (None, policy)]
    print(report(results, runtime_only, args.max_batch_size, args.max_queue_delay_us, args.seconds, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
