"""The models a device serves: one unit each, with its own slots (under
``models/<model>/``, see :mod:`.slots`), runtime, sampler and reconcile loop, so each
model has its own rollouts, hot-swap and rollback, and the device one report.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from edgefleet.common.protocol import (
    Action,
    Desired,
    DesiredSet,
    ExecutionState,
    ModelRef,
    ModelStatus,
    Reported,
    TelemetryPayload,
)

from .link import AgentLink
from .reconcile import Reconciler
from .runtime import LoadedModel, ModelRuntime
from .sampler import Sampler
from .served import ServedModels
from .slots import Slots, adopt_single_model_layout, installed_models, model_dir


class DeviceReport:
    """The device's retained report: every unit's :class:`ModelStatus`, published whole each
    time one changes (the controller reads each model's entry)."""

    def __init__(self, link: AgentLink, hardware: dict[str, Any], agent_version: str) -> None:
        self.link, self.hardware, self.agent_version = link, hardware, agent_version
        self._statuses: dict[str, ModelStatus] = {}
        self._lock = threading.RLock()  # publish() runs inside update()

    def update(self, status: ModelStatus) -> Reported:
        with self._lock:
            self._statuses[status.model] = status
            return self.publish()

    def publish(self) -> Reported:
        with self._lock:
            models = tuple(self._statuses[name] for name in sorted(self._statuses))
        return self.link.report(models=models, hardware=self.hardware, agent_version=self.agent_version)


class Publisher(Protocol):
    def event(self, state: ExecutionState, **fields: Any) -> object: ...
    def telemetry(self, payload: TelemetryPayload) -> object: ...


class UnitLink:
    """What one unit's reconciler publishes: events and telemetry as they are, and its part of
    the device's report."""

    def __init__(self, model: str, link: Publisher, report: DeviceReport) -> None:
        self.model, self.link, self._report = model, link, report

    def report(self, generation: int, **fields: Any) -> ModelStatus:
        status = ModelStatus(model=self.model, generation=generation, **fields)
        self._report.update(status)
        return status

    def event(self, state: ExecutionState, **fields: Any) -> object:
        return self.link.event(state, **fields)

    def telemetry(self, payload: TelemetryPayload) -> object:
        return self.link.telemetry(payload)


@dataclass(frozen=True)
class ModelUnit:
    name: str
    slots: Slots
    runtime: ModelRuntime
    sampler: Sampler
    reconciler: Reconciler


class Units:
    """The device's units by model name; a unit is made (``make``) when a desired entry first
    names its model, and at start for each model installed."""

    def __init__(self, state_dir: Path, make: Callable[[str, Path], ModelUnit]) -> None:
        self.state_dir = Path(state_dir)
        self._make = make
        self._units: dict[str, ModelUnit] = {}
        self.served = ServedModels()
        adopt_single_model_layout(self.state_dir)
        for name in installed_models(self.state_dir):
            self.ensure(name)

    def ensure(self, name: str) -> ModelUnit:
        unit = self._units.get(name)
        if unit is None:
            unit = self._make(name, model_dir(self.state_dir, name))
            # replaced, never changed in place: the servers and the upload thread iterate it meanwhile
            self._units = {**self._units, name: unit}
            self.served.add(name, unit.runtime)
        return unit

    def work(self, desired: DesiredSet | None) -> list[tuple[ModelUnit, Desired | None]]:
        """Each unit with its entry of ``desired`` (None: the set does not name it, or no set yet);
        an install of a model the device does not have yet makes its unit."""
        entries = {e.model: e for e in desired.models if e.model} if desired is not None else {}
        for model, entry in entries.items():
            if entry.action is Action.INSTALL:
                self.ensure(model)
        return [(unit, entries.get(unit.name)) for unit in self]

    def serving(self) -> tuple[ModelRef, ...]:
        """The version of each model being served now (the heartbeat's ``active``)."""
        loaded = [unit.runtime.active for unit in self]
        return tuple(m.ref for m in loaded if m is not None and m.ref is not None)

    def get(self, name: str) -> ModelUnit | None:
        return self._units.get(name)

    def __iter__(self) -> Iterator[ModelUnit]:
        units = self._units
        return iter([units[name] for name in sorted(units)])

    def on_inference(self, inputs: dict, outputs: dict, loaded: LoadedModel) -> None:
        """The servers' sampling hook: the sampler of the model that answered."""
        unit = self._units.get(loaded.name)
        if unit is not None:
            unit.sampler.on_inference(inputs, outputs, loaded)
