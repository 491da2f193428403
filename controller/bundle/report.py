"""The bundle report (OUT/report.json): written last by the build, read back by verify and publish.

Reading checks what a publish signs: names in the protocol's alphabet, and
every listed file a plain name inside the bundle directory that exists.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.common.hardware import Requirements
from edgefleet.common.protocol import NAME

from ..errors import InvalidInput

REPORT = "report.json"
MAX_REPORT_BYTES = 1024 * 1024


@dataclass(frozen=True)
class ReportedVariant:
    """One built variant, as the report lists it."""

    name: str
    file: Path
    golden: Path
    requirements: dict[str, Any]
    preference: int
    p99_ms: float | None
    accuracy: dict[str, Any]


@dataclass(frozen=True)
class BundleReport:
    model: str
    version: str
    variants: tuple[ReportedVariant, ...]

    @classmethod
    def read(cls, directory: Path) -> BundleReport:
        """The report of a built bundle, or InvalidInput naming what is wrong with it."""
        path = Path(directory) / REPORT
        try:
            if path.stat().st_size > MAX_REPORT_BYTES:
                raise InvalidInput(f"{path} is larger than {MAX_REPORT_BYTES} bytes; is it a bundle report?")
            report = json.loads(path.read_text())
            model, version = report["model"], report["version"]
            variants = tuple(_variant(Path(directory), v) for v in report["variants"])
        except FileNotFoundError:
            raise InvalidInput(f"{path} not found: run `fleetctl bundle build ... -o {directory}` first") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise InvalidInput(f"{path} is not a valid bundle report ({type(e).__name__}: {e})") from None
        for label, value in (("model", model), ("version", version)):
            if not isinstance(value, str) or not NAME.match(value):
                raise InvalidInput(f"{path}: {label} {value!r} must be letters, digits, '.', '_' or '-'")
        if not variants:
            raise InvalidInput(f"{path} lists no variants (all refused?); nothing to verify or publish")
        return cls(model, version, variants)


def _variant(directory: Path, entry: dict[str, Any]) -> ReportedVariant:
    files = []
    for key in ("file", "golden"):
        name = entry[key]
        if not isinstance(name, str) or Path(name).name != name or name.startswith("."):
            raise ValueError(f"variant {key} {name!r} must be a plain file name inside the bundle")
        file = directory / name
        if not file.is_file():
            raise ValueError(f"variant {key} {file} is missing")
        files.append(file)
    p99 = (entry.get("latency_ms") or {}).get("p99")
    return ReportedVariant(
        name=entry["variant"],
        file=files[0],
        golden=files[1],
        requirements=Requirements.from_dict(entry.get("requirements") or {}).to_dict(),
        preference=int(entry.get("preference", 0)),
        p99_ms=None if p99 is None else float(p99),
        accuracy=dict(entry.get("accuracy") or {}),
    )
