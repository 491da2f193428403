"""Bring an exported model into the shape the variant makers expect, without changing what it computes.

Real exports differ from the graphs the converters are written for: Paddle's
keep every weight in a ``Constant`` node (so the quantizer and the fp16
converter find no initializer to work on), leave BatchNormalization unfolded,
and target opset 11, where QuantizeLinear has no per-channel axis. Every variant
is made from the normalized graph; the accuracy checks still compare against
the operator's original model.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import onnx
from onnx import helper, numpy_helper, version_converter

MIN_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear (the axis attribute) needs 13


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Move the main graph's tensor-valued Constant nodes into initializers; return how many moved."""
    graph = model.graph
    kept, moved = [], 0
    for node in graph.node:
        value = _constant_tensor(node)
        if value is None:
            kept.append(node)
            continue
        tensor = numpy_helper.from_array(numpy_helper.to_array(value), node.output[0])
        graph.initializer.append(tensor)
        moved += 1
    del graph.node[:]
    graph.node.extend(kept)
    return moved


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.attribute) != 1:
        return None
    attr = node.attribute[0]
    return attr.t if attr.name == "value" else None  # value_float(s)/int(s) are rare; left as they are


def normalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constants to initializers, opset raised to 13, then ORT's basic offline optimization
    (constant folding, BatchNorm and Add folded into Conv, redundant nodes removed).

    The basic level emits only standard ONNX operators, so the result runs anywhere
    the source did (and on the GPU provider the fp16 variant targets).
    """
    import onnxruntime as ort

    out = onnx.ModelProto()
    out.CopyFrom(model)
    constants_to_initializers(out)
    if _default_opset(out) < MIN_OPSET:
        out = version_converter.convert_version(out, MIN_OPSET)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 4  # a failure is the caller's one-line BuildError
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "normalized.onnx"
        options.optimized_model_filepath = str(path)
        ort.InferenceSession(out.SerializeToString(), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(str(path))
    portable(optimized, model.ir_version)
    return optimized


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def portable(model: onnx.ModelProto, ir_version: int) -> None:
    """Drop the opset imports ORT adds but no node uses, and keep the oldest IR version the
    remaining opsets allow, so an older ORT on a device accepts what a newer ORT here saved."""
    used = {node.domain for node in model.graph.node} | {""}
    kept = [o for o in model.opset_import if o.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    needed = helper.find_min_ir_version_for(list(kept), ignore_unknown=True)
    model.ir_version = max(ir_version, needed)
