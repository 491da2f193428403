"""A device's stored report (``Device.reported``: a ``Reported.to_dict()``), read per model.

Read as plain JSON, not parsed: fleet-wide scans read thousands of reports per pass. A
report in another shape (stored by an older release) reads as serving nothing.
"""
from __future__ import annotations

from typing import Any


def statuses(reported: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The report's ModelStatus dicts, one per model."""
    models = (reported or {}).get("models")
    return [m for m in models if isinstance(m, dict)] if isinstance(models, list) else []


def active(reported: dict[str, Any] | None, model: str) -> dict[str, Any] | None:
    """The version of ``model`` the device serves (a ModelRef dict); None: it serves none."""
    return next((m.get("active") for m in statuses(reported) if m.get("model") == model), None)


def serving(reported: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Every model the device serves: its ModelRef dict and the memory it took (``memory_kb``)."""
    return [{**m["active"], "memory_kb": m.get("memory_kb")} for m in statuses(reported)
            if isinstance(m.get("active"), dict)]
