"""Pick a variant's golden set: a few eval samples and what this variant answers for them."""
from __future__ import annotations

import numpy as np

from edgefleet.common.golden import GoldenSet

from .data import Dataset

MAX_SAMPLES = 8
MAX_INPUT_BYTES = 4 * 1024 * 1024  # keeps the golden file far below the agent's 16 MiB limit


def make_golden(data: Dataset, outputs: dict[str, np.ndarray], score: str | None, rel_tol: float) -> GoldenSet:
    """Tolerances scale with the outputs (``rel_tol`` of the largest magnitude).

    Samples whose top-1 margin is clear of the tolerance come first, so the
    top-1 check cannot flip on a device whose kernels round differently.
    """
    per_sample = sum(a[0].nbytes for a in data.inputs.values())
    count = max(1, min(MAX_SAMPLES, data.count, MAX_INPUT_BYTES // max(per_sample, 1)))
    floats = [o for o in outputs.values() if o.dtype.kind == "f"]
    atol = rel_tol * max((float(np.max(np.abs(o), initial=0.0)) for o in floats), default=0.0)
    index = np.arange(count)
    clear = False
    if score is not None:
        ordered = np.sort(outputs[score], axis=1)
        margin = ordered[:, -1] - ordered[:, -2]
        needed = 4 * (atol + rel_tol * np.abs(ordered[:, -1]))
        clear_idx = np.flatnonzero(margin > needed)
        clear = len(clear_idx) >= count
        index = clear_idx[:count] if clear else np.argsort(-margin, kind="stable")[:count]
    return GoldenSet(
        inputs=data.take(index),
        outputs={name: value[index] for name, value in outputs.items()},
        atol=atol,
        rtol=rel_tol,
        top1=clear,
    )
