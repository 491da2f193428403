"""Variants of real pretrained models (PP-OCR via rapidocr's wheel) scored on rendered, labelled sets."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from bench import ocr
from edgefleet.controller.bundle.build import build_bundle
from edgefleet.controller.bundle.normalize import normalize
from edgefleet.controller.bundle.tasks import Detection, Recognition, box_f1, db_boxes, edit_distance
from edgefleet.controller.bundle.verify import verify_bundle
from tests.conftest import ocr_set


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


@pytest.fixture(scope="module")
def cls_set(ocr_models, model_cache) -> ocr.TaskSet:
    return ocr_set(model_cache, "cls", 64, 16)


@pytest.fixture(scope="module")
def cls_bundle(cls_set, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cls-bundle")
    report = build_bundle(cls_set.model, "textdir", "1.0.0", None, cls_set.calibration_data, cls_set.eval_data,
                          out, latency_budget_s=0.1)
    return out, report


def test_normalize_turns_paddle_constants_into_initializers_and_folds_batchnorm(cls_set):
    source = onnx.load(str(cls_set.model))
    assert _ops(source)["Constant"] > 300 and not source.graph.initializer  # the export as Paddle writes it
    normalized = normalize(source)
    ops = _ops(normalized)
    assert ops["Constant"] == 0 and ops["BatchNormalization"] == 0 and len(normalized.graph.initializer) > 50
    assert next(o.version for o in normalized.opset_import if o.domain == "") >= 13
    x = np.load(cls_set.eval_data)[ocr.INPUT][:8]
    before, after = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
                     for m in (source, normalized))
    assert np.abs(before - after).max() < 1e-4


def test_real_classifier_builds_every_variant_scored_on_true_labels(cls_bundle):
    out, report = cls_bundle
    assert report["refused"] == [], report["refused"]
    ref = report["reference"]
    assert ref["metric"] == "top1" and ref["top1"] >= 0.95  # the pretrained model reads rendered text
    assert ref["latency_ms"]["threads"] == 1 and ref["latency_ms"]["runs"] >= 100
    fp32, int8, fp16 = report["variants"]
    for entry in report["variants"]:
        acc = entry["accuracy"]
        assert acc["top1"] == pytest.approx(ref["top1"] - acc["top1_drop"]) and acc["top1_drop"] <= 0.01
        assert acc["agreement"] >= 0.95
    assert _ops(onnx.load(str(out / fp32["file"])))["BatchNormalization"] == 0
    int8_model = onnx.load(str(out / int8["file"]))
    per_channel = [n for n in int8_model.graph.node if n.op_type == "DequantizeLinear"
                   and any(a.name == "axis" for a in n.attribute)]
    assert per_channel and int8["size_bytes"] < fp32["size_bytes"] * 0.7  # int8 weights, per output channel
    fp16_model = onnx.load(str(out / fp16["file"]))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in fp16_model.graph.initializer)
    assert fp16["latency_ms"] is None and "untested" in fp16["note"]  # no GPU here: said, not hidden
    assert all(check.passed for check in verify_bundle(out))


def test_int8_calibrated_on_blank_images_is_refused_naming_the_metric(cls_set, tmp_path):
    blank = tmp_path / "blank.npz"
    np.savez(blank, x=np.zeros((4, 3, *ocr.CLS_SHAPE), np.float32))
    report = build_bundle(cls_set.model, "textdir", "1.0.0", ["cpu-int8"], blank, cls_set.eval_data, tmp_path / "out",
                          latency_budget_s=0.1, latency_runs=10)
    (refusal,) = report["refused"]
    assert "\n" not in refusal["reason"]
    assert refusal["reason"].startswith("cpu-int8 loses") and "points of top-1" in refusal["reason"]
    assert refusal["accuracy"]["top1_drop"] > 0.01 and refusal["size_bytes"] > 0  # what it would have cost
    assert not (tmp_path / "out" / "cpu-int8.onnx").exists()


@pytest.mark.parametrize("task,sizes,metric", [("rec", (12, 4), "exact_match"), ("det", (6, 3), "box_f1")])
def test_recognizer_and_detector_int8_scored_on_their_task(ocr_models, model_cache, tmp_path, task, sizes, metric):
    files = ocr_set(model_cache, task, *sizes)
    report = build_bundle(files.model, task, "1.0.0", ["cpu-int8"], files.calibration_data, files.eval_data,
                          tmp_path, max_drop=1.0, latency_budget_s=0.1, latency_runs=10)
    ref = report["reference"]
    assert ref["metric"] == metric and ref[metric] >= 0.75
    (int8,) = report["variants"]
    assert int8["accuracy"][f"{metric}_drop"] == pytest.approx(ref[metric] - int8["accuracy"][metric])
    assert 0 <= int8["accuracy"]["agreement"] <= 1
    if task == "rec":
        assert 0 <= int8["accuracy"]["cer"] <= 1 and "cer" in ref


def test_ctc_greedy_decode_exact_match_and_cer():
    # classes: 0 blank, 1 'a', 2 'b', 3 space (ignored); two samples of four steps
    def steps(*classes: int) -> np.ndarray:
        return np.eye(4, dtype=np.float32)[list(classes)]

    outputs = np.stack([steps(1, 1, 0, 1), steps(2, 3, 0, 2)])  # "aa" (blank splits the repeat), "bb"
    truth = np.array([[1, 1, -1], [2, 3, 1]])                   # "aa", "b a" -> "ba" with the space ignored
    task = Recognition("y", truth, frozenset({3}))
    assert task.decode(outputs) == [(1, 1), (2, 2)]
    assert task.score(outputs) == {"exact_match": 0.5, "cer": 0.25}  # one substitution in four characters
    assert task.agreement(outputs, outputs[::-1]) == 0.0
    assert edit_distance((1, 2, 3), (2, 3)) == 1 and edit_distance((), (1, 1)) == 2


def test_db_postprocess_and_box_f1():
    prob = np.zeros((40, 60), np.float32)
    prob[10:14, 5:45] = 0.9      # a shrunk text kernel, grown back by area x 1.6 / perimeter
    prob[30:32, 50:52] = 0.9     # too small: noise
    prob[20:26, 5:20] = 0.35     # above the pixel threshold, below the region's mean-score threshold
    (box,) = db_boxes(prob)
    grow = 4 * 40 * 1.6 / (2 * 44)
    assert box == pytest.approx([5 - grow, 10 - grow, 45 + grow, 14 + grow])
    truth = np.array([[0, 5, 50, 19], [-1, -1, -1, -1]], np.float32)
    task = Detection("p", truth[None])
    assert task.score(prob[None, None]) == {"box_f1": 1.0}
    assert box_f1([box[None]], [np.array([[30, 5, 60, 19]], np.float32)]) == 0.0  # IoU below 0.5
    assert box_f1([np.zeros((0, 4))], [np.zeros((0, 4))]) == 1.0
