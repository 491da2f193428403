"""Installed model versions on disk, switched atomically.

Each model a device serves has its own directory, ``models/<model>/``; an agent of one
model kept that model's files in the state directory itself, and the first start of this
one moves them (:func:`adopt_single_model_layout`). Layout under a model's directory::

    slots/<name>/model.onnx, golden.npz, meta.json   one installed, verified version
    slots/.staging/<name>/                           downloads in progress
    slots/pointer.json                               {"active": name, "previous": name}
    journal.json                                     the update step in progress
    releases.json                                    highest release ever activated per model

A slot directory appears under ``slots/`` only by an atomic rename of a fully
written, fsynced staging directory, and the pointer only ever names such
directories; so a crash at any instant leaves the pointer naming a complete,
verified version. Every write is temp + fsync + ``os.replace`` + fsync(dir).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.common.errors import ProtocolError
from edgefleet.common.fs import (
    Writer,
    atomic_write,
    fsync_dir,
    read_json,
    storage_error,
)
from edgefleet.common.protocol import NAME, Action, Desired, ModelRef, TargetInfo

from .errors import AgentError
from .state import Journal, State

MODEL_FILE = "model.onnx"
GOLDEN_FILE = "golden.npz"
META_FILE = "meta.json"
STAGING = ".staging"
TRASH = ".trash-"  # a directory being deleted; never a slot

log = logging.getLogger(__name__)


def slot_name(ref: ModelRef) -> str:
    """Deterministic slot name: re-running a step writes the same place."""
    # '+' is outside the protocol's name alphabet, so the name is unambiguous.
    return f"{ref.model}+{ref.version}+{ref.variant}+r{ref.release}"


@dataclass(frozen=True)
class SlotMeta:
    """meta.json of an installed slot."""

    ref: ModelRef
    target: TargetInfo
    model_sha256: str
    installed: float
    p99_ms: float | None = None   # measured by the gate on this device

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "ref": self.ref.to_dict(),
                "target": self.target.to_dict(),
                "model_sha256": self.model_sha256,
                "installed": self.installed,
                "p99_ms": self.p99_ms,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SlotMeta:
        return cls(
            ref=ModelRef.from_dict(data["ref"]),
            target=TargetInfo.from_dict(data["target"]),
            model_sha256=str(data["model_sha256"]),
            installed=float(data["installed"]),
            p99_ms=None if data.get("p99_ms") is None else float(data["p99_ms"]),
        )


@dataclass(frozen=True)
class Slot:
    name: str
    path: Path
    meta: SlotMeta

    @property
    def model(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def golden(self) -> Path:
        return self.path / GOLDEN_FILE


@dataclass(frozen=True)
class Pointer:
    active: str | None = None
    previous: str | None = None


def _failed_journal(data: Any, reason: str) -> Journal | None:
    """A journal an older or buggier agent wrote that this one cannot read, as a FAILED execution
    of the generation it names: the agent starts, reports why, and waits for a newer generation.
    None when not even the generation can be read."""
    desired = data.get("desired") if isinstance(data, dict) else None
    if not isinstance(desired, dict):
        return None
    generation = desired.get("generation")
    if not isinstance(generation, int) or isinstance(generation, bool) or generation < 0:
        return None

    def named(key: str) -> str | None:
        value = desired.get(key)
        return value if isinstance(value, str) else None

    # built, not parsed: the stand-in only names the execution in the FAILED event
    stand_in = Desired(device=named("device") or "", generation=generation, action=Action.NONE,
                       deployment=named("deployment"), model=named("model"), version=named("version"),
                       variant=named("variant"))
    journal = Journal(desired=stand_in, state=State.FAILED)
    journal.enter(State.FAILED, reason)
    return journal


class Slots:
    """The slots of one agent state directory."""

    def __init__(self, state_dir: Path, writer: Writer | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.root = self.state_dir / "slots"
        self.staging_root = self.root / STAGING
        self._writer = writer  # directories are made on first write: `fleet-agent status` only reads

    def _write(self, path: Path, data: bytes) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise storage_error(e, str(path.parent)) from e
        atomic_write(path, data, self._writer)

    # --- pointer ----------------------------------------------------------

    def pointer(self) -> Pointer:
        data = read_json(self.root / "pointer.json") or {}
        return Pointer(active=data.get("active"), previous=data.get("previous"))

    def _set_pointer(self, pointer: Pointer) -> None:
        body = json.dumps({"active": pointer.active, "previous": pointer.previous}).encode()
        self._write(self.root / "pointer.json", body)

    def get(self, name: str | None) -> Slot | None:
        """An installed slot, or None when absent or its metadata is unreadable."""
        if not name:
            return None
        path = self.root / name
        data = read_json(path / META_FILE)
        if data is None or not (path / MODEL_FILE).is_file():
            return None
        try:
            return Slot(name, path, SlotMeta.from_dict(data))
        except (KeyError, TypeError, ValueError, ProtocolError):
            return None

    def active(self) -> Slot | None:
        return self.get(self.pointer().active)

    def previous(self) -> Slot | None:
        return self.get(self.pointer().previous)

    def activate(self, name: str) -> Pointer:
        """Make an installed slot active; the one it replaces becomes previous."""
        slot = self.get(name)
        if slot is None:
            raise AgentError(f"slot {name} is not installed; run the update again")
        current = self.pointer()
        if current.active == name:
            return current
        pointer = Pointer(active=name, previous=current.active or current.previous)
        self._set_pointer(pointer)
        self._raise_release(slot.meta.ref)
        return pointer

    def rollback(self) -> Pointer:
        """Swap active and previous (instant: both are installed and verified)."""
        current = self.pointer()
        if self.get(current.previous) is None:
            raise AgentError("no previous model is installed to roll back to")
        pointer = Pointer(active=current.previous, previous=current.active)
        self._set_pointer(pointer)
        return pointer

    # --- staging and install ---------------------------------------------

    def staging(self, name: str) -> Path:
        path = self.staging_root / name
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise storage_error(e, str(path)) from e
        return path

    def install(self, name: str, meta: SlotMeta) -> Slot:
        """Turn a verified staging directory into an installed slot (idempotent)."""
        existing = self.get(name)
        if existing is not None:
            shutil.rmtree(self.staging_root / name, ignore_errors=True)
            return existing
        staged = self.staging_root / name
        if not (staged / MODEL_FILE).is_file():
            raise AgentError(f"staging for {name} is incomplete; download it again")
        self._write(staged / META_FILE, meta.to_json())
        try:
            for child in staged.iterdir():
                with open(child, "rb") as f:
                    os.fsync(f.fileno())
            fsync_dir(staged)
            target = self.root / name
            if target.exists():  # an unreadable leftover of an earlier life: replace it
                self._remove(target)
            os.rename(staged, target)
            fsync_dir(self.root)
            fsync_dir(self.staging_root)
        except OSError as e:
            raise storage_error(e, f"slot {name}") from e
        slot = self.get(name)
        assert slot is not None
        return slot

    def record_p99(self, name: str, p99_ms: float) -> None:
        slot = self.get(name)
        if slot is not None:
            meta = SlotMeta(slot.meta.ref, slot.meta.target, slot.meta.model_sha256, slot.meta.installed, p99_ms)
            self._write(slot.path / META_FILE, meta.to_json())

    def discard(self, name: str) -> None:
        """Remove a slot that failed its gate (never the active or previous one)."""
        pointer = self.pointer()
        if name in (pointer.active, pointer.previous):
            return
        self._remove(self.root / name)
        self._remove(self.staging_root / name)

    def _remove(self, path: Path) -> None:
        """Delete a directory so that a crash midway never leaves a slot that looks installed."""
        if not path.exists():
            return
        trash = self.root / f"{TRASH}{path.name}"
        try:
            os.rename(path, trash)  # atomic: from here on it is not a slot
        except OSError:
            trash = path
        shutil.rmtree(trash, ignore_errors=True)

    def gc(self, keep_staging: str | None = None) -> list[str]:
        """Remove slots that are neither active nor previous, and stale staging dirs."""
        if not self.root.is_dir():
            return []
        pointer = self.pointer()
        keep = {pointer.active, pointer.previous, STAGING}
        removed = []
        for child in self.root.iterdir():
            if child.is_dir() and child.name not in keep:
                self._remove(child)
                removed.append(child.name)
            elif child.is_file() and child.name.startswith("."):  # temp of an interrupted write
                child.unlink(missing_ok=True)
        for child in self.staging_root.iterdir() if self.staging_root.is_dir() else ():
            if child.name == keep_staging:
                continue
            if child.is_dir():
                self._remove(child)
            else:
                child.unlink(missing_ok=True)
            removed.append(f"{STAGING}/{child.name}")
        return removed

    # --- release high-water mark -----------------------------------------

    def highest_release(self, model: str) -> int:
        data = read_json(self.state_dir / "releases.json") or {}
        value = data.get(model, 0)
        return value if isinstance(value, int) else 0

    def _raise_release(self, ref: ModelRef) -> None:
        data = read_json(self.state_dir / "releases.json") or {}
        if ref.release > data.get(ref.model, 0):
            data[ref.model] = ref.release
            self._write(self.state_dir / "releases.json", json.dumps(data, sort_keys=True).encode())

    # --- journal ----------------------------------------------------------

    def journal(self) -> Journal | None:
        data = read_json(self.state_dir / "journal.json")
        if data is None:
            return None
        try:
            return Journal.from_dict(data)
        except (KeyError, TypeError, ValueError, ProtocolError) as e:
            return _failed_journal(data, f"the journal on disk no longer parses: {e}")

    def save_journal(self, journal: Journal) -> None:
        self._write(self.state_dir / "journal.json", journal.to_json())


# --- one directory per model ---------------------------------------------

MODELS_DIR = "models"
MOVING_FILE = "models-moving.json"  # the model the single-model files are being moved under
SINGLE_MODEL_FILES = ("slots", "journal.json", "releases.json", "samples")


def model_dir(state_dir: Path, model: str) -> Path:
    return Path(state_dir) / MODELS_DIR / model


def installed_models(state_dir: Path) -> list[str]:
    """The models that have a directory here, by name."""
    root = Path(state_dir) / MODELS_DIR
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and NAME.match(p.name))


def adopt_single_model_layout(state_dir: Path) -> str | None:
    """Move a single-model agent's files under ``models/<model>/``; the model moved, if any.

    Each file moves by one rename, and the model's name is written down first, so a power
    cut at any instant resumes the move at the next start with the files where they were.
    """
    state_dir = Path(state_dir)
    marker = state_dir / MOVING_FILE
    noted = read_json(marker)
    model = noted.get("model") if isinstance(noted, dict) else None
    if not isinstance(model, str) or not NAME.match(model):
        model = _single_model_name(state_dir)
        if model is None:
            return None
        atomic_write(marker, f'{{"model": "{model}"}}'.encode())
    target = model_dir(state_dir, model)
    target.mkdir(parents=True, exist_ok=True)
    for name in SINGLE_MODEL_FILES:
        if (state_dir / name).exists() and not (target / name).exists():
            os.replace(state_dir / name, target / name)
    fsync_dir(target)
    marker.unlink()
    fsync_dir(state_dir)
    log.info("moved the installed model %s under %s", model, target)
    return model


def _single_model_name(state_dir: Path) -> str | None:
    """The model a single-model state directory holds: its active slot's, else its journal's."""
    slots = Slots(state_dir)
    if not (state_dir / "slots").is_dir() and not (state_dir / "journal.json").exists():
        return None
    for slot in (slots.active(), slots.previous()):
        if slot is not None:
            return slot.meta.ref.model
    journal = slots.journal()
    return journal.desired.model if journal is not None else None
