"""One unit per model: the on-disk move from the single-model layout, and the device's one report."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent import slots as slots_module
from edgefleet.agent.slots import MOVING_FILE, Slots, adopt_single_model_layout, installed_models, model_dir
from edgefleet.agent.units import DeviceReport, UnitLink
from edgefleet.common.protocol import ExecutionState, ModelRef, Reported

REF = ModelRef(model="digits", version="1.0.0", variant="cpu-fp32", release=1)


def single_model_state(state: Path) -> None:
    """What an agent of one model leaves: its slots, pointer, journal, releases and samples."""
    (state / "slots" / "digits+1.0.0+cpu-fp32+r1").mkdir(parents=True)
    (state / "slots" / "pointer.json").write_text(json.dumps({"active": "digits+1.0.0+cpu-fp32+r1", "previous": None}))
    (state / "journal.json").write_text(json.dumps({"desired": {"device": "d1", "generation": 3, "model": "digits"},
                                                    "state": "succeeded"}))
    (state / "releases.json").write_text('{"digits": 1}')
    (state / "samples").mkdir()
    (state / "samples" / "one.npz").write_bytes(b"x")


def test_a_single_model_state_moves_under_its_model_and_keeps_every_file(tmp_path):
    single_model_state(tmp_path)
    assert adopt_single_model_layout(tmp_path) == "digits"  # named by the journal: the slot has no meta here
    moved = model_dir(tmp_path, "digits")
    assert installed_models(tmp_path) == ["digits"]
    assert Slots(moved).pointer().active == "digits+1.0.0+cpu-fp32+r1"
    assert Slots(moved).highest_release("digits") == 1 and (moved / "samples" / "one.npz").read_bytes() == b"x"
    assert not (tmp_path / "slots").exists() and not (tmp_path / MOVING_FILE).exists()
    assert adopt_single_model_layout(tmp_path) is None  # nothing left to move


def test_a_move_cut_short_resumes_from_its_marker(tmp_path, monkeypatch):
    single_model_state(tmp_path)
    real_replace = os.replace
    moved: list[str] = []

    def power_cut_after_three(src: Any, dst: Any) -> None:  # the marker's write, slots/, journal.json
        if len(moved) == 3:
            raise OSError("power cut")
        moved.append(Path(src).name)
        real_replace(src, dst)

    monkeypatch.setattr(slots_module.os, "replace", power_cut_after_three)
    with pytest.raises(OSError, match="power cut"):
        adopt_single_model_layout(tmp_path)
    monkeypatch.undo()
    assert (tmp_path / MOVING_FILE).exists() and not (tmp_path / "journal.json").exists()
    # the journal that named the model has moved: the marker names it now
    assert adopt_single_model_layout(tmp_path) == "digits"
    assert sorted(p.name for p in model_dir(tmp_path, "digits").iterdir()) == [
        "journal.json", "releases.json", "samples", "slots"]


class _Link:
    def __init__(self) -> None:
        self.reports: list[Reported] = []

    def report(self, **fields: Any) -> Reported:
        self.reports.append(Reported(device="d1", boot=1, seq=len(self.reports) + 1, **fields))
        return self.reports[-1]


def test_the_device_report_carries_every_model_and_each_unit_changes_only_its_own():
    link = _Link()
    report = DeviceReport(link, {"arch": "x86_64"}, "0.1")  # type: ignore[arg-type]
    digits = UnitLink("digits", link, report)  # type: ignore[arg-type]
    textdir = UnitLink("textdir", link, report)  # type: ignore[arg-type]
    digits.report(3, active=REF, previous=None, outcome=ExecutionState.SUCCEEDED, memory_kb=1200)
    textdir.report(4, active=None, previous=None, outcome=None, memory_kb=None)
    digits.report(5, active=REF, previous=REF, outcome=ExecutionState.ROLLED_BACK, memory_kb=1300)
    last = link.reports[-1]
    last.validate()
    assert [s.model for s in last.models] == ["digits", "textdir"]
    assert (last.status("digits").generation, last.status("digits").outcome, last.status("digits").memory_kb) == (
        5, ExecutionState.ROLLED_BACK, 1300)
    assert last.status("textdir").generation == 4 and last.hardware == {"arch": "x86_64"}
