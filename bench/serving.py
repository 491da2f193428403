"""Serving overhead: an Open Inference Protocol request vs a raw InferenceSession.run.

The agent runs as a real process (``fleet-agent serve MODEL``), as on a device;
this process loads the same model file with the same session options and
times, query after query in turn, its raw ``InferenceSession.run`` and one
request over each REST mode, each on its own keep-alive connection (binary
tensor extension, JSON tensors); then, in a second pass, the raw run and
gRPC (when grpcio is installed). Requests are encoded once; every answer is
read whole. "Added" is the request's time minus the raw run's, p50 against
p50 (the raw run's figures are those of the REST pass).

    python -m bench.serving [--models digits,resnet50] [--queries 2000] [--resnet-queries 300]
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench._common import DEFAULT_CACHE, OipClient, ServeProcess, free_port, summary_ms, table
from edgefleet.agent.bench import synthesize
from edgefleet.agent.runtime import _DATATYPE_OF, ModelRuntime, RuntimeOptions
from edgefleet.common.protocol import ModelRef

WARMUP = 5
JSON_MAX_VALUES = 100_000  # JSON for a 150k-float image measures the JSON codec, not the server
MODES = ("raw", "rest-binary", "rest-json", "grpc")


def _interleaved(calls: dict[str, Callable[[], object]], queries: int) -> dict[str, list[float]]:
    """Time each call ``queries`` times, round-robin, so drift (CPU clock, neighbours) hits all modes alike;
    each round starts one mode later, so that no mode always follows the same one (the call after the raw
    run found the agent's caches cold: in a fixed order, the REST binary mode paid for that every time)."""
    for call in calls.values():
        for _ in range(WARMUP):
            call()
    modes = list(calls)
    times: dict[str, list[float]] = {mode: [] for mode in calls}
    for i in range(queries):
        for mode in modes[i % len(modes):] + modes[:i % len(modes)]:
            started = time.perf_counter()
            calls[mode]()
            times[mode].append(time.perf_counter() - started)
    return times


def _ok(status: int) -> None:
    if status != 200:
        raise RuntimeError(f"the server answered HTTP {status}")


def _grpc_available() -> bool:
    try:
        import grpc  # noqa: F401 - the agent's grpc extra
    except ImportError:
        return False
    return True


def _grpc_call(port: int, name: str, inputs: dict[str, np.ndarray]) -> tuple[Callable[[], object], Callable[[], None]]:
    """A prepared ModelInfer call on the agent's gRPC port (request encoded once), and its close."""
    import grpc

    from edgefleet.agent._proto import grpc_predict_v2_pb2 as pb
    from edgefleet.agent.grpc_serve import SERVICE

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    infer = channel.unary_unary(f"/{SERVICE}/ModelInfer", request_serializer=pb.ModelInferRequest.SerializeToString,
                                response_deserializer=pb.ModelInferResponse.FromString)
    request = pb.ModelInferRequest(model_name=name)
    for key, value in inputs.items():
        request.inputs.add(name=key, datatype=_DATATYPE_OF[value.dtype], shape=value.shape)
        request.raw_input_contents.append(np.ascontiguousarray(value).tobytes())
    return (lambda: infer(request)), channel.close


def measure(name: str, path: Path, queries: int, threads: int) -> dict:
    runtime = ModelRuntime(RuntimeOptions(intra_op_threads=threads))
    loaded = runtime.load(path, ModelRef(model=name, version="1", variant="cpu-fp32"))
    session = loaded.session
    assert session is not None
    inputs = synthesize(loaded.inputs, batch=1)
    grpc_port = free_port() if _grpc_available() else None
    grpc_option = ("--grpc", f"127.0.0.1:{grpc_port}") if grpc_port else ()
    with ServeProcess(path, name, "--threads", str(threads), "--max-request-bytes", str(64 << 20),
                      *grpc_option) as agent:
        binary, json_ = OipClient(agent.url, name), OipClient(agent.url, name)
        binary_request = binary.prepare(inputs, binary=True)
        calls: dict[str, Callable[[], object]] = {
            "raw": lambda: session.run(None, inputs),
            "rest-binary": lambda: _ok(binary.send(binary_request)),
        }
        if sum(v.size for v in inputs.values()) <= JSON_MAX_VALUES:
            json_request = json_.prepare(inputs, binary=False)
            calls["rest-json"] = lambda: _ok(json_.send(json_request))
        grpc = _grpc_call(grpc_port, name, inputs) if grpc_port else None
        try:
            # REST and gRPC in passes of their own, each interleaved with the raw run: a client speaks one
            # protocol, and gRPC's far larger code path would leave the caches cold for the REST call after it
            times = _interleaved(calls, queries)
            if grpc is not None:
                times["grpc"] = _interleaved({"raw": calls["raw"], "grpc": grpc[0]}, queries)["grpc"]
        finally:
            binary.close()
            json_.close()
            if grpc is not None:
                grpc[1]()
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
    parser.add_argument("--resnet-queries", type=int, default=300, help="queries per mode for resnet50")
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
