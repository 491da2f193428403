"""Dynamic batching: throughput and latency with 1 and 8 concurrent clients, batching off and on.

The agent runs as a real process (``fleet-agent serve MODEL``, then the same
with ``--max-batch-size`` and ``--max-queue-delay-us``); each client is a
process of its own sending one-row binary OIP requests back to back on a
keep-alive connection for ``--seconds``. The settings take turns over
``--rounds`` rounds (both agents run throughout; only one is loaded at a time)
so that the machine's drift hits them alike; throughput is
all clients' answered requests per second, latencies are per request.

    python -m bench.batching [--seconds 2] [--rounds 5] [--max-batch-size 8] [--max-queue-delay-us 500]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from multiprocessing.synchronize import Event
from pathlib import Path

import numpy as np

from bench._common import DEFAULT_CACHE, OipClient, ServeProcess, summary_ms, table

WARMUP = 20


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


def run(model: Path, seconds: float, rounds: int, batch: int, delay_us: int) -> list[dict]:
    settings = {"off": (), "on": ("--max-batch-size", str(batch), "--max-queue-delay-us", str(delay_us))}
    collected: dict[tuple[str, int], list[tuple[list[float], int, float]]] = {}
    # both agents up at once (the idle one costs nothing): the settings take turns slice by slice
    with ServeProcess(model, "digits", *settings["off"]) as off, ServeProcess(model, "digits", *settings["on"]) as on:
        for _ in range(rounds):
            for clients in (1, 8):
                for name, agent in (("off", off), ("on", on)):
                    collected.setdefault((name, clients), []).append(measure(agent.url, clients, seconds))
    results = []
    for (name, clients), runs in collected.items():
        latencies = [lat for lats, _, _ in runs for lat in lats]
        results.append({"batching": name, "clients": clients, "requests": len(latencies),
                        "failed": sum(f for _, f, _ in runs), "rps": len(latencies) / sum(s for _, _, s in runs),
                        **summary_ms(latencies)})
    return sorted(results, key=lambda r: (r["clients"], r["batching"]))


def report(results: list[dict], batch: int, delay_us: int, seconds: float, rounds: int) -> str:
    """The table, and per client count the throughput ratio and p99s read from the same figures."""
    rows = [(r["clients"], f"on (max {batch}, {delay_us} µs)" if r["batching"] == "on" else "off", r["requests"],
             r["failed"], f"{r['rps']:,.0f}", r["p50"], r["p99"]) for r in results]
    by = {(r["clients"], r["batching"]): r for r in results}
    lines = [f"### Dynamic batching, digits, one-row requests ({rounds} rounds of {seconds:g} s per setting)", "",
             table(["clients", "batching", "requests", "failed", "requests/s", "p50 ms", "p99 ms"], rows), ""]
    for clients in (1, 8):
        on, off = by[(clients, "on")], by[(clients, "off")]
        lines.append(f"{clients} client(s): batching gives **{on['rps'] / off['rps']:.2f}x** the throughput, "
                     f"p99 {on['p99']:.3f} ms vs {off['p99']:.3f} ms")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from bench import models

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per setting and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-queue-delay-us", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args(argv)
    model = models.digits(args.cache).model
    results = run(model, args.seconds, args.rounds, args.max_batch_size, args.max_queue_delay_us)
    print(report(results, args.max_batch_size, args.max_queue_delay_us, args.seconds, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
