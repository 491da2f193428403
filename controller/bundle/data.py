"""DATA.npz files (calibration and evaluation sets), checked against the model's inputs.

A DATA.npz holds one array per model input, named like the input, samples
along the first axis; an evaluation set adds its truth, whose name says the task
(tasks.py): ``labels`` (classes), ``texts`` (CTC strings) or ``boxes`` (text boxes).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgefleet.common.errors import GoldenFormatError
from edgefleet.common.golden import read_npz

from ..errors import BuildError
from .source import TensorSpec
from .tasks import BOXES, IGNORE, LABELS, TEXTS

MAX_DATA_BYTES = 1024**3   # a larger DATA.npz is refused unread
SYNTHETIC_SAMPLES = 8


@dataclass(frozen=True)
class Dataset:
    inputs: dict[str, np.ndarray]
    truth: dict[str, np.ndarray] = field(default_factory=dict)  # empty: no truth (calibration, synthetic)
    synthetic: bool = False

    @property
    def count(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, index: np.ndarray | slice) -> dict[str, np.ndarray]:
        return {name: array[index] for name, array in self.inputs.items()}


def load_dataset(path: Path, specs: tuple[TensorSpec, ...], role: str, labelled: bool) -> Dataset:
    """Read and validate ``path``; every problem is a one-line BuildError naming the array."""
    path = Path(path)
    if not path.is_file():
        raise BuildError(f"{role} data {path} does not exist")
    try:
        arrays = read_npz(path, max_file_bytes=MAX_DATA_BYTES, max_array_bytes=MAX_DATA_BYTES)
    except GoldenFormatError as e:
        raise BuildError(f"{role} data: {e}") from e
    inputs = {}
    for spec in specs:
        if spec.name not in arrays:
            raise BuildError(
                f"{role} data {path.name} has no array {spec.name!r} for model input {spec.describe()}; "
                f"it holds {', '.join(sorted(arrays)) or 'nothing'}")
        inputs[spec.name] = _check_input(arrays[spec.name], spec, role)
    counts = {name: len(a) for name, a in inputs.items()}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise BuildError(f"{role} data {path.name}: inputs need the same, non-zero number of samples, got {counts}")
    truth = _check_truth(arrays, next(iter(counts.values())), role, path.name) if labelled else {}
    return Dataset(inputs, truth)


def _check_input(array: np.ndarray, spec: TensorSpec, role: str) -> np.ndarray:
    if array.dtype != spec.dtype:
        raise BuildError(f"{role} input {spec.name!r} is {array.dtype}, the model wants {spec.dtype}")
    shape_ok = array.ndim == len(spec.shape) and all(
        not isinstance(want, int) or got == want for got, want in zip(array.shape[1:], spec.shape[1:], strict=True)
    )
    if not shape_ok:
        raise BuildError(
            f"{role} input {spec.name!r} has shape {list(array.shape)}, the model wants "
            f"{spec.describe()} (samples first)")
    return array


# truth array -> (dtype kinds allowed, rank, the shape it must have beyond the samples)
_TRUTH_SHAPES = {LABELS: ("iu", 1, "[N]"), TEXTS: ("iu", 2, "[N,L]"), BOXES: ("f", 3, "[N,K,4]")}


def _check_truth(arrays: dict[str, np.ndarray], count: int, role: str, name: str) -> dict[str, np.ndarray]:
    present = [key for key in _TRUTH_SHAPES if key in arrays]
    if len(present) != 1:
        found = f"it holds {', '.join(present)}" if present else "it has none"
        raise BuildError(
            f"{role} data {name} needs one truth array, {found}: an integer array {LABELS!r} (the true class), "
            f"{TEXTS!r} (CTC class indices, -1 padded) or a float array {BOXES!r} (x0,y0,x1,y1, -1 padded)")
    key = present[0]
    truth, (kinds, rank, shape) = arrays[key], _TRUTH_SHAPES[key]
    ok = truth.dtype.kind in kinds and truth.ndim == rank and len(truth) == count
    if not ok or (key == BOXES and truth.shape[2] != 4):
        kind = "integers" if kinds == "iu" else "floats"
        raise BuildError(
            f"{role} data {name}: {key!r} must be {kind} of shape {shape.replace('N', str(count))}, "
            f"got {truth.dtype}{list(truth.shape)}")
    truths = {key: truth}
    if key == TEXTS and IGNORE in arrays:
        ignore = arrays[IGNORE]
        if ignore.dtype.kind not in "iu" or ignore.ndim != 1:
            raise BuildError(f"{role} data {name}: {IGNORE!r} must be a 1-D integer array of classes")
        truths[IGNORE] = ignore
    return truths


def synthetic_dataset(specs: tuple[TensorSpec, ...], count: int = SYNTHETIC_SAMPLES, seed: int = 0) -> Dataset:
    """Seeded noise shaped like the inputs, for agreement checks when no eval set is given."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for spec in specs:
        dims = tuple(d for d in spec.shape[1:] if isinstance(d, int))
        if spec.dtype.kind != "f" or len(dims) != len(spec.shape[1:]):
            raise BuildError(
                f"model input {spec.name!r} is {spec.describe()}: synthetic data cannot be made; give --eval DATA.npz")
        inputs[spec.name] = rng.standard_normal((count, *dims)).astype(spec.dtype)
    return Dataset(inputs, synthetic=True)
