"""What a rollout asks for: :class:`RolloutSpec`, its validation, and its manifest form.

Shares are fractions (0.02 = 2%), durations are seconds. The manifest
(``manifests/rollout.yaml``) is checked against ``manifests/rollout.schema.json``
first, so a bad field is reported with its JSON path; the spec then checks what a
schema cannot (stages increasing, thresholds in range).
"""
from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Callable
from dataclasses import InitVar, asdict, dataclass, field
from functools import cache
from importlib import resources
from typing import Any

import jsonschema
import yaml

from edgefleet.common.cron import Cron
from edgefleet.common.errors import ProtocolError
from edgefleet.common.protocol import NAME, Gate, SamplingPolicy, Window

from ..errors import InvalidInput
from .selector import Selector

API_VERSION = "edgefleet/v1"
KIND = "Rollout"
MAX_MANIFEST_BYTES = 256 * 1024
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_PERCENT = re.compile(r"^([0-9]+(?:\.[0-9]+)?)%$")
# Ten years: a longer bake, timeout or window is a typo, and past ~2.9e11 s a deadline
# (now + duration) no longer fits a datetime.
MAX_DURATION_S = 3650 * 86400


def parse_duration(text: str | float | int, what: str = "duration") -> float:
    """``90`` / ``"90s"`` / ``"10m"`` / ``"1h30m"`` -> seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        raw = str(text).strip()
        if re.fullmatch(r"[0-9]+(\.[0-9]+)?", raw):
            seconds = float(raw)
        elif raw and _DURATION.sub("", raw) == "":
            seconds = sum(float(n) * _UNITS[u] for n, u in _DURATION.findall(raw))
        else:
            raise InvalidInput(f"{what} {text!r} is not a duration: use seconds or e.g. 90s, 10m, 2h, 1h30m")
    if not 0 <= seconds <= MAX_DURATION_S:  # also NaN, which compares false
        raise InvalidInput(f"{what} {text!r} must be 0 to {MAX_DURATION_S // 86400}d")
    return seconds


def parse_fraction(text: str | float | int, what: str = "value") -> float:
    """``"2%"`` -> 0.02; a bare number is already a fraction (``0.02``)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    raw = str(text).strip()
    match = _PERCENT.match(raw)
    if match:
        return float(match.group(1)) / 100
    try:
        return float(raw)
    except ValueError:
        raise InvalidInput(
            f"{what} {text!r} is not a share: write a percentage like 2% or a fraction like 0.02"
        ) from None


def parse_stages(text: str) -> tuple[float, ...]:
    """``"5%,25%,100%"`` -> (0.05, 0.25, 1.0)."""
    parts = [p.strip() for p in text.split(",")]
    if not all(parts):
        raise InvalidInput(f"stages {text!r} has an empty entry: write e.g. 5%,25%,100%")
    return tuple(parse_fraction(p, "stage") for p in parts)


def parse_cron(text: str, what: str = "cron") -> str:
    """A maintenance-window cron the agent will accept, checked by the parser the agent runs."""
    try:
        Cron.parse(text, field=what)
    except ProtocolError as e:
        raise InvalidInput(str(e)) from None
    return text


def percent(value: float) -> str:
    return f"{value * 100:.4g}%"


@dataclass(frozen=True)
class RolloutSpec:
    model: str
    version: str
    selector: str
    stages: tuple[float, ...] = (0.05, 0.25, 1.0)  # cumulative share of selected devices
    bake_s: float = 600.0
    max_failure_rate: float = 0.02       # failed/rejected/rolled back/timed out per finished device
    max_p99_regression: float = 0.15     # new p99 / previous p99 - 1, same hardware class
    max_error_rate: float = 0.01         # inference errors per request
    max_confidence_shift: float = 0.2    # change of the mean top-1 confidence, new vs previous
    min_samples: int = 0                 # a gate passes only on a value over this many samples (0: any)
    p99_budget_ms: float | None = None   # absolute on-device budget (agent gate)
    min_accuracy: float | None = None    # accuracy floor: variants whose task metric (build) is below are not picked
    bench_seconds: float = 1.0           # on-device benchmark length
    min_devices_per_stage: int = 1       # of every hardware class, where possible
    window_cron: str | None = None       # maintenance window (device local time)
    window_duration_s: float | None = None
    allow_downgrade: bool = False
    supersede: bool = False
    device_timeout_s: float = 1800.0
    max_retries: int = 2
    retry_backoff_s: float = 60.0        # doubled per retry
    sampling: SamplingPolicy = field(default_factory=SamplingPolicy)
    # True only for a spec read back from the database: it was validated when the rollout was
    # created, and a stricter release must not stall a rollout that is running
    trusted: InitVar[bool] = False

    def __post_init__(self, trusted: bool) -> None:
        object.__setattr__(self, "stages", tuple(float(s) for s in self.stages))
        if not trusted:
            self.validate()

    def validate(self) -> None:
        for name in ("model", "version"):
            if not NAME.match(getattr(self, name)):
                raise InvalidInput(f"{name} {getattr(self, name)!r} is invalid: use letters, digits, '.', '_' or '-'")
        if not self.selector.strip():
            raise InvalidInput("selector is empty: name the devices, e.g. --to site=berlin")
        Selector.parse(self.selector)
        if not self.stages:
            raise InvalidInput("stages is empty: write e.g. 5%,25%,100%")
        for before, after in itertools.pairwise(self.stages):
            if after <= before:
                raise InvalidInput(f"stages must increase: {percent(after)} follows {percent(before)}")
        if self.stages[0] <= 0:
            raise InvalidInput(f"first stage {percent(self.stages[0])} must be above 0%")
        if abs(self.stages[-1] - 1.0) > 1e-9:
            raise InvalidInput(f"stages must end at 100%, the last is {percent(self.stages[-1])}")
        for name in ("max_failure_rate", "max_error_rate", "max_confidence_shift", "min_accuracy"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise InvalidInput(f"{name} {value:g} is out of range: use 0%..100%")
        if not 0.0 <= self.max_p99_regression <= 10.0:
            raise InvalidInput(f"max_p99_regression {self.max_p99_regression:g} is out of range: use 0%..1000%")
        for name in ("bake_s", "device_timeout_s", "retry_backoff_s", "bench_seconds"):
            if getattr(self, name) < 0:
                raise InvalidInput(f"{name} must not be negative")
        if self.device_timeout_s <= 0:
            raise InvalidInput("device timeout must be above 0s")
        if self.min_devices_per_stage < 0 or self.max_retries < 0 or self.min_samples < 0:
            raise InvalidInput("min_devices_per_stage, min_samples and max_retries must not be negative")
        if (self.window_cron is None) != (self.window_duration_s is None):
            raise InvalidInput("a maintenance window needs both --window CRON and --window-duration")
        try:
            if self.window is not None:
                self.window.validate()
        except ProtocolError as e:
            raise InvalidInput(str(e)) from None

    @property
    def window(self) -> Window | None:
        if self.window_cron is None or self.window_duration_s is None:
            return None
        return Window(cron=self.window_cron, duration_s=int(self.window_duration_s))

    @property
    def device_gate(self) -> Gate:
        """The on-device activation gate sent with every Desired."""
        return Gate(
            p99_budget_ms=self.p99_budget_ms,
            max_p99_regression=self.max_p99_regression,
            bench_seconds=self.bench_seconds,
        )

    # --- manifest form ----------------------------------------------------

    def to_manifest(self, name: str | None = None) -> dict[str, Any]:
        """The manifest (canonical units) that :meth:`from_manifest` reads back."""
        spec: dict[str, Any] = {
            "model": self.model,
            "version": self.version,
            "selector": self.selector,
            "stages": list(self.stages),
            "bake": self.bake_s,
            "min_devices_per_stage": self.min_devices_per_stage,
            "gates": {
                "max_failure_rate": self.max_failure_rate,
                "max_p99_regression": self.max_p99_regression,
                "max_error_rate": self.max_error_rate,
                "max_confidence_shift": self.max_confidence_shift,
                "min_samples": self.min_samples,
                "p99_budget_ms": self.p99_budget_ms,
                "bench_seconds": self.bench_seconds,
                "min_accuracy": self.min_accuracy,
            },
            "allow_downgrade": self.allow_downgrade,
            "supersede": self.supersede,
            "device_timeout": self.device_timeout_s,
            "max_retries": self.max_retries,
            "retry_backoff": self.retry_backoff_s,
            "sampling": asdict(self.sampling),
        }
        if self.window_cron is not None:
            spec["window"] = {"cron": self.window_cron, "duration": self.window_duration_s}
        manifest: dict[str, Any] = {"apiVersion": API_VERSION, "kind": KIND, "spec": spec}
        if name:
            manifest["metadata"] = {"name": name}
        return manifest

    @classmethod
    def from_manifest(cls, manifest: Any, source: str = "manifest") -> RolloutSpec:
        _refuse_non_finite(manifest, source)
        validate_manifest(manifest, source)
        spec = manifest["spec"]
        values = _values(spec)
        try:
            if "window" in spec:
                parse_cron(spec["window"]["cron"], "$.spec.window.cron")
            if "sampling" in spec:
                values["sampling"] = SamplingPolicy.from_dict(spec["sampling"])
            return cls(**values)
        except (InvalidInput, ProtocolError) as e:
            raise InvalidInput(f"{source}: {e}") from None

    @classmethod
    def from_stored(cls, data: dict[str, Any]) -> RolloutSpec:
        """Read back the manifest stored with a rollout as trusted data: not validated again."""
        spec = data["spec"]
        values = _values(spec)
        if "sampling" in spec:
            values["sampling"] = SamplingPolicy(**spec["sampling"])
        return cls(**values, trusted=True)


def _values(spec: dict[str, Any]) -> dict[str, Any]:
    """RolloutSpec's fields from a manifest's ``spec`` (units converted; sampling aside)."""
    gates = spec.get("gates", {})
    window = spec.get("window")
    values: dict[str, Any] = {
        "model": spec["model"],
        "version": spec["version"],
        "selector": spec["selector"],
    }
    converters: dict[str, tuple[str, Callable[[Any], Any]]] = {
        "stages": ("stages", lambda v: tuple(parse_fraction(s, "stage") for s in v)),
        "bake": ("bake_s", lambda v: parse_duration(v, "bake")),
        "min_devices_per_stage": ("min_devices_per_stage", int),
        "allow_downgrade": ("allow_downgrade", bool),
        "supersede": ("supersede", bool),
        "device_timeout": ("device_timeout_s", lambda v: parse_duration(v, "device_timeout")),
        "max_retries": ("max_retries", int),
        "retry_backoff": ("retry_backoff_s", lambda v: parse_duration(v, "retry_backoff")),
    }
    for key, (attr, convert) in converters.items():
        if key in spec:
            values[attr] = convert(spec[key])
    for key in ("max_failure_rate", "max_p99_regression", "max_error_rate", "max_confidence_shift"):
        if key in gates:
            values[key] = parse_fraction(gates[key], key)
    if gates.get("min_accuracy") is not None:
        values["min_accuracy"] = parse_fraction(gates["min_accuracy"], "min_accuracy")
    for key in ("p99_budget_ms", "bench_seconds", "min_samples"):
        if key in gates:
            values[key] = gates[key]
    if window:
        values["window_cron"] = window["cron"]
        values["window_duration_s"] = parse_duration(window["duration"], "window duration")
    return values


@cache
def schema() -> dict[str, Any]:
    text = resources.files("edgefleet.manifests").joinpath("rollout.schema.json").read_text()
    return json.loads(text)


def _refuse_non_finite(manifest: Any, source: str) -> None:
    """NaN and Infinity are not JSON numbers, yet JSON bodies (Python's parser) and YAML (.nan,
    .inf) carry them, and every range check compares false with NaN."""
    pending: list[tuple[str, Any]] = [("$", manifest)]
    while pending:  # iterative: a deeply nested manifest costs no recursion
        path, value = pending.pop()
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidInput(f"{source}: {path}: {value} is not a number a manifest may hold")
        if isinstance(value, dict):
            pending += ((f"{path}.{key}", item) for key, item in value.items())
        elif isinstance(value, list):
            pending += ((f"{path}[{i}]", item) for i, item in enumerate(value))


def validate_manifest(manifest: Any, source: str = "manifest") -> None:
    """Raise InvalidInput naming the JSON path of the first bad field."""
    validator = jsonschema.Draft202012Validator(schema())
    errors = list(validator.iter_errors(manifest))
    if not errors:
        return
    # The deepest error is the most specific; oneOf alternatives are explained by the description.
    error = max(errors, key=lambda e: (len(e.absolute_path), e.message))
    path, message = error.json_path, error.message
    if error.validator == "additionalProperties":
        known = set(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - known)
        path = f"{path}.{unknown[0]}" if unknown else path
        message = f"unknown field; allowed here: {', '.join(sorted(known))}"
    elif error.validator == "oneOf":
        message = f"{error.instance!r} is not valid: {error.schema.get('description', 'see rollout.schema.json')}"
    raise InvalidInput(f"{source}: {path}: {message}")


def load_manifest(text: str | bytes, source: str = "manifest") -> dict[str, Any]:
    """Parse YAML (or JSON) text, bounded in size; validation is :meth:`RolloutSpec.from_manifest`."""
    if len(text) > MAX_MANIFEST_BYTES:
        raise InvalidInput(f"{source} is {len(text)} bytes; the limit is {MAX_MANIFEST_BYTES}")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InvalidInput(f"{source} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"{source} must be a mapping with apiVersion, kind and spec")
    return data

