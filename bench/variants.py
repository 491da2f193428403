"""Benchmark 8, variants of real models: what each variant of PP-OCR's three models costs and keeps.

For the text-direction classifier, the text recognizer and the text detector
(bench/ocr.py: rapidocr-onnxruntime 1.4.4's pretrained models, rendered
labelled sets), ``fleetctl bundle build``'s own code builds cpu-fp32, cpu-int8
and cuda-fp16 with the default bound (one point of the task metric) and prints,
per model and variant: file size, operator count, latency on this CPU (one
thread, batch of one, after warm-up), the task metric on the held-out set, its
drop from the source model, agreement with the source, and whether the build
accepted the variant.

    python -m bench.variants                 # the full sets (bench/ocr.py FULL)
    python -m bench.variants --small         # a few samples each, for a smoke run
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from bench import ocr
from bench._common import DEFAULT_CACHE, table
from edgefleet.controller.accuracy import task_metric
from edgefleet.controller.bundle.build import build_bundle

TITLES = {"cls": "text direction (MobileNetV3)", "rec": "text recognizer (SVTR)", "det": "text detector (DBNet)"}
SMALL = {"cls": (32, 8), "rec": (12, 4), "det": (6, 3)}


def rows(task: str, report: dict[str, Any]) -> list[list[object]]:
    ref = report["reference"]
    metric = ref["metric"]
    out = [_row(task, "(source)", ref, {metric: ref[metric], "cer": ref.get("cer")}, "-")]
    out += [_row(task, v["variant"], v, v["accuracy"], "accepted") for v in report["variants"]]
    out += [_row(task, r["variant"], r, r.get("accuracy", {}), "refused: " + r["reason"].split(" (")[0])
            for r in report["refused"]]
    return out


def _row(task: str, variant: str, entry: dict[str, Any], accuracy: dict[str, Any], verdict: str) -> list[object]:
    latency = entry.get("latency_ms") or {}
    found = task_metric(accuracy)
    metric, value = found if found else ("-", None)
    drop = accuracy.get(f"{metric}_drop")
    return [
        task, variant, f"{entry.get('size_bytes', 0) / 1024:,.0f}" if entry.get("size_bytes") else "-",
        entry.get("op_count", "-"), latency.get("p50", "- (no GPU)"), latency.get("p99", "-"),
        f"{metric} {value:.3f}" if value is not None else "-",
        f"{0.0 - drop * 100:+.2f}" if drop else ("+0.00" if drop == 0 else "-"),
        f"{accuracy['cer']:.4f}" if accuracy.get("cer") is not None else "-",
        f"{accuracy['agreement']:.3f}" if accuracy.get("agreement") is not None else "-",
        verdict,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--latency-seconds", type=float, default=3.0, help="timed runs per model, at least 100")
    args = parser.parse_args()
    sizes = SMALL if args.small else ocr.FULL
    found: list[list[object]] = []
    notes = []
    for task, (eval_count, calibration_count) in sizes.items():
        files = ocr.task_set(args.cache, task, eval_count, calibration_count)
        with tempfile.TemporaryDirectory() as out:
            report = build_bundle(files.model, task, "1.0.0", None, files.calibration_data, files.eval_data,
                                  Path(out), latency_budget_s=0.2 if args.small else args.latency_seconds)
        found += rows(task, report)
        notes.append(f"- {task}: {TITLES[task]}, `{files.model.name}`; {eval_count} held-out samples "
                     f"(calibration: {calibration_count} others)")
    print(table(["model", "variant", "size KiB", "ops", "p50 ms", "p99 ms", "task metric", "change (points)",
                 "CER", "agreement", "build"], found))
    print()
    print("\n".join(notes))
    print("- latency: this CPU, one ORT thread, batch of one, after warm-up; cuda-fp16 is evaluated on the CPU "
          "(fp16 weights, CPU kernels) and has no latency here: its GPU numbers are untested")


if __name__ == "__main__":
    main()
