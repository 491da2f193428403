"""Measure a variant on this machine: latency, and numerics against the fp32 reference."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from ..errors import BuildError
from .data import Dataset
from .source import TensorSpec, one_line, open_session

if TYPE_CHECKING:
    import onnxruntime as ort

EVAL_BATCH = 64
WARMUP_RUNS = 3
MIN_LATENCY_RUNS = 10


@dataclass(frozen=True)
class Latency:
    p50: float  # milliseconds, batch of 1, this machine
    p99: float
    runs: int


@dataclass(frozen=True)
class Accuracy:
    top1: float | None          # vs labels; None without a labelled eval set
    agreement: float | None     # share of samples whose top-1 matches the reference
    max_abs_diff: float         # over every float output, vs the reference
    top1_drop: float | None     # reference top1 - this top1 (0.01 = one point)

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def run(session: ort.InferenceSession, names: list[str] | None, feed: dict[str, np.ndarray], what: str) -> list:
    """``session.run``; a model that fails at run time is a one-line BuildError naming ``what``."""
    try:
        return session.run(names, feed)
    except Exception as e:  # ORT raises several unrelated types (Fail, InvalidArgument, ...)
        raise BuildError(f"{what} fails when run on {_batch(feed)}: {one_line(e)}") from e


def _batch(feed: dict[str, np.ndarray]) -> str:
    return ", ".join(f"{name} {list(value.shape)}" for name, value in feed.items())


def run_all(session: ort.InferenceSession, data: Dataset, what: str) -> dict[str, np.ndarray]:
    """Outputs for every sample, in batches (of 1 when the model's batch size is fixed)."""
    fixed = any(isinstance(i.shape[0], int) for i in session.get_inputs() if i.shape)
    batch = 1 if fixed else EVAL_BATCH
    names = [o.name for o in session.get_outputs()]
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for start in range(0, data.count, batch):
        for name, value in zip(names, run(session, names, data.take(slice(start, start + batch)), what), strict=True):
            parts[name].append(value)
    return {n: np.concatenate(v) for n, v in parts.items()}


def measure_latency(
    session: ort.InferenceSession, sample: dict[str, np.ndarray], budget_s: float, what: str, max_runs: int = 500
) -> Latency:
    for _ in range(WARMUP_RUNS):
        run(session, None, sample, what)
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < max_runs and (len(times) < MIN_LATENCY_RUNS or time.perf_counter() < deadline):
        start = time.perf_counter()
        session.run(None, sample)
        times.append((time.perf_counter() - start) * 1000)
    p50, p99 = np.percentile(times, [50, 99])
    return Latency(round(float(p50), 3), round(float(p99), 3), len(times))


def score_output(outputs: tuple[TensorSpec, ...]) -> str | None:
    """The class-score output of a classifier: the first float output of rank 2."""
    return next((o.name for o in outputs if o.dtype.kind == "f" and len(o.shape) == 2), None)


def top1(scores: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(scores.argmax(axis=1) == labels))


def compare(reference: dict[str, np.ndarray], outputs: dict[str, np.ndarray],
            labels: np.ndarray | None, score: str | None) -> Accuracy:
    diffs = [
        float(np.max(np.abs(outputs[n].astype(np.float64) - ref.astype(np.float64)), initial=0.0))
        for n, ref in reference.items() if ref.dtype.kind == "f"
    ]
    if not all(np.isfinite(outputs[n]).all() for n, ref in reference.items() if ref.dtype.kind == "f"):
        diffs.append(float("inf"))
    if score is None:
        return Accuracy(None, None, max(diffs, default=0.0), None)
    agreement = float(np.mean(outputs[score].argmax(axis=1) == reference[score].argmax(axis=1)))
    if labels is None:
        return Accuracy(None, agreement, max(diffs, default=0.0), None)
    mine, theirs = top1(outputs[score], labels), top1(reference[score], labels)
    return Accuracy(mine, agreement, max(diffs, default=0.0), theirs - mine)


def fp16_as_fp32(model: onnx.ModelProto) -> onnx.ModelProto:
    """An fp32 graph with the fp16 model's rounded weights, for CPUs without fp16 kernels.

    Activations stay fp32, so this measures the weight rounding only; the numbers
    on a GPU are not measured by it.
    """
    from onnx import TensorProto, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    for i, tensor in enumerate(graph.initializer):
        if tensor.data_type == TensorProto.FLOAT16:
            graph.initializer[i].CopyFrom(
                numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name))
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT16:
                attr.i = TensorProto.FLOAT
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT16:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float32)))
    for value in (*graph.value_info, *graph.input, *graph.output):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    return out


def cpu_session(path: Path, fp16: bool) -> tuple[ort.InferenceSession, bool]:
    """A CPU session of the variant, or of its fp32 emulation when fp16 kernels are missing.

    Returns (session, emulated).
    """
    try:
        return open_session(path), False
    except Exception as e:  # ORT raises several unrelated types for a bad model
        if not fp16:
            raise BuildError(f"variant {path.name} does not load in ONNX Runtime: {one_line(e)}") from e
    try:
        return open_session(fp16_as_fp32(onnx.load(str(path))).SerializeToString()), True
    except Exception as e:
        raise BuildError(f"variant {path.name} cannot be evaluated on this CPU: {one_line(e)}") from e
