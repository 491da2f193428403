"""Measure a variant on this machine: latency, and numerics against the fp32 reference."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from ..errors import BuildError
from .data import Dataset
from .source import TensorSpec, one_line, open_session
from .tasks import Task, same_class

if TYPE_CHECKING:
    import onnxruntime as ort

EVAL_BATCH = 16
# Latency is measured on one thread (the machine may be shared, and a device's cores
# are its own to count), after warm-up, over enough runs for a p99 to mean something.
LATENCY_THREADS = 1
WARMUP_RUNS = 5
MIN_LATENCY_RUNS = 100


@dataclass(frozen=True)
class Latency:
    p50: float  # milliseconds, batch of 1, this machine, LATENCY_THREADS threads
    p99: float
    runs: int

    def to_dict(self) -> dict[str, float | int]:
        return {"p50": self.p50, "p99": self.p99, "runs": self.runs, "threads": LATENCY_THREADS}


@dataclass(frozen=True)
class Accuracy:
    metric: str | None          # the task metric (tasks.py): top1, exact_match, box_f1; None without truth
    value: float | None         # the task metric on the held-out set
    drop: float | None          # the source's value - this value (0.01 = one point)
    agreement: float | None     # share of samples where this variant answers what the source answers
    max_abs_diff: float         # over every float output, vs the source
    others: dict[str, float] = field(default_factory=dict)  # the task's other measures (cer)

    def to_dict(self) -> dict[str, float]:
        """Flat, as TUF custom fields carry it: {top1: .., top1_drop: .., agreement: .., max_abs_diff: ..}."""
        out: dict[str, float | None] = {"agreement": self.agreement, "max_abs_diff": self.max_abs_diff}
        if self.metric is not None:
            out |= {self.metric: self.value, f"{self.metric}_drop": self.drop, **self.others}
        return {k: round(v, 6) for k, v in out.items() if v is not None}


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
    session: ort.InferenceSession, sample: dict[str, np.ndarray], budget_s: float, what: str,
    min_runs: int = MIN_LATENCY_RUNS, max_runs: int = 2000,
) -> Latency:
    """p50/p99 of ``session`` on one sample: warm-up first, then at least ``min_runs`` runs,
    more while ``budget_s`` lasts."""
    for _ in range(WARMUP_RUNS):
        run(session, None, sample, what)
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() < deadline):
        start = time.perf_counter()
        session.run(None, sample)
        times.append((time.perf_counter() - start) * 1000)
    p50, p99 = np.percentile(times, [50, 99])
    return Latency(round(float(p50), 3), round(float(p99), 3), len(times))


def score_output(outputs: tuple[TensorSpec, ...]) -> str | None:
    """The class-score output of a classifier: the first float output of rank 2."""
    return next((o.name for o in outputs if o.dtype.kind == "f" and len(o.shape) == 2), None)


def compare(reference: dict[str, np.ndarray], outputs: dict[str, np.ndarray], task: Task | None,
            reference_scores: dict[str, float] | None, score: str | None) -> Accuracy:
    """This variant against the source: the task metric and its drop when there is truth,
    agreement (on the task's output, else on the class-score output ``score``), max |diff|."""
    floats = [n for n, ref in reference.items() if ref.dtype.kind == "f"]
    diffs = [float(np.max(np.abs(outputs[n].astype(np.float64) - reference[n].astype(np.float64)), initial=0.0))
             for n in floats]
    if not all(np.isfinite(outputs[n]).all() for n in floats):
        diffs.append(float("inf"))
    max_diff = max(diffs, default=0.0)
    if task is None:
        agreement = None if score is None else same_class(reference[score], outputs[score])
        return Accuracy(None, None, None, agreement, max_diff)
    assert reference_scores is not None  # measured once per build, with the task
    mine = task.score(outputs[task.output])
    value = mine.pop(task.metric)
    return Accuracy(task.metric, value, reference_scores[task.metric] - value,
                    task.agreement(reference[task.output], outputs[task.output]), max_diff, mine)


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


def cpu_session(path: Path, fp16: bool, threads: int | None = None) -> tuple[ort.InferenceSession, bool]:
    """A CPU session of the variant, or of its fp32 emulation when fp16 kernels are missing.

    Returns (session, emulated).
    """
    try:
        return open_session(path, threads), False
    except Exception as e:  # ORT raises several unrelated types for a bad model
        if not fp16:
            raise BuildError(f"variant {path.name} does not load in ONNX Runtime: {one_line(e)}") from e
    try:
        return open_session(fp16_as_fp32(onnx.load(str(path))).SerializeToString(), threads), True
    except Exception as e:
        raise BuildError(f"variant {path.name} cannot be evaluated on this CPU: {one_line(e)}") from e
