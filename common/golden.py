"""Golden sets: a few inputs and the outputs one variant must produce for them.

The bundle builder stores one beside each variant; a device runs it against a
freshly loaded model before serving it. Stored as ``.npz`` (no pickles) with
``input/<name>``, ``output/<name>`` arrays and a JSON ``meta`` string. The file
comes from the network, so its size and every array's size are bounded before
anything is decompressed.
"""
from __future__ import annotations

import io
import json
import math
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import GoldenFormatError
from .fs import atomic_write

FORMAT = 1
MAX_GOLDEN_BYTES = 16 * 1024 * 1024      # a golden file larger than this is refused unread
MAX_NPZ_ARRAY_BYTES = 256 * 1024 * 1024  # per array, after decompression (npz readers in general)
_INPUT, _OUTPUT, _META = "input/", "output/", "meta"

Arrays = dict[str, np.ndarray]
RunFn = Callable[[Arrays], Mapping[str, np.ndarray]]


def read_npz(
    source: Path | bytes, max_file_bytes: int, max_array_bytes: int = MAX_NPZ_ARRAY_BYTES, name: str = ""
) -> Arrays:
    """Load every array of an ``.npz`` (a file, or its bytes) without pickles, refusing oversized
    files and members.

    Before anything is decompressed, the zip directory's uncompressed sizes and each
    member's ``.npy`` header are checked: a small file can neither expand into gigabytes
    nor declare a shape (say 2**40 rows) that numpy would allocate before reading.
    """
    file: Path | io.BytesIO
    if isinstance(source, bytes):
        name, size, file = name or "npz data", len(source), io.BytesIO(source)
    else:
        file = Path(source)
        name, size = name or file.name, file.stat().st_size
    if size > max_file_bytes:
        raise GoldenFormatError(f"{name} is {size} bytes, above the {max_file_bytes}-byte limit")
    try:
        with zipfile.ZipFile(file) as archive:
            for info in archive.infolist():
                _check_member(archive, info, name, max_array_bytes)
        if isinstance(file, io.BytesIO):
            file.seek(0)
        with np.load(file, allow_pickle=False) as data:
            return {member: data[member] for member in data.files}
    # RuntimeError, NotImplementedError: zipfile on an encrypted member or an unknown compression method
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, RuntimeError, NotImplementedError) as e:
        raise GoldenFormatError(f"{name} is not a readable npz: {e}") from e


def _check_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, max_array_bytes: int) -> None:
    """Refuse a member that expands past the limit, or whose .npy header declares more than it holds."""
    if info.file_size > max_array_bytes:
        raise GoldenFormatError(
            f"{name}: member {info.filename} expands to {info.file_size} bytes, "
            f"above the {max_array_bytes}-byte limit")
    with archive.open(info) as member:
        try:
            version = np.lib.format.read_magic(member)
        except ValueError:
            return  # not an array: np.load gives its (bounded) bytes
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(member)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(member)
        else:
            raise GoldenFormatError(f"{name}: member {info.filename} is .npy format {version}; 1.0 and 2.0 are read")
    declared = math.prod(shape) * dtype.itemsize  # Python ints: never wraps
    if declared > info.file_size or any(d > max_array_bytes for d in shape):
        raise GoldenFormatError(
            f"{name}: member {info.filename} declares shape {shape} of {dtype} ({declared} bytes); "
            f"it holds {info.file_size} bytes and no dimension may exceed {max_array_bytes}")


@dataclass(frozen=True)
class GoldenResult:
    passed: bool
    max_abs_diff: float
    detail: str


@dataclass
class GoldenSet:
    """Inputs (samples along axis 0) and the outputs expected for them.

    An output passes when ``|actual - expected| <= atol + rtol * |expected|``
    everywhere (integer outputs must match exactly). With ``top1`` the arg-max
    of every 2-D float output must also match the expected one.
    """

    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    atol: float
    rtol: float
    top1: bool = False

    def __post_init__(self) -> None:
        counts = {len(a) for a in (*self.inputs.values(), *self.outputs.values())}
        if not self.inputs or not self.outputs or len(counts) != 1:
            raise GoldenFormatError("a golden set needs inputs and outputs with the same number of samples")
        if not (self.atol >= 0 and self.rtol >= 0):
            raise GoldenFormatError(f"golden tolerances must be >= 0, got atol={self.atol} rtol={self.rtol}")

    @property
    def samples(self) -> int:
        return len(next(iter(self.inputs.values())))

    def save(self, path: Path) -> Path:
        arrays: dict[str, Any] = {_INPUT + k: v for k, v in self.inputs.items()}
        arrays.update({_OUTPUT + k: v for k, v in self.outputs.items()})
        meta = {"format": FORMAT, "atol": self.atol, "rtol": self.rtol, "top1": self.top1}
        arrays[_META] = np.array(json.dumps(meta))
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        atomic_write(Path(path), buffer.getvalue())
        return Path(path)

    @classmethod
    def load(cls, path: Path, max_bytes: int = MAX_GOLDEN_BYTES) -> GoldenSet:
        arrays = read_npz(Path(path), max_file_bytes=max_bytes, max_array_bytes=max_bytes * 8)
        meta = _meta(arrays.pop(_META, None), Path(path).name)
        return cls(
            inputs={k[len(_INPUT):]: v for k, v in arrays.items() if k.startswith(_INPUT)},
            outputs={k[len(_OUTPUT):]: v for k, v in arrays.items() if k.startswith(_OUTPUT)},
            atol=meta["atol"], rtol=meta["rtol"], top1=meta["top1"],
        )

    def check(self, run: RunFn) -> GoldenResult:
        """Run every sample on its own (models with a fixed batch of 1 work too) and compare."""
        actual: dict[str, list[np.ndarray]] = {name: [] for name in self.outputs}
        for i in range(self.samples):
            got = run({name: array[i:i + 1] for name, array in self.inputs.items()})
            for name in self.outputs:
                if name not in got:
                    return GoldenResult(False, float("inf"), f"output {name!r} is missing")
                actual[name].append(np.asarray(got[name]))
        worst, failures = 0.0, []
        for name, expected in self.outputs.items():
            observed = np.concatenate(actual[name]) if expected.ndim else np.asarray(actual[name][0])
            diff, problem = self._compare(name, expected, observed)
            worst = max(worst, diff)
            if problem:
                failures.append(problem)
        if failures:
            return GoldenResult(False, worst, "; ".join(failures))
        return GoldenResult(True, worst, f"{self.samples} samples within atol={self.atol:g} rtol={self.rtol:g}")

    def _compare(self, name: str, expected: np.ndarray, got: np.ndarray) -> tuple[float, str]:
        if got.shape != expected.shape:
            return float("inf"), f"output {name!r} has shape {got.shape}, expected {expected.shape}"
        if not np.issubdtype(expected.dtype, np.floating):
            mismatched = int(np.count_nonzero(got != expected))
            return float(mismatched), (f"output {name!r}: {mismatched} values differ" if mismatched else "")
        got64, expected64 = got.astype(np.float64), expected.astype(np.float64)
        if not np.all(np.isfinite(got64)):
            return float("inf"), f"output {name!r} has non-finite values"
        diff = np.abs(got64 - expected64)
        worst = float(diff.max(initial=0.0))
        outside = int(np.count_nonzero(diff > self.atol + self.rtol * np.abs(expected64)))
        if outside:
            return worst, f"output {name!r}: {outside} values outside tolerance (max abs diff {worst:.3g})"
        if self.top1 and expected.ndim == 2:
            flipped = int(np.count_nonzero(got.argmax(axis=1) != expected.argmax(axis=1)))
            if flipped:
                return worst, f"output {name!r}: top-1 class differs on {flipped} of {len(expected)} samples"
        return worst, ""


def _meta(raw: np.ndarray | None, name: str) -> dict:
    try:
        meta = json.loads(str(raw)) if raw is not None and raw.dtype.kind == "U" else None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise GoldenFormatError(f"{name} is not a golden set of format {FORMAT}")
        return {"atol": float(meta["atol"]), "rtol": float(meta["rtol"]), "top1": bool(meta.get("top1", False))}
    except (KeyError, TypeError, ValueError) as e:
        raise GoldenFormatError(f"{name} has malformed golden-set metadata: {e}") from e
