"""Hardware profiles (what a device is) and requirements (what a variant needs).

Data types only: the agent probes and reports its profile (``agent/probe.py``),
the bundle builder declares each variant's requirements, and the controller
matches the two to pick a variant per device.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .record import Record

ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8l": "aarch64"}


def normalize_arch(arch: str) -> str:
    arch = arch.lower()
    return ARCH_ALIASES.get(arch, arch)


@dataclass(frozen=True)
class HardwareProfile:
    arch: str
    cpu_model: str = ""
    cpu_features: tuple[str, ...] = ()     # normalized: avx2, avx512f, avx512_vnni, neon, dotprod, ...
    cpu_count: int = 1
    memory_mb: int = 0
    os: str = ""
    device_model: str = ""                 # device tree model, e.g. "Raspberry Pi 4 Model B Rev 1.4"
    jetson: dict[str, str] = field(default_factory=dict)  # l4t release, module
    gpu: str = ""
    providers: tuple[str, ...] = ("CPUExecutionProvider",)  # ORT providers that create a session

    @property
    def hardware_class(self) -> str:
        """A coarse grouping used for evidence and stage spreading."""
        if self.jetson:
            return f"jetson-{self.jetson.get('module', 'unknown')}".lower().replace(" ", "-")
        if "raspberry pi" in self.device_model.lower():
            match = re.search(r"raspberry pi (\d+|zero[ 0-9w]*)", self.device_model.lower())
            return f"rpi-{match.group(1).replace(' ', '') if match else 'unknown'}"
        gpu = "-cuda" if "CUDAExecutionProvider" in self.providers else ""
        return f"{self.arch}{gpu}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["cpu_features"] = list(self.cpu_features)
        data["providers"] = list(self.providers)
        data["hardware_class"] = self.hardware_class
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HardwareProfile:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["arch"] = normalize_arch(str(known.get("arch", "unknown")))
        known["cpu_features"] = tuple(known.get("cpu_features", ()))
        known["providers"] = tuple(known.get("providers", ("CPUExecutionProvider",)))
        known["jetson"] = dict(known.get("jetson") or {})
        return cls(**known)


@dataclass(frozen=True)
class Requirements(Record):
    """What a variant needs from a device. Empty fields mean "anything"."""

    arch: tuple[str, ...] = ()             # any of these
    providers: tuple[str, ...] = ("CPUExecutionProvider",)  # all of these must work
    cpu_features: tuple[str, ...] = ()     # all of these
    min_memory_mb: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "arch", tuple(normalize_arch(a) for a in self.arch))

    def unmet(self, profile: HardwareProfile) -> list[str]:
        """Reasons the profile does not meet these requirements (empty when it does)."""
        reasons = []
        if self.arch and profile.arch not in self.arch:
            reasons.append(f"arch {profile.arch} is not one of {', '.join(self.arch)}")
        missing = [p for p in self.providers if p not in profile.providers]
        if missing:
            reasons.append(f"execution provider {', '.join(missing)} not available")
        features = [f for f in self.cpu_features if f not in profile.cpu_features]
        if features:
            reasons.append(f"CPU lacks {', '.join(features)}")
        if self.min_memory_mb and profile.memory_mb < self.min_memory_mb:
            reasons.append(f"memory {profile.memory_mb} MB is below {self.min_memory_mb} MB")
        return reasons
