"""Build a bundle: every requested variant, its golden set, and the report (OUT/report.json).

Files appear atomically: each variant is made in a staging directory inside
OUT and renamed into place once it has passed; report.json is written last.
Re-running the build over the same OUT replaces the bundle.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from edgefleet.common.errors import StorageError
from edgefleet.common.fs import atomic_write
from edgefleet.common.protocol import NAME

from ..accuracy import TITLES
from ..errors import BuildError
from .data import Dataset, load_dataset, synthetic_dataset
from .evaluate import (
    LATENCY_THREADS,
    MIN_LATENCY_RUNS,
    Accuracy,
    Latency,
    compare,
    cpu_session,
    measure_latency,
    open_session,
    run_all,
    score_output,
)
from .golden import make_golden
from .report import REPORT
from .source import SourceModel, load_source, one_line
from .tasks import task_of
from .variants import CUDA_FP16, Variant, select

if TYPE_CHECKING:
    import onnxruntime as ort

DEFAULT_MAX_DROP = 0.01  # one point of the task metric (top-1, exact match, box F1)


def build_bundle(
    model: Path,
    name: str,
    version: str,
    variants: list[str] | None = None,
    calibration: Path | None = None,
    eval: Path | None = None,  # noqa: A002 - the CLI's and the report's word
    out: Path = Path("bundle"),
    max_drop: float = DEFAULT_MAX_DROP,
    *,
    latency_budget_s: float = 2.0,
    latency_runs: int = MIN_LATENCY_RUNS,
) -> dict[str, Any]:
    """Build ``variants`` (default: every one that fits) of ``model`` into ``out``; return the report."""
    for label, value in (("name", name), ("version", version)):
        if not NAME.match(value):
            raise BuildError(f"{label} {value!r} is invalid: use letters, digits, '.', '_' or '-'")
    if not 0 <= max_drop <= 1:
        raise BuildError(f"max drop {max_drop} must be a fraction between 0 and 1")
    chosen = select(variants)
    source = load_source(Path(model))
    evalset = load_dataset(eval, source.inputs, "eval", labelled=True) if eval else synthetic_dataset(source.inputs)
    calib = load_dataset(calibration, source.inputs, "calibration", labelled=False) if calibration else None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    builder = _Builder(source, evalset, calib, out, max_drop, _Timing(latency_budget_s, latency_runs))
    report: dict[str, Any] = {
        "model": name,
        "version": version,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "reference": builder.reference_entry(),
        "variants": [],
        "refused": [],
    }
    with tempfile.TemporaryDirectory(dir=out, prefix=".staging-") as staging:
        for variant in chosen:
            try:
                report["variants"].append(builder.build(variant, Path(staging)))
            except BuildError as e:
                _remove_stale(out, variant.name)
                measured = e.measured if isinstance(e, OutOfBound) else {}
                report["refused"].append({"variant": variant.name, "reason": str(e), **measured})
    text = json.dumps(report, indent=2, sort_keys=True).encode()
    _write(out / REPORT, lambda path: atomic_write(path, text))
    return report


class OutOfBound(BuildError):
    """A variant that was built and measured, and loses more of its task metric than the bound allows."""

    def __init__(self, message: str, measured: dict[str, Any]) -> None:
        super().__init__(message)
        self.measured = measured  # size, ops, latency and accuracy, as an accepted variant's entry has them


@dataclass(frozen=True)
class _Timing:
    budget_s: float  # seconds of timed runs per model, at least...
    runs: int        # ...this many runs

    def measure(self, session: ort.InferenceSession, data: Dataset, what: str) -> Latency:
        return measure_latency(session, data.take(slice(0, 1)), self.budget_s, what, self.runs)


class _Builder:
    """Shared state of one build: the source, its reference outputs and scores, the bounds."""

    def __init__(self, source: SourceModel, evalset: Dataset, calibration: Dataset | None, out: Path,
                 max_drop: float, timing: _Timing) -> None:
        self.source, self.evalset, self.calibration, self.out = source, evalset, calibration, out
        self.max_drop, self.timing = max_drop, timing
        self.score = score_output(source.outputs)
        self.task = task_of(evalset.truth, source.outputs)
        session = open_session(source.proto.SerializeToString(), LATENCY_THREADS)
        what = f"model {source.path.name}"
        self.reference = run_all(session, evalset, what)
        self.reference_scores = self.task.score(self.reference[self.task.output]) if self.task else None
        self.reference_latency = timing.measure(session, evalset, what)

    def reference_entry(self) -> dict[str, Any]:
        entry = {
            "file": self.source.path.name,
            "size_bytes": self.source.path.stat().st_size,
            "op_count": len(self.source.proto.graph.node),
            "latency_ms": self.reference_latency.to_dict(),
            "samples": self.evalset.count,
            "eval": "synthetic" if self.evalset.synthetic else "labelled",
            "metric": self.task.metric if self.task else None,
            "score_output": self.score,
        }
        return entry | {k: round(v, 6) for k, v in (self.reference_scores or {}).items()}

    def build(self, variant: Variant, staging: Path) -> dict[str, Any]:
        reason = variant.unfit(self.source, self.calibration)
        if reason:
            raise BuildError(f"{variant.name} does not fit this model: {reason}")
        staged = staging / f"{variant.name}.onnx"
        try:
            variant.make(self.source, staged, self.calibration)
        except Exception as e:  # converters raise anything; one line names the variant
            if isinstance(e, BuildError):
                raise
            raise BuildError(f"{variant.name} could not be built: {one_line(e)}") from e
        session, emulated = cpu_session(staged, fp16=variant.name == CUDA_FP16, threads=LATENCY_THREADS)
        outputs = run_all(session, self.evalset, variant.name)
        accuracy = compare(self.reference, outputs, self.task, self.reference_scores, self.score)
        if accuracy.max_abs_diff == float("inf"):
            raise BuildError(f"{variant.name} produces non-finite outputs on the eval set")
        runs_here = not emulated and _providers_work(variant.providers)
        # Measured before the bound is checked: a refusal shows what the variant would have cost and saved.
        latency = self.timing.measure(session, self.evalset, variant.name) if runs_here else None
        size = staged.stat().st_size
        measured = {
            "size_bytes": size,
            "op_count": len(onnx.load(str(staged)).graph.node),
            "latency_ms": latency.to_dict() if latency else None,
            "accuracy": accuracy.to_dict(),
        }
        self._check_bound(variant.name, accuracy, measured)

        golden = make_golden(self.evalset, outputs, self.score, variant.golden_rtol)
        _publish_file(staged, self.out / staged.name)
        golden_name = f"{variant.name}.golden.npz"
        _write(self.out / golden_name, lambda path: golden.save(path))
        entry = {
            "variant": variant.name,
            "file": staged.name,
            "golden": golden_name,
            "requirements": variant.requirements(size).to_dict(),
            "preference": variant.preference,
            **measured,
        }
        if not runs_here:
            how = "fp16 weights cast back to fp32" if emulated else "ONNX Runtime's CPU kernels"
            entry["note"] = (f"evaluated on this machine's CPU with {how}; "
                             f"latency and numerics on {', '.join(variant.providers)} are untested")
        return entry

    def _check_bound(self, name: str, accuracy: Accuracy, measured: dict[str, Any]) -> None:
        if accuracy.drop is not None and accuracy.drop > self.max_drop + 1e-9:
            assert accuracy.metric is not None and accuracy.value is not None  # the drop is measured from them
            before = accuracy.value + accuracy.drop
            raise OutOfBound(
                f"{name} loses {accuracy.drop * 100:.2f} points of {TITLES[accuracy.metric]} "
                f"({before * 100:.2f}% -> {accuracy.value * 100:.2f}%), above the "
                f"{self.max_drop * 100:g}-point bound; give better --calibration data or raise --max-drop",
                measured)


def _providers_work(providers: tuple[str, ...]) -> bool:
    import onnxruntime as ort

    return set(providers) <= set(ort.get_available_providers())


def _publish_file(staged: Path, dest: Path) -> None:
    with open(staged, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(staged, dest)


def _write(path: Path, write: Callable[[Path], object]) -> None:
    try:
        write(path)
    except StorageError as e:
        raise BuildError(f"cannot write {path}: {e}") from e


def _remove_stale(out: Path, variant: str) -> None:
    """A refused variant must not leave an older build's file looking current."""
    for suffix in (".onnx", ".golden.npz"):
        (out / f"{variant}{suffix}").unlink(missing_ok=True)
