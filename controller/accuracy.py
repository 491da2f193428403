"""The task metrics a bundle's accuracy names, shared by the build, the planner and the frontier.

A variant's accuracy (the report's and the TUF target's ``accuracy`` object) is
flat: ``top1`` / ``exact_match`` / ``box_f1`` with its ``<metric>_drop``, plus
``agreement`` with the source and ``max_abs_diff``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

TITLES = {"top1": "top-1", "exact_match": "exact match", "box_f1": "box F1"}  # as one-line messages say them
METRICS = tuple(TITLES)  # the order in which a variant's accuracy is searched for its task metric


def task_metric(accuracy: Mapping[str, Any]) -> tuple[str, float] | None:
    """The task metric an accuracy object names, and its value; None when built without truth."""
    return next(((m, float(accuracy[m])) for m in METRICS if accuracy.get(m) is not None), None)
