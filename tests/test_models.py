"""bench/models.py: the offline models behave as the gate and build tests assume."""
from __future__ import annotations

import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from bench import models


def _session(path, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _eval(digits):
    data = np.load(digits.eval_data, allow_pickle=False)
    return data[models.DIGITS_INPUT], data["labels"]


def test_digits_is_a_real_classifier(digits):
    x, labels = _eval(digits)
    calibration = np.load(digits.calibration_data, allow_pickle=False)[models.DIGITS_INPUT]
    assert x.dtype == np.float32 and x.shape[1] == 64 and labels.dtype.kind == "i"
    assert calibration.shape[1] == 64 and len(calibration) >= 100
    label, scores = _session(digits.model).run(["label", models.DIGITS_SCORES], {models.DIGITS_INPUT: x})
    assert scores.shape == (len(x), 10) and scores.dtype == np.float32  # zipmap off
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)
    assert np.mean(label == labels) > 0.9


def test_cache_reuses_files_and_is_reproducible(tmp_path, digits):
    again = models.digits(digits.model.parent)
    assert again == digits
    fresh = models.wrong_digits(tmp_path)
    assert fresh.name.startswith(models.WRONG_VERSION)
    mtime = fresh.stat().st_mtime_ns
    assert models.wrong_digits(tmp_path).stat().st_mtime_ns == mtime  # cached, not rebuilt
    assert not list(tmp_path.glob(".*.tmp"))                           # no temp files left behind


def test_wrong_digits_same_io_wrong_answers(digits, wrong_model):
    x, labels = _eval(digits)
    right = _session(digits.model)
    wrong = _session(wrong_model)
    assert [(i.name, i.shape) for i in wrong.get_inputs()] == [(i.name, i.shape) for i in right.get_inputs()]
    assert [o.name for o in wrong.get_outputs()] == [o.name for o in right.get_outputs()]
    label = wrong.run(["label"], {models.DIGITS_INPUT: x})[0]
    assert np.mean(label == labels) < 0.2


def test_slow_digits_same_outputs_and_much_slower(digits, slow_model):
    x, _ = _eval(digits)
    fast, slow = _session(digits.model), _session(slow_model)  # ORT_ENABLE_ALL: nothing folds the chain away
    np.testing.assert_allclose(slow.run(None, {models.DIGITS_INPUT: x})[1],
                               fast.run(None, {models.DIGITS_INPUT: x})[1], atol=1e-6)

    def best_of(session, n=30):
        sample = {models.DIGITS_INPUT: x[:1]}
        times = []
        for _ in range(n):
            start = time.perf_counter()
            session.run(None, sample)
            times.append(time.perf_counter() - start)
        return min(times)

    assert best_of(slow) > 10 * best_of(fast)  # a ratio, not a wall-clock bound


def test_broken_model_is_onnx_but_does_not_load(broken_model):
    assert onnx.load(str(broken_model)).graph.node[0].op_type == "EdgefleetNoSuchOp"
    with pytest.raises(Exception, match="EdgefleetNoSuchOp"):
        _session(broken_model)


def test_resnet50_has_the_layer_structure(resnet50):
    model = onnx.load(str(resnet50), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Conv") == 53 and ops.count("BatchNormalization") == 53  # BN kept for the optimizer
    assert ops.count("Add") == 16                                              # 3+4+6+3 bottlenecks
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    assert 25_000_000 < params < 26_000_000
    session = _session(resnet50)
    x = np.random.default_rng(1).standard_normal((2, 3, 224, 224)).astype(np.float32)
    (logits,) = session.run(None, {models.RESNET_INPUT: x})
    assert logits.shape == (2, 1000) and np.isfinite(logits).all()
    assert session.get_inputs()[0].shape[0] == "batch"  # dynamic batch
