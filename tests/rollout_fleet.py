"""A small fleet in a fresh database for the rollout tests: two hardware classes
(x86_64, rpi-4), two sites, model digits 1.0.0 and 1.1.0 with three variants."""
from __future__ import annotations

from typing import Any

from edgefleet.common.protocol import Desired, DesiredSet, target_path
from edgefleet.controller.db.models import Device, Variant
from edgefleet.controller.db.session import Database
from edgefleet.controller.rollout.spec import RolloutSpec

X86: dict[str, Any] = {"arch": "x86_64", "cpu_features": ["avx2"], "providers": ["CPUExecutionProvider"], "memory_mb": 8000,
       "hardware_class": "x86_64"}
RPI: dict[str, Any] = {"arch": "aarch64", "cpu_features": ["neon"], "providers": ["CPUExecutionProvider"], "memory_mb": 4000,
       "device_model": "Raspberry Pi 4 Model B Rev 1.4", "hardware_class": "rpi-4"}
VARIANTS = [  # name, requirements, preference
    ("cuda-fp16", {"providers": ["CUDAExecutionProvider"]}, 0),
    ("cpu-int8", {"arch": ["x86_64"], "cpu_features": ["avx2"]}, 1),
    ("cpu-fp32", {}, 2),
]


def device_rows(count_per_class: int = 3, running: str | None = "1.0.0") -> list[Device]:
    rows = []
    for cls, hardware in (("x86_64", X86), ("rpi-4", RPI)):
        for i in range(count_per_class):
            name = f"{'x' if cls == 'x86_64' else 'p'}{i + 1}"
            reported = None
            if running:
                variant = "cpu-int8" if cls == "x86_64" else "cpu-fp32"
                active = {"model": "digits", "version": running, "variant": variant, "release": 1}
                reported = {"device": name, "boot": 1, "seq": 0,
                            "models": [{"model": "digits", "generation": 0, "active": active}]}
            rows.append(Device(
                id=name, labels={"site": "berlin" if i % 2 == 0 else "paris"}, hardware=hardware,
                hardware_class=cls, online=True, reported=reported,
            ))
    return rows


def fleet_db(url: str, count_per_class: int = 3, running: str | None = "1.0.0") -> Database:
    db = Database(url)
    db.upgrade()
    seed(db, count_per_class, running)
    return db


def seed(db: Database, count_per_class: int = 3, running: str | None = "1.0.0") -> None:
    with db.unit_of_work() as session:
        session.add_all(device_rows(count_per_class, running))
    publish_model(db, "digits", ("1.0.0", "1.1.0"))


def publish_model(db: Database, model: str, versions: tuple[str, ...]) -> None:
    """The VARIANTS of each version of ``model``, as `fleetctl models publish` would store them."""
    with db.unit_of_work() as session:
        for release, version in enumerate(versions, start=1):
            for variant, requirements, preference in VARIANTS:
                session.add(Variant(
                    model=model, version=version, variant=variant,
                    target_path=target_path(model, version, variant), release=release,
                    requirements=requirements, preference=preference, accuracy={"top1_drop": 0.0},
                    golden_path=target_path(model, version, variant, ".golden.npz"),
                ))


def spec_for(**changes: Any) -> RolloutSpec:
    values: dict[str, Any] = {"model": "digits", "version": "1.1.0", "selector": "site in (berlin,paris)",
                              "stages": (0.3, 1.0), "bake_s": 0, "min_devices_per_stage": 1}
    values.update(changes)
    return RolloutSpec(**values)


class RecordingPublisher:
    """Stands in for controller.broker.Bridge: records every desired set in order (``sets``), and
    the entry each one changed, the one at the set's generation (``sent``)."""

    def __init__(self) -> None:
        self.sets: list[DesiredSet] = []
        self.sent: list[Desired] = []
        self.fail = False

    def publish_desired(self, *desired: DesiredSet) -> None:
        from edgefleet.controller.errors import Unavailable

        if self.fail:
            raise Unavailable("broker unreachable (test)")
        for message in desired:
            DesiredSet.from_json(message.to_json())  # what goes on the wire must parse
        self.record(*desired)

    def record(self, *desired: DesiredSet) -> None:
        for message in desired:
            self.sets.append(message)
            self.sent.append(next(e for e in message.models if e.generation == message.generation))

    def to(self, device: str) -> list[Desired]:
        return [d for d in self.sent if d.device == device]
