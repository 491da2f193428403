"""Hardware-specialized variants of one model: how each is made and what it needs.

Each is made from the source's normalized graph (normalize.py: constants as
initializers, opset >= 13, BatchNorm folded), not from the file as exported.

cpu-fp32   ORT offline optimization at the EXTENDED level (BatchNorm folded into
           Conv, MatMul+Add -> Gemm, Conv/Gemm+activation fusions). The fused ops
           are ORT CPU contrib ops present in every standard ORT build on every
           architecture; the layout level (ALL, NCHWc) is x86-specific and not used.
cpu-int8   onnxruntime.quantization: static QDQ (weights per output channel) with a
           calibration reader when calibration data is given, dynamic (MatMul/Gemm
           only) otherwise.
cuda-fp16  float16 conversion keeping float32 inputs and outputs.
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader

from edgefleet.common.hardware import Requirements

from ..errors import BuildError
from .data import Dataset
from .normalize import portable
from .source import SourceModel

CPU_FP32, CPU_INT8, CUDA_FP16 = "cpu-fp32", "cpu-int8", "cuda-fp16"
QUANTIZABLE_DYNAMIC = ("MatMul", "Gemm")  # ConvInteger has no fast CPU kernel: convs need static QDQ
QUANTIZABLE = ("Conv", *QUANTIZABLE_DYNAMIC)
ARENA_OVERHEAD_MB = 64  # ORT session, arena and activations beyond twice the weights


@dataclass(frozen=True)
class Variant:
    name: str
    preference: int         # lower is preferred when there is no evidence (INTERFACES.md)
    providers: tuple[str, ...]
    arch: tuple[str, ...]   # empty: any
    golden_rtol: float      # tolerance of the golden set, relative to each output's scale
    make: Callable[[SourceModel, Path, Dataset | None], None]
    unfit: Callable[[SourceModel, Dataset | None], str | None]  # why it cannot be built, or None

    def requirements(self, size_bytes: int) -> Requirements:
        return Requirements(
            arch=self.arch,
            providers=self.providers,
            min_memory_mb=2 * -(-size_bytes // 1024**2) + ARENA_OVERHEAD_MB,
        )


def _portable(path: Path, source: SourceModel) -> None:
    model = onnx.load(str(path))
    portable(model, source.proto.ir_version)
    onnx.save(model, str(path))


def make_fp32(source: SourceModel, dest: Path, _calibration: Dataset | None) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(dest)
    ort.InferenceSession(source.normalized.SerializeToString(), options, providers=["CPUExecutionProvider"])
    _portable(dest, source)


class _Reader(CalibrationDataReader):
    """Calibration samples from a Dataset, one per batch."""

    def __init__(self, data: Dataset) -> None:
        self._batches = iter(range(data.count))
        self._data = data

    def get_next(self) -> dict[str, np.ndarray] | None:
        index = next(self._batches, None)
        return None if index is None else self._data.take(slice(index, index + 1))

    def rewind(self) -> None:
        self._batches = iter(range(self._data.count))


def make_int8(source: SourceModel, dest: Path, calibration: Dataset | None) -> None:
    from onnxruntime.quantization import (
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_dynamic,
        quantize_static,
    )

    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Shape inference and BN/Gemm fusion first, as ORT recommends before quantizing. Symbolic
        # shape inference (for transformers' dynamic shapes) gives up on real CNN exports such as
        # Paddle's; ONNX's own shape inference still runs.
        # A path, not the proto: given a ModelProto, quant_pre_process moves its weights to external data.
        normalized = Path(tmp) / "normalized.onnx"
        onnx.save(source.normalized, str(normalized))
        quant_pre_process(str(normalized), str(prepared), skip_symbolic_shape=True)
        if calibration is None:
            quantize_dynamic(prepared, dest, op_types_to_quantize=list(QUANTIZABLE_DYNAMIC),
                             weight_type=QuantType.QInt8)
            return
        quantize_static(
            prepared, dest, _Reader(calibration), quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
            # 7-bit weights: no u8s8 saturation on x86 without VNNI, so no CPU feature is required.
            reduce_range=True,
            # ORT's per-channel bias-scale adjustment crashes on Gemm biases of shape [1, N];
            # the accuracy check below catches a bias that loses precision instead.
            extra_options={"QDQDisableWeightAdjustForInt32Bias": True},
        )


def make_fp16(source: SourceModel, dest: Path, _calibration: Dataset | None) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.ModelProto()
    model.CopyFrom(source.normalized)
    onnx.save(convert_float_to_float16(model, keep_io_types=True), str(dest))


def _int8_unfit(source: SourceModel, calibration: Dataset | None) -> str | None:
    ops = source.op_types
    if not any(ops[op] for op in QUANTIZABLE):
        return f"the model has no {'/'.join(QUANTIZABLE)} operator to quantize"
    if calibration is None and ops["Conv"]:
        return "a convolutional model is quantized statically only: give --calibration DATA.npz"
    return None


def _fp16_unfit(source: SourceModel, _calibration: Dataset | None) -> str | None:
    return None if source.has_float_weights else "the model has no float32 weights to convert"


VARIANTS: dict[str, Variant] = {
    v.name: v for v in (
        Variant(CUDA_FP16, 0, ("CUDAExecutionProvider",), ("x86_64", "aarch64"), 0.02, make_fp16, _fp16_unfit),
        Variant(CPU_INT8, 1, ("CPUExecutionProvider",), (), 0.05, make_int8, _int8_unfit),
        Variant(CPU_FP32, 2, ("CPUExecutionProvider",), (), 1e-3, make_fp32, lambda _s, _c: None),
    )
}


def select(names: list[str] | None) -> list[Variant]:
    """The requested variants in a stable order, or all of them."""
    unknown = sorted(set(names or ()) - set(VARIANTS))
    if unknown:
        raise BuildError(f"unknown variant {', '.join(unknown)}: choose from {', '.join(sorted(VARIANTS))}")
    return [v for v in VARIANTS.values() if not names or v.name in names][::-1]
