"""A pipeline bundle: several models that move as one unit (OCR: detector, classifier, recognizer).

It is made from member bundles already built (``fleetctl bundle build``: each with its
variants, task metrics and golden sets). For every variant all members have, the
members' files are merged into one ONNX graph whose names carry the member's
prefix (``det/x``, ``cls/x``, ``rec/x`` ...) and their golden sets into one. The
pipeline is then an ordinary bundle: one signed target per variant, one golden set,
so a device verifies, gates (golden set and benchmark of the whole), activates and
rolls it back as one unit on the same path as any model, and the desired state
names it as one entry. The members' task metrics travel in the variant's accuracy
as ``<member>.<metric>``.

A merged graph runs as one session: a request feeds every member's inputs.
Serving members one at a time is the several-models-per-device work (issue 15).
"""
from __future__ import annotations

import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import compose, helper

from edgefleet.common.errors import GoldenFormatError
from edgefleet.common.fs import atomic_write
from edgefleet.common.golden import GoldenSet
from edgefleet.common.protocol import NAME

from ..errors import BuildError, InvalidInput
from .build import _providers_work, _publish_file, _remove_stale, _write
from .evaluate import LATENCY_THREADS, MIN_LATENCY_RUNS, cpu_session, measure_latency, run
from .report import REPORT, BundleReport, ReportedVariant
from .variants import CUDA_FP16, VARIANTS, select

GOLDEN_SAMPLES = 2  # per member; the detector's and recognizer's tensors are large


def build_pipeline(name: str, version: str, members: dict[str, Path], out: Path, *,
                   latency_budget_s: float = 2.0, latency_runs: int = MIN_LATENCY_RUNS) -> dict[str, Any]:
    """Merge the built bundles ``members`` (member name -> bundle directory) into a pipeline bundle in ``out``."""
    for label, value in (("name", name), ("version", version), *(("member", m) for m in members)):
        if not NAME.match(value) or "/" in value:
            raise BuildError(f"{label} {value!r} is invalid: use letters, digits, '.', '_' or '-'")
    if len(members) < 2:
        raise BuildError("a pipeline needs at least two members, e.g. --member det=out-det --member rec=out-rec")
    try:
        reports = {member: BundleReport.read(path) for member, path in members.items()}
    except InvalidInput as e:
        raise BuildError(str(e)) from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "model": name, "version": version, "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "members": {m: {"model": r.model, "version": r.version} for m, r in reports.items()},
        "variants": [], "refused": [],
    }
    timing = (latency_budget_s, latency_runs)
    with tempfile.TemporaryDirectory(dir=out, prefix=".staging-") as staging:
        for variant in select(None):
            chosen = {m: next((v for v in r.variants if v.name == variant.name), None) for m, r in reports.items()}
            missing = sorted(m for m, v in chosen.items() if v is None)
            if len(missing) == len(chosen):
                continue
            try:
                if missing:
                    raise BuildError(f"{variant.name}: member(s) {', '.join(missing)} have no {variant.name} variant")
                found = {m: v for m, v in chosen.items() if v is not None}
                report["variants"].append(_merge_variant(variant.name, found, Path(staging), out, timing))
            except BuildError as e:
                _remove_stale(out, variant.name)
                report["refused"].append({"variant": variant.name, "reason": str(e)})
    text = json.dumps(report, indent=2, sort_keys=True).encode()
    _write(out / REPORT, lambda path: atomic_write(path, text))
    return report


def _merge_variant(variant: str, members: dict[str, ReportedVariant], staging: Path, out: Path,
                   timing: tuple[float, int]) -> dict[str, Any]:
    merged = merge_models({m: onnx.load(str(v.file)) for m, v in members.items()})
    golden = merge_golden({m: v.golden for m, v in members.items()})
    staged = staging / f"{variant}.onnx"
    onnx.save(merged, str(staged))
    session, emulated = cpu_session(staged, fp16=variant == CUDA_FP16, threads=LATENCY_THREADS)
    names = [o.name for o in session.get_outputs()]
    check = golden.check(lambda feed: dict(zip(names, run(session, names, feed, variant), strict=True)))
    if not check.passed:
        raise BuildError(f"{variant}: the merged pipeline does not reproduce its members' golden sets: {check.detail}")
    runs_here = not emulated and _providers_work(VARIANTS[variant].providers)
    sample = {k: v[:1] for k, v in golden.inputs.items()}
    latency = measure_latency(session, sample, timing[0], variant, timing[1]) if runs_here else None
    size = staged.stat().st_size
    _publish_file(staged, out / staged.name)
    golden_name = f"{variant}.golden.npz"
    _write(out / golden_name, lambda path: golden.save(path))
    entry: dict[str, Any] = {
        "variant": variant, "file": staged.name, "golden": golden_name,
        "requirements": VARIANTS[variant].requirements(size).to_dict(),
        "preference": VARIANTS[variant].preference,
        "size_bytes": size, "op_count": len(merged.graph.node),
        "latency_ms": latency.to_dict() if latency else None,
        "accuracy": {f"{m}.{k}": value for m, v in members.items() for k, value in v.accuracy.items()},
    }
    if not runs_here:
        entry["note"] = f"evaluated on this machine's CPU; latency and numerics on {variant}'s provider are untested"
    return entry


def merge_models(models: dict[str, onnx.ModelProto]) -> onnx.ModelProto:
    """One graph holding every member side by side, each name prefixed ``<member>/``."""
    opsets: dict[str, int] = {}
    for member, model in models.items():
        for o in model.opset_import:
            domain = o.domain or ""
            if domain == "" and opsets.get("", o.version) != o.version:
                raise BuildError(
                    f"member {member} uses ONNX opset {o.version}, another member {opsets['']}; "
                    "build the members with one ONNX Runtime so their opsets agree")
            opsets[domain] = max(opsets.get(domain, 0), o.version)
    parts = {m: compose.add_prefix(model, f"{m}/") for m, model in models.items()}
    for member, part in parts.items():
        _prefix_dims(part.graph, f"{member}/")
    graph = helper.make_graph(
        nodes=[n for p in parts.values() for n in p.graph.node],
        name="+".join(parts),
        inputs=[i for p in parts.values() for i in p.graph.input],
        outputs=[o for p in parts.values() for o in p.graph.output],
        initializer=[t for p in parts.values() for t in p.graph.initializer],
        value_info=[v for p in parts.values() for v in p.graph.value_info],
    )
    merged = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opsets.items())])
    merged.ir_version = max(m.ir_version for m in models.values())
    merged.functions.extend(f for p in parts.values() for f in p.functions)
    for member, model in models.items():  # e.g. the recognizer's character list, which decoding needs
        merged.metadata_props.extend(
            onnx.StringStringEntryProto(key=f"{member}/{p.key}", value=p.value) for p in model.metadata_props)
    # No onnx.checker here: ORT's own fusions (LayerNormalization at opset 13) are valid to ORT,
    # which loads and golden-checks the merged graph right after.
    return merged


def _prefix_dims(graph: onnx.GraphProto, prefix: str) -> None:
    """Symbolic dimensions are graph-wide: ORT takes two uses of one name for the same size.
    Exports name them alike (Paddle's ``p2o.DynamicDimension.0``), so each member keeps its own."""
    for value in (*graph.input, *graph.output, *graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param"):
                dim.dim_param = prefix + dim.dim_param


def merge_golden(goldens: dict[str, Path]) -> GoldenSet:
    """The members' golden sets as one: the first GOLDEN_SAMPLES samples of each, names prefixed,
    the loosest tolerance (every member's outputs are probabilities in [0, 1])."""
    try:
        sets = {m: GoldenSet.load(path) for m, path in goldens.items()}
    except GoldenFormatError as e:
        raise BuildError(f"a member's golden set cannot be read: {e}") from e
    count = min(GOLDEN_SAMPLES, *(s.samples for s in sets.values()))
    inputs = {f"{m}/{k}": np.ascontiguousarray(v[:count]) for m, s in sets.items() for k, v in s.inputs.items()}
    outputs = {f"{m}/{k}": np.ascontiguousarray(v[:count]) for m, s in sets.items() for k, v in s.outputs.items()}
    return GoldenSet(inputs, outputs, atol=max(s.atol for s in sets.values()),
                     rtol=max(s.rtol for s in sets.values()), top1=False)
