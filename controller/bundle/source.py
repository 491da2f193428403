"""The operator's model file: validated once, before any variant is built."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from ..errors import BuildError
from .normalize import normalize

if TYPE_CHECKING:
    import onnxruntime as ort

MAX_MODEL_BYTES = 2 * 1024**3  # protobuf's hard limit; larger models need external data


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]  # ints are fixed, str/None are dynamic

    def describe(self) -> str:
        dims = ",".join("?" if not isinstance(d, int) else str(d) for d in self.shape)
        return f"{self.dtype}[{dims}]"


@dataclass(frozen=True)
class SourceModel:
    path: Path
    proto: onnx.ModelProto
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @cached_property
    def normalized(self) -> onnx.ModelProto:
        """The graph every variant is made from (normalize.py); BuildError if it cannot be made."""
        try:
            return normalize(self.proto)
        except Exception as e:  # the converter and ORT raise anything; one line names the step
            raise BuildError(f"model {self.path.name} could not be normalized for conversion: {one_line(e)}") from e

    @property
    def op_types(self) -> Counter:
        return op_histogram(self.normalized)

    @property
    def has_float_weights(self) -> bool:
        return any(t.data_type == onnx.TensorProto.FLOAT for t in self.normalized.graph.initializer)


def op_histogram(model: onnx.ModelProto) -> Counter:
    return Counter(node.op_type for node in model.graph.node)


def one_line(error: BaseException) -> str:
    """The first line of a foreign error's message (ORT's run over several lines)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor = value.type.tensor_type
    dims = tuple(
        d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim
    )
    return TensorSpec(value.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)), dims)


def open_session(model: Path | bytes, threads: int | None = None) -> ort.InferenceSession:
    """A CPU session that leaves reporting failures to its caller (ORT would also log them to stderr).

    ``threads`` fixes ORT's intra-op threads (None: ORT's default, one per core)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: a failure is the caller's one-line BuildError
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def load_source(path: Path) -> SourceModel:
    """Parse the file as ONNX and make sure ONNX Runtime can load it; BuildError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise BuildError(f"model {path} does not exist")
    if path.stat().st_size > MAX_MODEL_BYTES:
        raise BuildError(f"model {path} is larger than 2 GiB; models with external data are not supported")
    try:
        proto = onnx.load(str(path))
    except onnx.checker.ValidationError as e:  # external data: missing, not a file, or outside the model's folder
        raise BuildError(
            f"model {path} has external data that cannot be read ({one_line(e)}); "
            "keep its data files beside it, or save it as one file") from e
    except OSError as e:
        raise BuildError(f"model {path} or its external data cannot be read: {e.strerror or e}") from e
    except (DecodeError, ValueError, RuntimeError) as e:
        raise BuildError(f"model {path} is not an ONNX file ({type(e).__name__}); give a .onnx model") from e
    if not proto.graph.node or not proto.graph.input:
        raise BuildError(f"model {path} is not an ONNX model: it has no graph")
    try:
        open_session(proto.SerializeToString())
    except Exception as e:  # ORT raises several unrelated types for a bad model
        raise BuildError(f"model {path} does not load in ONNX Runtime: {one_line(e)}") from e
    initializers = {t.name for t in proto.graph.initializer}
    return SourceModel(
        path=path,
        proto=proto,
        inputs=tuple(_spec(v) for v in proto.graph.input if v.name not in initializers),
        outputs=tuple(_spec(v) for v in proto.graph.output),
    )
