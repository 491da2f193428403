"""Check a built bundle locally: every listed variant loads and passes its own golden set."""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgefleet.common.errors import GoldenFormatError
from edgefleet.common.golden import GoldenSet

from ..errors import BuildError
from .build import REPORT
from .evaluate import cpu_session
from .variants import CUDA_FP16

if TYPE_CHECKING:
    import onnxruntime as ort

MAX_REPORT_BYTES = 1024 * 1024


@dataclass(frozen=True)
class VariantCheck:
    variant: str
    passed: bool
    max_abs_diff: float
    detail: str


def read_report(out: Path) -> dict:
    path = Path(out) / REPORT
    if not path.is_file():
        raise BuildError(f"{path} not found: run `fleetctl bundle build ... -o {out}` first")
    if path.stat().st_size > MAX_REPORT_BYTES:
        raise BuildError(f"{path} is larger than {MAX_REPORT_BYTES} bytes; is it a bundle report?")
    try:
        report = json.loads(path.read_text())
        if not isinstance(report.get("variants"), list):
            raise ValueError("no variants list")
    except (ValueError, AttributeError) as e:
        raise BuildError(f"{path} is not a bundle report: {e}") from e
    return report


def _plain(out: Path, name: object) -> Path:
    if not isinstance(name, str) or Path(name).name != name or name.startswith("."):
        raise BuildError(f"bundle report names {name!r}, which is not a plain file name in {out}")
    path = out / name
    if not path.is_file():
        raise BuildError(f"bundle file {path} is missing; rebuild the bundle")
    return path


def _outputs(
    session: ort.InferenceSession, names: list[str], inputs: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    return dict(zip(names, session.run(names, inputs), strict=True))


def verify_bundle(out: Path) -> list[VariantCheck]:
    out = Path(out)
    checks = []
    for entry in read_report(out)["variants"]:
        name = entry.get("variant", "?")
        session, _ = cpu_session(_plain(out, entry.get("file")), fp16=name == CUDA_FP16)
        try:
            golden = GoldenSet.load(_plain(out, entry.get("golden")))
        except GoldenFormatError as e:
            checks.append(VariantCheck(name, False, float("inf"), str(e)))
            continue
        names = [o.name for o in session.get_outputs()]
        result = golden.check(partial(_outputs, session, names))
        checks.append(VariantCheck(name, result.passed, result.max_abs_diff, result.detail))
    return checks
