"""`fleetctl bundle build`: variants, report, golden sets and refusals, on real models."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from bench import models
from edgefleet.common.golden import GoldenSet
from edgefleet.common.hardware import Requirements
from edgefleet.controller.bundle.build import build_bundle
from edgefleet.controller.bundle.evaluate import fp16_as_fp32
from edgefleet.controller.bundle.verify import verify_bundle
from edgefleet.controller.cli import main
from edgefleet.controller.errors import BuildError


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _runner(path: Path):
    session = _session(path)
    names = [o.name for o in session.get_outputs()]
    return lambda inputs: dict(zip(names, session.run(names, inputs), strict=True))


@pytest.fixture(scope="module")
def digits_bundle(digits, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("digits-bundle")
    report = build_bundle(digits.model, "digits", "1.0.0", None, digits.calibration_data, digits.eval_data, out,
                          latency_budget_s=0.2)
    return out, report


def test_digits_builds_every_variant_with_an_honest_report(digits_bundle):
    out, report = digits_bundle
    assert json.loads((out / "report.json").read_text()) == report
    assert [v["variant"] for v in report["variants"]] == ["cpu-fp32", "cpu-int8", "cuda-fp16"]
    assert report["refused"] == []
    reference = report["reference"]
    assert reference["eval"] == "labelled" and reference["top1"] > 0.9
    for entry in report["variants"]:
        acc = entry["accuracy"]
        assert (out / entry["file"]).stat().st_size == entry["size_bytes"]
        assert acc["top1_drop"] <= 0.01 and acc["top1"] == pytest.approx(reference["top1"] - acc["top1_drop"])
        assert 0.9 <= acc["agreement"] <= 1.0
        Requirements.from_dict(entry["requirements"])  # round-trips the wire shape
    fp32, int8, fp16 = report["variants"]
    assert fp32["accuracy"]["max_abs_diff"] < 1e-5
    assert int8["accuracy"]["max_abs_diff"] > 0          # quantization changes numbers: reported, not hidden
    assert int8["size_bytes"] < fp32["size_bytes"]
    assert fp32["latency_ms"]["p50"] > 0 and fp32["latency_ms"]["p99"] >= fp32["latency_ms"]["p50"]
    assert fp16["latency_ms"] is None and "untested" in fp16["note"]
    assert fp16["requirements"]["providers"] == ["CUDAExecutionProvider"]
    assert (fp16["preference"], int8["preference"], fp32["preference"]) == (0, 1, 2)


def test_variants_are_what_they_claim(digits_bundle):
    out, _ = digits_bundle
    fp32 = onnx.load(str(out / "cpu-fp32.onnx"))
    ops = [n.op_type for n in fp32.graph.node]
    assert "MatMul" not in ops and "Add" not in ops            # MatMul+Add fused into (Fused)Gemm
    assert {o.domain for o in fp32.opset_import} <= {"", "ai.onnx.ml", "com.microsoft"}  # no stray imports
    int8 = onnx.load(str(out / "cpu-int8.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in int8.graph.node)  # static QDQ: calibration was given
    fp16 = onnx.load(str(out / "cuda-fp16.onnx"))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in fp16.graph.initializer)
    assert fp16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # keep_io_types


def test_golden_sets_pass_on_their_variant_and_fail_on_a_wrong_model(digits_bundle, wrong_model):
    out, _ = digits_bundle
    assert all(check.passed for check in verify_bundle(out))
    for variant in ("cpu-fp32", "cpu-int8"):
        golden = GoldenSet.load(out / f"{variant}.golden.npz")
        assert golden.top1 and 1 <= golden.samples <= 8
        result = golden.check(_runner(out / f"{variant}.onnx"))
        assert result.passed, result.detail
        wrong = golden.check(_runner(wrong_model))
        assert not wrong.passed and "outside tolerance" in wrong.detail


def test_fp16_weights_cast_back_run_on_cpu(digits_bundle, digits):
    out, _ = digits_bundle
    emulated = fp16_as_fp32(onnx.load(str(out / "cuda-fp16.onnx")))
    assert not any(t.data_type == onnx.TensorProto.FLOAT16 for t in emulated.graph.initializer)
    session = ort.InferenceSession(emulated.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.load(digits.eval_data)[models.DIGITS_INPUT]
    expected = _session(digits.model).run(["probabilities"], {models.DIGITS_INPUT: x})[0]
    got = session.run(["probabilities"], {models.DIGITS_INPUT: x})[0]
    assert 0 < np.abs(got - expected).max() < 0.01


def test_refused_by_the_accuracy_bound(digits, tmp_path):
    (tmp_path / "cpu-int8.onnx").write_bytes(b"stale file from an older build")
    # Static int8 with 7-bit weights loses a sample or two on digits: a zero bound must refuse it.
    report = build_bundle(digits.model, "digits", "1.0.0", ["cpu-fp32", "cpu-int8"], digits.calibration_data,
                          digits.eval_data, tmp_path, max_drop=0.0, latency_budget_s=0.1)
    assert [v["variant"] for v in report["variants"]] == ["cpu-fp32"]
    (refusal,) = report["refused"]
    assert refusal["variant"] == "cpu-int8"
    assert "points of top-1" in refusal["reason"] and "0-point bound" in refusal["reason"]
    assert not (tmp_path / "cpu-int8.onnx").exists()  # the stale file is gone, not mistaken for this build


def test_bad_inputs_are_one_line_build_errors(digits, broken_model, tmp_path):
    def build(model, **kw):
        return build_bundle(model, "digits", "1.0.0", ["cpu-fp32"], out=tmp_path / "out", latency_budget_s=0.1, **kw)

    not_onnx = tmp_path / "notes.onnx"
    not_onnx.write_bytes(b"\x00\xffthis is not a protobuf at all" * 10)
    with pytest.raises(BuildError, match="is not an ONNX"):
        build(not_onnx)
    with pytest.raises(BuildError, match=r"does not load in ONNX Runtime.*EdgefleetNoSuchOp"):
        build(broken_model)
    wrong_shape = tmp_path / "eval.npz"
    np.savez(wrong_shape, input=np.zeros((5, 32), np.float32), labels=np.zeros(5, np.int64))
    with pytest.raises(BuildError, match=r"eval input 'input' has shape \[5, 32\].*float32\[\?,64\]") as e:
        build(digits.model, eval=wrong_shape)
    assert "\n" not in str(e.value)
    no_labels = tmp_path / "nolabels.npz"
    np.savez(no_labels, input=np.zeros((5, 64), np.float32))
    with pytest.raises(BuildError, match="needs one truth array, it has none: an integer array 'labels'"):
        build(digits.model, eval=no_labels)
    with pytest.raises(BuildError, match="unknown variant"):
        build_bundle(digits.model, "digits", "1.0.0", ["tpu-int4"], out=tmp_path / "out")
    assert not (tmp_path / "out" / "report.json").exists()


def _model(nodes: list, inputs: list, outputs: list, initializers: list | None = None) -> onnx.ModelProto:
    graph = onnx.helper.make_graph(nodes, "g", inputs, outputs, initializers or [])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


def hostile_models(tmp_path: Path) -> dict[str, Path]:
    """Models that once made `bundle build` print a traceback: external data that is missing or
    points outside the model's folder, and a model that loads but fails when run."""
    x = onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", 64])
    y = onnx.helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, None)
    weights = onnx.numpy_helper.from_array(np.ones((64, 10), np.float32), "w")
    mlp = _model([onnx.helper.make_node("MatMul", ["input", "w"], ["out"])], [x], [y], [weights])
    (tmp_path / "missing").mkdir()
    onnx.save(mlp, str(tmp_path / "missing" / "model.onnx"), save_as_external_data=True, location="w.bin",
              size_threshold=0)
    (tmp_path / "missing" / "w.bin").unlink()
    escaping = onnx.load(str(tmp_path / "missing" / "model.onnx"), load_external_data=False)
    for entry in escaping.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../../../etc/passwd"
    onnx.save(escaping, str(tmp_path / "escaping.onnx"))
    shape = onnx.numpy_helper.from_array(np.array([7, 7], np.int64), "shape")
    onnx.save(_model([onnx.helper.make_node("Reshape", ["input", "shape"], ["out"])], [x], [y], [shape]),
              str(tmp_path / "fails.onnx"))
    return {"missing": tmp_path / "missing" / "model.onnx", "escaping": tmp_path / "escaping.onnx",
            "fails": tmp_path / "fails.onnx"}


@pytest.mark.parametrize("case, words", [
    ("missing", r"has external data that cannot be read \(.*w\.bin"),
    ("escaping", r"has external data that cannot be read \(.*points outside the directory"),
    ("fails", r"model fails.onnx fails when run on input \[8, 64\]: .*cannot be reshaped"),
])
def test_cli_build_gives_one_line_for_models_it_cannot_use(tmp_path, case, words):
    model = hostile_models(tmp_path)[case]
    done = subprocess.run(
        [sys.executable, "-c", "from edgefleet.controller.cli import main; main()", "bundle", "build", str(model),
         "--name", "m", "--version", "1", "--variant", "cpu-fp32", "-o", str(tmp_path / "out")],
        env={**os.environ, "EDGEFLEET_HOME": str(tmp_path / "home")}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1, done.stderr  # no traceback, and no ONNX Runtime log line
    assert done.stderr.startswith("error: ") and re.search(words, done.stderr), done.stderr


@pytest.mark.slow
def test_resnet50_optimized_and_int8_load_and_run(resnet50, tmp_path):
    rng = np.random.default_rng(7)
    calibration = tmp_path / "calibration.npz"
    arrays: dict[str, Any] = {models.RESNET_INPUT: rng.standard_normal((2, 3, 224, 224)).astype(np.float32)}
    np.savez(calibration, **arrays)
    out = tmp_path / "bundle"
    report = build_bundle(resnet50, "resnet50", "1.0.0", ["cpu-fp32", "cpu-int8"], calibration, None, out,
                          latency_budget_s=0.5)
    assert [v["variant"] for v in report["variants"]] == ["cpu-fp32", "cpu-int8"], report["refused"]
    assert report["reference"]["eval"] == "synthetic" and report["reference"]["metric"] is None
    fp32, int8 = report["variants"]
    ops = [n.op_type for n in onnx.load(str(out / "cpu-fp32.onnx")).graph.node]
    assert "BatchNormalization" not in ops and fp32["op_count"] < report["reference"]["op_count"]  # BN folded
    assert int8["size_bytes"] < fp32["size_bytes"] / 3                                          # int8 weights
    x = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)
    for entry in (fp32, int8):
        (logits,) = _session(out / entry["file"]).run(None, {models.RESNET_INPUT: x})
        assert logits.shape == (1, 1000) and np.isfinite(logits).all()
    assert all(check.passed for check in verify_bundle(out))


def test_cli_build_table_json_and_verify(digits, tmp_path):
    runner = CliRunner()
    out = tmp_path / "out"
    args = ["bundle", "build", str(digits.model), "--name", "digits", "--version", "1.0.0",
            "--variant", "cpu-fp32", "--eval", str(digits.eval_data), "-o", str(out)]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    header = result.output.splitlines()[0].split()
    assert header[:3] == ["VARIANT", "SIZE_BYTES", "OPS"] and "AGREEMENT" in header
    assert any(line.startswith("cpu-fp32") for line in result.output.splitlines())
    as_json = runner.invoke(main, [*args, "--format", "json"])
    assert json.loads(as_json.output)["variants"][0]["variant"] == "cpu-fp32"
    verify = runner.invoke(main, ["bundle", "verify", str(out), "--format", "json"])
    assert verify.exit_code == 0 and json.loads(verify.output)[0]["passed"] is True
    bad = runner.invoke(main, [*args[:2], str(tmp_path / "missing.onnx"), *args[3:]])
    assert bad.exit_code != 0


def test_cli_publish_signs_every_built_variant(digits_bundle, tmp_path, monkeypatch):
    from edgefleet.controller.signing import Repository
    from edgefleet.controller.store.local import LocalStore

    out, report = digits_bundle
    home = tmp_path / "home"
    Repository.create(home, LocalStore(home / "store"))
    monkeypatch.setenv("EDGEFLEET_HOME", str(home))
    result = CliRunner().invoke(main, ["bundle", "publish", str(out), "--format", "json"])
    assert result.exit_code == 0, result.output
    published = json.loads(result.stdout)
    assert sorted(i["variant"] for i in published) == sorted(v["variant"] for v in report["variants"])
    assert {i["release"] for i in published} == {1}
    # no controller runs here: the signed targets stand, and the operator is told who will list them
    assert "the controller was not told" in result.stderr
