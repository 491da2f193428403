"""Open Inference Protocol (KServe v2) bodies: tensors in and out, no I/O.

Shared by the REST front end (JSON and the binary tensor data extension) and
the gRPC one, so both refuse the same bad requests with the same one-line errors.
"""
from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from edgefleet.common import jsonlimit

from .errors import RequestError
from .runtime import DATATYPES, LoadedModel

log = logging.getLogger(__name__)

OnInference = Callable[[dict[str, np.ndarray], dict[str, np.ndarray], LoadedModel], None]


def notify(hook: OnInference | None, inputs: dict, outputs: dict, loaded: LoadedModel) -> None:
    """Run the sampling hook after an answer went out; its failure never reaches the request."""
    if hook is None:
        return
    try:
        hook(inputs, outputs, loaded)
    except Exception:  # sampling must never fail a request
        log.exception("inference hook failed; the request was still answered")

MAX_JSON_DEPTH = 64    # an input's nested "data" lists are as deep as its rank
_LITTLE_ENDIAN = sys.byteorder == "little"  # binary tensors travel little-endian


def decode_request(
    body: bytes, header_length: int | None, max_bytes: int | None = None
) -> tuple[dict, dict[str, np.ndarray]]:
    """Split an infer body into its JSON header and input arrays (binary extension aware).

    ``max_bytes`` bounds what any input's shape may declare (default: the body's size).
    """
    if header_length is None:
        header_length = len(body)
    if not 0 <= header_length <= len(body):
        raise RequestError(f"Inference-Header-Content-Length {header_length} exceeds the body ({len(body)} bytes)")
    try:
        request = jsonlimit.loads(body[:header_length], MAX_JSON_DEPTH)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"request body is not valid JSON: {e}") from None
    if not isinstance(request, dict):
        raise RequestError("request body must be a JSON object")
    tensors = request.get("inputs")
    if not isinstance(tensors, list) or not tensors:
        raise RequestError('request needs a non-empty "inputs" list')
    binary = memoryview(body)[header_length:]
    offset = 0
    inputs: dict[str, np.ndarray] = {}
    for tensor in tensors:
        name, dtype, shape, count = _tensor_header(tensor, len(body) if max_bytes is None else max_bytes)
        if name in inputs:
            raise RequestError(f"input {name!r} is given twice")
        size = _binary_size(tensor)
        if size is not None:
            if offset + size > len(binary):
                raise RequestError(
                    f"input {name!r} declares {size} binary bytes; the body has {len(binary) - offset} left"
                )
            inputs[name] = from_bytes(name, binary[offset:offset + size], dtype, shape, count)
            offset += size
        elif "data" in tensor:
            inputs[name] = from_values(name, tensor["data"], dtype, shape, count)
        else:
            raise RequestError(f'input {name!r} has neither "data" nor a "binary_data_size" parameter')
    if offset != len(binary):
        raise RequestError(f"the body carries {len(binary) - offset} binary bytes that no input claims")
    return request, inputs


def _tensor_header(tensor: Any, max_bytes: int) -> tuple[str, np.dtype, tuple[int, ...], int]:
    """Name, dtype, shape and element count of one input, its declared size bounded by ``max_bytes``."""
    if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
        raise RequestError('every input must be an object with a "name"')
    name = tensor["name"]
    return (name, *check_tensor(name, tensor.get("datatype"), tensor.get("shape"), max_bytes))


def check_tensor(name: str, datatype: Any, shape: Any, max_bytes: int) -> tuple[np.dtype, tuple[int, ...], int]:
    """dtype, shape and element count of one declared input, its size bounded by ``max_bytes``."""
    dtype = DATATYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise RequestError(f"input {name!r} has datatype {datatype!r}; supported: {', '.join(DATATYPES)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise RequestError(f'input {name!r} needs "shape" as a list of non-negative integers')
    if len(shape) > MAX_JSON_DEPTH:
        raise RequestError(f"input {name!r} has {len(shape)} dimensions; at most {MAX_JSON_DEPTH} are accepted")
    # Python ints: numpy's int64 product would wrap (or raise) on a hostile shape
    count = math.prod(shape)
    if any(d > max_bytes for d in shape) or count * dtype.itemsize > max_bytes:
        raise RequestError(f"input {name!r} declares shape {shape}; a request holds at most {max_bytes} bytes")
    return dtype, tuple(shape), count


def _binary_size(tensor: dict) -> int | None:
    parameters = tensor.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise RequestError(f'input {tensor["name"]!r} has "parameters" that are not an object')
    size = parameters.get("binary_data_size")
    if size is None:
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise RequestError(f'input {tensor["name"]!r} has an invalid binary_data_size {size!r}')
    return size


def from_bytes(name: str, data: memoryview | bytes, dtype: np.dtype, shape: tuple[int, ...], count: int) -> np.ndarray:
    """An input from its little-endian bytes (the binary extension, gRPC's raw contents)."""
    expected = count * dtype.itemsize
    if len(data) != expected:
        raise RequestError(f"input {name!r} has {len(data)} binary bytes; shape {list(shape)} needs {expected}")
    if _LITTLE_ENDIAN:  # the wire's byte order: the bytes are used in place
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    return np.frombuffer(data, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(shape)


def from_values(name: str, data: Any, dtype: np.dtype, shape: tuple[int, ...], count: int) -> np.ndarray:
    """An input from a (nested) sequence of numbers (JSON "data", gRPC's typed contents)."""
    try:
        array = np.asarray(data, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as e:
        raise RequestError(f"input {name!r} data does not convert to {dtype}: {e}") from None
    if array.size != count:
        raise RequestError(f"input {name!r} has {array.size} values; shape {list(shape)} needs {count}")
    return array.reshape(shape)


def requested_outputs(request: dict, loaded: LoadedModel) -> list[tuple[str, bool]]:
    """(output name, as binary) in answer order: the requested ones, else all."""
    parameters = request.get("parameters") or {}
    binary_default = bool(isinstance(parameters, dict) and parameters.get("binary_data_output", False))
    wanted = request.get("outputs")
    if wanted is None:
        return [(spec.name, binary_default) for spec in loaded.outputs]
    if not isinstance(wanted, list):
        raise RequestError('"outputs" must be a list')
    known = {spec.name for spec in loaded.outputs}
    chosen = []
    for output in wanted:
        if not isinstance(output, dict) or output.get("name") not in known:
            name = output.get("name") if isinstance(output, dict) else output
            raise RequestError(f"unknown output {name!r}; the model gives {', '.join(sorted(known))}")
        params = output.get("parameters") or {}
        chosen.append((output["name"], bool(params.get("binary_data", binary_default))))
    return chosen


def output_bytes(value: np.ndarray) -> bytes:
    """An output's bytes as the wire carries them: C order, little-endian."""
    value = np.ascontiguousarray(value)
    return value.tobytes() if _LITTLE_ENDIAN else value.astype(value.dtype.newbyteorder("<")).tobytes()


def encode_response(
    request: dict, loaded: LoadedModel, outputs: dict[str, np.ndarray], wanted: list[tuple[str, bool]]
) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the JSON header's length."""
    specs = loaded.output_specs
    tensors, chunks = [], []
    for name, binary in wanted:
        value = outputs[name]
        tensor: dict[str, Any] = {"name": name, "datatype": specs[name].datatype, "shape": list(value.shape)}
        if binary:
            raw = output_bytes(value)
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = value.reshape(-1).tolist()
        tensors.append(tensor)
    answer: dict[str, Any] = {"model_name": loaded.name, "model_version": loaded.version, "outputs": tensors}
    if "id" in request:
        answer["id"] = request["id"]
    header = json.dumps(answer, separators=(",", ":")).encode()
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)


def model_metadata(loaded: LoadedModel) -> dict:
    return {
        "name": loaded.name,
        "versions": [loaded.version],
        "platform": "onnxruntime_onnx",
        "inputs": [spec.to_dict() for spec in loaded.inputs],
        "outputs": [spec.to_dict() for spec in loaded.outputs],
    }
