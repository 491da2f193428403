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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import onnx

from edgefleet.common.errors import StorageError
from edgefleet.common.fs import atomic_write
from edgefleet.common.protocol import NAME

from ..errors import BuildError
from .data import Dataset, load_dataset, synthetic_dataset
from .evaluate import (
    Accuracy,
    compare,
    cpu_session,
    measure_latency,
    open_session,
    run_all,
    score_output,
    top1,
)
from .golden import make_golden
from .report import REPORT
from .source import SourceModel, load_source, one_line
from .variants import CUDA_FP16, Variant, select

DEFAULT_MAX_TOP1_DROP = 0.01  # one point of top-1 accuracy


def build_bundle(
    model: Path,
    name: str,
    version: str,
    variants: list[str] | None = None,
    calibration: Path | None = None,
    eval: Path | None = None,  # noqa: A002 - the CLI's and the report's word
    out: Path = Path("bundle"),
    max_top1_drop: float = DEFAULT_MAX_TOP1_DROP,
    *,
    latency_budget_s: float = 2.0,
) -> dict[str, Any]:
    """Build ``variants`` (default: every one that fits) of ``model`` into ``out``; return the report."""
    for label, value in (("name", name), ("version", version)):
        if not NAME.match(value):
            raise BuildError(f"{label} {value!r} is invalid: use letters, digits, '.', '_' or '-'")
    if not 0 <= max_top1_drop <= 1:
        raise BuildError(f"max top-1 drop {max_top1_drop} must be a fraction between 0 and 1")
    chosen = select(variants)
    source = load_source(Path(model))
    evalset = load_dataset(eval, source.inputs, "eval", labelled=True) if eval else synthetic_dataset(source.inputs)
    calib = load_dataset(calibration, source.inputs, "calibration", labelled=False) if calibration else None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    builder = _Builder(source, evalset, calib, out, max_top1_drop, latency_budget_s)
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
                report["refused"].append({"variant": variant.name, "reason": str(e)})
    text = json.dumps(report, indent=2, sort_keys=True).encode()
    _write(out / REPORT, lambda path: atomic_write(path, text))
    return report


class _Builder:
    """Shared state of one build: the source, its reference outputs, the bounds."""

    def __init__(self, source: SourceModel, evalset: Dataset, calibration: Dataset | None, out: Path,
                 max_top1_drop: float, latency_budget_s: float) -> None:
        self.source, self.evalset, self.calibration, self.out = source, evalset, calibration, out
        self.max_top1_drop, self.latency_budget_s = max_top1_drop, latency_budget_s
        self.score = score_output(source.outputs)
        session = open_session(source.proto.SerializeToString())
        what = f"model {source.path.name}"
        self.reference = run_all(session, evalset, what)
        self.reference_latency = measure_latency(session, evalset.take(slice(0, 1)), latency_budget_s, what)

    def reference_entry(self) -> dict[str, Any]:
        labels, score = self.evalset.labels, self.score
        return {
            "file": self.source.path.name,
            "size_bytes": self.source.path.stat().st_size,
            "op_count": len(self.source.proto.graph.node),
            "latency_ms": {"p50": self.reference_latency.p50, "p99": self.reference_latency.p99},
            "samples": self.evalset.count,
            "eval": "synthetic" if self.evalset.synthetic else "labelled",
            "top1": round(top1(self.reference[score], labels), 6) if labels is not None and score is not None else None,
            "score_output": self.score,
        }

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
        session, emulated = cpu_session(staged, fp16=variant.name == CUDA_FP16)
        outputs = run_all(session, self.evalset, variant.name)
        accuracy = compare(self.reference, outputs, self.evalset.labels, self.score)
        self._check_bound(variant.name, accuracy)
        runs_here = not emulated and _providers_work(variant.providers)
        sample = self.evalset.take(slice(0, 1))
        latency = measure_latency(session, sample, self.latency_budget_s, variant.name) if runs_here else None

        golden = make_golden(self.evalset, outputs, self.score, variant.golden_rtol)
        op_count = len(onnx.load(str(staged)).graph.node)
        size = staged.stat().st_size
        _publish_file(staged, self.out / staged.name)
        golden_name = f"{variant.name}.golden.npz"
        _write(self.out / golden_name, lambda path: golden.save(path))
        entry = {
            "variant": variant.name,
            "file": staged.name,
            "golden": golden_name,
            "requirements": variant.requirements(size).to_dict(),
            "preference": variant.preference,
            "size_bytes": size,
            "op_count": op_count,
            "latency_ms": {"p50": latency.p50, "p99": latency.p99} if latency else None,
            "accuracy": accuracy.to_dict(),
        }
        if not runs_here:
            how = "fp16 weights cast back to fp32" if emulated else "ONNX Runtime's CPU kernels"
            entry["note"] = (f"evaluated on this machine's CPU with {how}; "
                             f"latency and numerics on {', '.join(variant.providers)} are untested")
        return entry

    def _check_bound(self, name: str, accuracy: Accuracy) -> None:
        if accuracy.max_abs_diff == float("inf"):
            raise BuildError(f"{name} produces non-finite outputs on the eval set")
        if accuracy.top1_drop is not None and accuracy.top1_drop > self.max_top1_drop + 1e-9:
            assert accuracy.top1 is not None  # the drop is measured from it
            before = accuracy.top1 + accuracy.top1_drop
            raise BuildError(
                f"{name} loses {accuracy.top1_drop * 100:.2f} points of top-1 "
                f"({before * 100:.2f}% -> {accuracy.top1 * 100:.2f}%), above the "
                f"{self.max_top1_drop * 100:g}-point bound; give better --calibration data or raise --max-top1-drop")


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
