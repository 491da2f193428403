"""A device's units around runtimes a test made itself (no updates: the reconcilers never run)."""
from __future__ import annotations

from pathlib import Path

from edgefleet.agent.probe import probe
from edgefleet.agent.reconcile import Reconciler
from edgefleet.agent.runtime import ModelRuntime
from edgefleet.agent.sampler import Sampler
from edgefleet.agent.slots import Slots
from edgefleet.agent.units import ModelUnit, Units
from edgefleet.common.protocol import SamplingPolicy


def units_serving(state_dir: Path, model: str, runtime: ModelRuntime, sampler: Sampler | None = None) -> Units:
    """Units of one model, ``model``, served by ``runtime`` and sampled by ``sampler``."""
    def unit(name: str, directory: Path) -> ModelUnit:
        slots = Slots(directory)
        return ModelUnit(name, slots, runtime, sampler or Sampler(SamplingPolicy(), directory / "samples"),
                         Reconciler(slots, None, runtime, None, probe()))

    units = Units(state_dir, unit)
    units.ensure(model)
    return units

