"""A fleet of simulated edge devices running the real agent code in one process.

Each device is the agent's own reconcile loop, TUF updater, slots and ONNX
Runtime on a faked hardware profile, with its own MQTT connection; all the
connections share one network thread and the passes share a small worker pool.
Used by the demo, load tests and the benchmarks in ``bench/``.
"""
from .faults import Faults, PowerCut
from .fleet import CLASSES, Fleet, FleetConfig, FleetStats, profile_for

__all__ = ["CLASSES", "Faults", "Fleet", "FleetConfig", "FleetStats", "PowerCut", "profile_for"]
