"""Hardware probing: what this device is (/proc, the device tree, ONNX Runtime providers)."""
from __future__ import annotations

import os
import platform
import re
from pathlib import Path

from edgefleet.common.hardware import HardwareProfile, normalize_arch

# /proc/cpuinfo flag -> normalized feature name (x86 "flags", Arm "Features").
_FEATURES = {
    "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c",
    "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512_vnni": "avx512_vnni",
    "avx_vnni": "avx_vnni", "amx_int8": "amx_int8",
    "neon": "neon", "asimd": "neon", "asimddp": "dotprod", "asimdhp": "fp16", "i8mm": "i8mm", "sve": "sve",
}


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace").strip("\x00\n ")
    except OSError:
        return ""


def _cpuinfo() -> tuple[str, tuple[str, ...]]:
    model, flags = "", set()
    for line in _read("/proc/cpuinfo").splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features"):
            flags.update(value.split())
    return model or platform.processor(), tuple(sorted({_FEATURES[f] for f in flags if f in _FEATURES}))


def _memory_mb() -> int:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 0


def _jetson() -> dict[str, str]:
    release = _read("/etc/nv_tegra_release")
    if not release:
        return {}
    match = re.search(r"R(\d+).*REVISION:\s*([\d.]+)", release)
    info = {"l4t": f"{match.group(1)}.{match.group(2)}" if match else release.splitlines()[0]}
    model = _read("/proc/device-tree/model")
    if model:
        info["module"] = model.replace("NVIDIA ", "").replace(" Developer Kit", "")
    return info


def working_providers(candidates: list[str] | None = None) -> tuple[str, ...]:
    """ORT execution providers that actually create a session, not merely listed ones."""
    import onnxruntime as ort

    from . import _probe_model

    model = _probe_model.tiny_model_bytes()
    working = []
    for provider in candidates or ort.get_available_providers():
        if provider == "AzureExecutionProvider":
            continue  # a remote-inference shim, never a local device capability
        try:
            session = ort.InferenceSession(model, providers=[provider])
        except Exception:  # noqa: BLE001, S112 - any failure means "not usable here"
            continue
        if provider in session.get_providers():
            working.append(provider)
    return tuple(working)


def probe() -> HardwareProfile:
    cpu_model, features = _cpuinfo()
    jetson = _jetson()
    gpu = jetson.get("module", "") if jetson else ""
    return HardwareProfile(
        arch=normalize_arch(platform.machine()),
        cpu_model=cpu_model,
        cpu_features=features,
        cpu_count=os.cpu_count() or 1,
        memory_mb=_memory_mb(),
        os=f"{platform.system()} {platform.release()}",
        device_model=_read("/proc/device-tree/model"),
        jetson=jetson,
        gpu=gpu,
        providers=working_providers(),
    )
