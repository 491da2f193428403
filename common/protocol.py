"""The wire contract between controller and agents (v1).

Topics, message schemas and their validation, and the custom fields that
edgefleet puts in TUF targets. The controller imports this module; the agent
never imports the controller.

Every message is a JSON object with ``"v": 1``, parsed by the one decoder in
:mod:`.record` from the fields' types. Parsing is strict: unknown fields, wrong
types, oversized payloads and messages whose ``device`` does not match the topic
raise :class:`ProtocolError`, and callers drop the message. Events and telemetry
carry typed payloads (:class:`GateReport`, :class:`Heartbeat`,
:class:`BenchmarkReport`, :class:`ModelCounters`), never free dicts.
An MQTT message is a hint, never trust: a desired state travels signed by the
director role (:mod:`.director`), and whatever it names, the agent installs only
what TUF metadata signs.
"""
from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass, field, fields
from typing import Any, Self

from . import jsonlimit
from .cron import Cron
from .errors import ProtocolError
from .hardware import Requirements
from .record import Record

VERSION = 1
TOPIC_ROOT = "edgefleet/v1"
MAX_MESSAGE_BYTES = 64 * 1024  # a larger MQTT payload is dropped unread
DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class Channel(str, enum.Enum):
    DESIRED = "desired"      # controller -> agent, QoS 1, retained
    REPORTED = "reported"    # agent -> controller, QoS 1, retained
    EVENTS = "events"        # agent -> controller, QoS 1
    TELEMETRY = "telemetry"  # agent -> controller, QoS 0/1
    STATUS = "status"        # agent -> controller, QoS 1, retained; will = offline


RETAINED = {Channel.DESIRED, Channel.REPORTED, Channel.STATUS}


def topic(device: str, channel: Channel) -> str:
    check_device_id(device)
    return f"{TOPIC_ROOT}/{device}/{channel.value}"


def subscription(channel: Channel, share_group: str | None = None) -> str:
    """Wildcard subscription for one channel of every device.

    With ``share_group`` (MQTT 5) replicas split the load: ``$share/GROUP/...``.
    """
    pattern = f"{TOPIC_ROOT}/+/{channel.value}"
    return f"$share/{share_group}/{pattern}" if share_group else pattern


def parse_topic(name: str) -> tuple[str, Channel]:
    parts = name.split("/")
    if len(parts) != 4 or "/".join(parts[:2]) != TOPIC_ROOT:
        raise ProtocolError(f"topic {name!r} is not under {TOPIC_ROOT}/DEVICE/CHANNEL")
    try:
        channel = Channel(parts[3])
    except ValueError:
        raise ProtocolError(f"topic {name!r} names unknown channel {parts[3]!r}") from None
    return check_device_id(parts[2]), channel


def check_device_id(device: str) -> str:
    if not isinstance(device, str) or not DEVICE_ID.match(device):
        raise ProtocolError(
            f"device id {device!r} is invalid: use 1-63 letters, digits, '.', '_' or '-'"
        )
    return device


class ExecutionState(str, enum.Enum):
    """Per-device update execution states (AWS IoT Jobs vocabulary where it fits)."""

    QUEUED = "QUEUED"
    DOWNLOADING = "DOWNLOADING"
    VERIFYING = "VERIFYING"
    STAGED = "STAGED"
    WAITING_WINDOW = "WAITING_WINDOW"  # staged; activation held until the maintenance window
    ACTIVATING = "ACTIVATING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    ROLLED_BACK = "ROLLED_BACK"
    REJECTED = "REJECTED"
    TIMED_OUT = "TIMED_OUT"  # controller-set
    CANCELED = "CANCELED"    # controller-set

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset(
    {
        ExecutionState.SUCCEEDED,
        ExecutionState.FAILED,
        ExecutionState.ROLLED_BACK,
        ExecutionState.REJECTED,
        ExecutionState.TIMED_OUT,
        ExecutionState.CANCELED,
    }
)


# --- wire messages ---------------------------------------------------------


@dataclass(frozen=True)
class Message(Record):
    """Base of every wire message: a :class:`Record` with the wire version ``"v"``."""

    def to_dict(self) -> dict[str, Any]:
        return {"v": VERSION, **super().to_dict()}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_dict(cls, data: Any) -> Self:
        if isinstance(data, dict) and "v" in data:
            data = dict(data)
            version = data.pop("v")
            if version != VERSION:
                raise ProtocolError(f"{cls.__name__} has wire version {version!r}; this side speaks {VERSION}")
        return super().from_dict(data)

    @classmethod
    def from_json(cls, payload: bytes | bytearray | str) -> Self:
        if len(payload) > MAX_MESSAGE_BYTES:
            raise ProtocolError(
                f"{cls.__name__} payload is {len(payload)} bytes; the limit is {MAX_MESSAGE_BYTES}"
            )
        try:
            data = jsonlimit.loads(payload)
        except (ValueError, UnicodeDecodeError) as e:
            raise ProtocolError(f"{cls.__name__} is not valid JSON: {e}") from None
        return cls.from_dict(data)


@dataclass(frozen=True)
class DeviceMessage(Message):
    """A message on a device's topic: it names the device, which must match the topic."""

    device: str


def _non_negative(cls: str, **values: int | float | None) -> None:
    for name, value in values.items():
        if value is not None and value < 0:
            raise ProtocolError(f"{cls}.{name} must be >= 0, got {value}")


# --- messages --------------------------------------------------------------


@dataclass(frozen=True)
class SamplingPolicy(Message):
    """How the agent samples production inputs/outputs for retraining."""

    enabled: bool = False
    rate: float = 0.0                          # fraction of requests kept at random
    reservoir_per_window: int = 0              # uniform reservoir kept per window
    window_s: int = 3600
    low_confidence_below: float | None = None  # keep if top-1 probability < this
    low_margin_below: float | None = None      # keep if top1 - top2 < this
    max_per_hour: int = 100
    max_bytes_per_day: int = 50 * 1024 * 1024

    def validate(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ProtocolError(f"SamplingPolicy.rate must be within 0..1, got {self.rate}")
        for name in ("low_confidence_below", "low_margin_below"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ProtocolError(f"SamplingPolicy.{name} must be within 0..1, got {value}")
        if self.window_s <= 0:
            raise ProtocolError("SamplingPolicy.window_s must be > 0")
        _non_negative(
            "SamplingPolicy",
            reservoir_per_window=self.reservoir_per_window,
            max_per_hour=self.max_per_hour,
            max_bytes_per_day=self.max_bytes_per_day,
        )


# Scheduler and timer jitter on a small shared device is a few hundred microseconds: a p99
# regression smaller than this is noise, however large as a ratio for a very fast model.
# The agent's gate and the controller's rollout gate both honour it.
P99_NOISE_FLOOR_MS = 0.25


@dataclass(frozen=True)
class Gate(Message):
    """On-device activation gate sent with the desired state."""

    p99_budget_ms: float | None = None   # absolute latency budget
    max_p99_regression: float = 0.5      # vs. the previous version on this device (0.5 = +50%)
    bench_seconds: float = 1.0
    bench_min_queries: int = 20

    def validate(self) -> None:
        _non_negative(
            "Gate",
            p99_budget_ms=self.p99_budget_ms,
            max_p99_regression=self.max_p99_regression,
            bench_seconds=self.bench_seconds,
            bench_min_queries=self.bench_min_queries,
        )


@dataclass(frozen=True)
class Window(Message):
    """Maintenance window: activation waits until the cron opens it (device local time)."""

    cron: str
    duration_s: int

    def validate(self) -> None:
        Cron.parse(self.cron, field="Window.cron")
        if self.duration_s <= 0:
            raise ProtocolError("Window.duration_s must be > 0")


class Action(str, enum.Enum):
    INSTALL = "install"    # converge on model/version/variant
    ROLLBACK = "rollback"  # reactivate the previous slot (cloud-initiated rollback)
    NONE = "none"          # nothing desired (device unassigned)


@dataclass(frozen=True)
class Desired(DeviceMessage):
    """What the device should run of one model: an entry of :class:`DesiredSet`."""

    generation: int                 # the DesiredSet generation at which this entry last changed
    action: Action = Action.INSTALL
    deployment: str | None = None   # rollout/execution id the events refer to
    model: str | None = None
    version: str | None = None
    variant: str | None = None
    target: str | None = None       # TUF target path of the variant's model file
    sampling: SamplingPolicy = field(default_factory=SamplingPolicy)
    gate: Gate = field(default_factory=Gate)
    window: Window | None = None

    def validate(self) -> None:
        check_device_id(self.device)
        _non_negative("Desired", generation=self.generation)
        if self.action is Action.INSTALL:
            for name in ("model", "version", "variant", "target"):
                if not getattr(self, name):
                    raise ProtocolError(f"Desired.{name} is required for action install")
        for name in ("model", "version", "variant"):
            value = getattr(self, name)
            if value is not None and not NAME.match(value):
                raise ProtocolError(f"Desired.{name} {value!r} has characters outside [A-Za-z0-9_.-]")


MAX_MODELS = 16  # models one device serves at once; a longer list is refused


@dataclass(frozen=True)
class DesiredSet(DeviceMessage):
    """Controller -> agent: what the device should run, one :class:`Desired` entry per model
    (each with its own rollouts, hot-swap and rollback). Signed (:mod:`.director`), retained, QoS 1.

    ``generation`` rises with every change of any entry; an entry keeps the generation at which
    it last changed, so the agent acts on an entry only when its own generation rises. A model
    the set no longer names keeps what it runs.
    """

    generation: int
    models: tuple[Desired, ...] = ()

    def validate(self) -> None:
        check_device_id(self.device)
        _non_negative("DesiredSet", generation=self.generation)
        if len(self.models) > MAX_MODELS:
            raise ProtocolError(f"DesiredSet names {len(self.models)} models; a device serves at most {MAX_MODELS}")
        names = set()
        for entry in self.models:
            if entry.device != self.device:
                raise ProtocolError(f"DesiredSet for {self.device} has an entry for {entry.device}")
            if not entry.model:
                raise ProtocolError("every DesiredSet entry must name its model")
            if entry.model in names:
                raise ProtocolError(f"DesiredSet names model {entry.model!r} twice")
            if entry.generation > self.generation:
                raise ProtocolError(f"DesiredSet entry {entry.model!r} has generation {entry.generation},"
                                    f" above the set's {self.generation}")
            names.add(entry.model)

    @property
    def deployment(self) -> str | None:
        """The rollout whose change made this generation (None: no entry changed at it)."""
        changed = next((e for e in self.models if e.generation == self.generation), None)
        return changed.deployment if changed is not None else None

    def entry(self, model: str) -> Desired | None:
        return next((e for e in self.models if e.model == model), None)

    def with_entry(self, entry: Desired) -> DesiredSet:
        """This set with ``entry`` added or replacing its model's, at the entry's generation."""
        others = tuple(e for e in self.models if e.model != entry.model)
        return DesiredSet(device=self.device, generation=entry.generation,
                          models=tuple(sorted((*others, entry), key=lambda e: e.model or "")))


@dataclass(frozen=True)
class ModelRef(Message):
    model: str
    version: str
    variant: str
    release: int = 0


@dataclass(frozen=True)
class ModelStatus(Message):
    """One model's part of :class:`Reported`."""

    model: str
    generation: int                 # generation of the model's desired entry last acted on
    active: ModelRef | None = None
    previous: ModelRef | None = None
    # The terminal state the execution of ``generation`` reached, once the device finished its own
    # checks of it (gate, swap, commit or rollback); None while it runs. The controller settles an
    # execution from it when the execution's own events were lost.
    outcome: ExecutionState | None = None
    memory_kb: int | None = None    # resident memory the active version took when it loaded

    def validate(self) -> None:
        _non_negative("ModelStatus", generation=self.generation, memory_kb=self.memory_kb)
        if self.outcome is not None and not self.outcome.terminal:
            raise ProtocolError(f"ModelStatus.outcome must be a terminal state, got {self.outcome.value}")


@dataclass(frozen=True)
class Reported(DeviceMessage):
    """Agent -> controller: what the device runs now, one entry per model. Retained, QoS 1."""

    boot: int
    seq: int
    models: tuple[ModelStatus, ...] = ()
    hardware: dict[str, Any] | None = None  # HardwareProfile.to_dict(), read leniently by its from_dict
    agent_version: str = ""

    def validate(self) -> None:
        check_device_id(self.device)
        _non_negative("Reported", boot=self.boot, seq=self.seq)
        if len(self.models) > MAX_MODELS:
            raise ProtocolError(f"Reported names {len(self.models)} models; the limit is {MAX_MODELS}")
        if len({m.model for m in self.models}) != len(self.models):
            raise ProtocolError("Reported names a model twice")

    def status(self, model: str) -> ModelStatus | None:
        return next((m for m in self.models if m.model == model), None)


@dataclass(frozen=True)
class BenchmarkResult(Message):
    """One on-device benchmark run (agent/bench.py): cold start, SingleStream latency, Offline throughput."""

    model: str
    version: str
    provider: str
    session_create_ms: float      # cold start, part 1: InferenceSession creation
    first_query_ms: float         # cold start, part 2: the first (warm-up) query
    warmup_queries: int
    queries: int                  # SingleStream queries timed
    duration_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    throughput_qps: float         # SingleStream: queries / duration
    offline_batch: int            # 0 when the Offline run was skipped
    offline_samples_per_s: float | None
    peak_rss_mb: float            # of this process (VmHWM), model and all


@dataclass(frozen=True)
class GoldenCheck(Message):
    """The golden-set check of a freshly loaded model."""

    passed: bool
    max_abs_diff: float
    atol: float
    rtol: float
    samples: int


@dataclass(frozen=True)
class GateReport(Message):
    """What the activation gate measured, and the bounds it applied."""

    p99_budget_ms: float | None
    max_p99_regression: float
    previous_p99_ms: float | None = None  # the p99 the new version is held against
    paired: bool = False                  # previous_p99_ms was measured now, side by side with the new
    golden: GoldenCheck | None = None     # None: the golden set could not run
    benchmark: BenchmarkResult | None = None  # None: the gate stopped before the benchmark
    p99_limit_ms: float | None = None     # the regression bound, when there was a previous p99


@dataclass(frozen=True)
class Event(DeviceMessage):
    """Agent -> controller: one update-execution transition. QoS 1."""

    boot: int
    seq: int
    generation: int
    state: ExecutionState
    deployment: str | None = None
    model: str | None = None
    version: str | None = None
    variant: str | None = None
    detail: str = ""
    gate: GateReport | None = None  # on the transition the activation gate decided
    ts: float = 0.0

    def validate(self) -> None:
        check_device_id(self.device)
        _non_negative("Event", boot=self.boot, seq=self.seq, generation=self.generation)
        if len(self.detail) > 2000:
            raise ProtocolError("Event.detail is longer than 2000 characters")


class TelemetryKind(str, enum.Enum):
    HEARTBEAT = "heartbeat"
    BENCHMARK = "benchmark"
    COUNTERS = "counters"


@dataclass(frozen=True)
class CounterSnapshot(Message):
    """Inference counters, cumulative since counting began (agent start or model load)."""

    requests: int    # every request that reached a model, good or bad
    rejected: int    # bad requests
    failures: int    # the model failed to run
    latency_buckets_ms: tuple[float, ...]  # upper bounds; the last count is +Inf
    latency_counts: tuple[int, ...]

    def validate(self) -> None:
        name = type(self).__name__
        _non_negative(name, requests=self.requests, rejected=self.rejected, failures=self.failures)
        if len(self.latency_counts) != len(self.latency_buckets_ms) + 1:
            raise ProtocolError(f"{name}.latency_counts must have one count more than latency_buckets_ms")


@dataclass(frozen=True)
class ModelCounters(CounterSnapshot):
    """``counters`` telemetry: one model version's counters since it was loaded; ``since``
    (wall clock) tells one load (segment) from the next."""

    model: ModelRef
    since: float

    @classmethod
    def of(cls, model: ModelRef, since: float, snapshot: CounterSnapshot) -> ModelCounters:
        counts = {f.name: getattr(snapshot, f.name) for f in fields(CounterSnapshot)}
        return cls(model=model, since=since, **counts)


@dataclass(frozen=True)
class Heartbeat(Message):
    """``heartbeat`` telemetry: the agent is up, and how it fares."""

    uptime_s: float
    active: tuple[ModelRef, ...]     # every model served now
    counters: CounterSnapshot        # every request since the agent started, whichever model served it
    rss_kb: int | None = None        # None: not measured (the simulator)
    samples_pending: int = 0
    samples_dropped: int = 0


@dataclass(frozen=True)
class BenchmarkReport(Message):
    """``benchmark`` telemetry: the activation gate's measurements of one model version."""

    model: ModelRef
    gate: GateReport


_KINDS = tuple(kind.value for kind in TelemetryKind)  # iterating the enum itself costs more, per message
TelemetryPayload = Heartbeat | BenchmarkReport | ModelCounters
_KIND_OF: dict[type[Message], TelemetryKind] = {
    Heartbeat: TelemetryKind.HEARTBEAT,
    BenchmarkReport: TelemetryKind.BENCHMARK,
    ModelCounters: TelemetryKind.COUNTERS,
}


def kind_of(payload: TelemetryPayload) -> TelemetryKind:
    """The telemetry kind that carries ``payload``; Telemetry holds it in the field of that name."""
    return _KIND_OF[type(payload)]


@dataclass(frozen=True)
class Telemetry(DeviceMessage):
    """Agent -> controller: heartbeat, benchmark result or inference counters.

    The payload sits in the field its kind names; the others are null.
    """

    boot: int
    seq: int
    kind: TelemetryKind
    heartbeat: Heartbeat | None = None
    benchmark: BenchmarkReport | None = None
    counters: ModelCounters | None = None
    ts: float = 0.0

    @property
    def payload(self) -> TelemetryPayload:
        payload: TelemetryPayload | None = getattr(self, self.kind.value)
        if payload is None:  # only a message built in code and never validated
            raise ProtocolError(f"Telemetry.{self.kind.value} is null: it must carry the kind's payload")
        return payload

    def validate(self) -> None:
        check_device_id(self.device)
        _non_negative("Telemetry", boot=self.boot, seq=self.seq)
        present = [kind for kind in _KINDS if getattr(self, kind) is not None]
        if present != [self.kind.value]:
            raise ProtocolError(
                f"Telemetry.{self.kind.value} must carry the payload of kind {self.kind.value!r}"
                f" and nothing else; present: {', '.join(present) or 'none'}"
            )


@dataclass(frozen=True)
class Status(DeviceMessage):
    """Agent -> controller: online/offline. The MQTT will carries online=False
    with the boot sequence, so a late will cannot mark a fresh session offline."""

    boot: int
    online: bool
    ts: float = 0.0

    def validate(self) -> None:
        check_device_id(self.device)
        _non_negative("Status", boot=self.boot)


SCHEMAS: dict[Channel, type[DeviceMessage]] = {
    Channel.DESIRED: DesiredSet,
    Channel.REPORTED: Reported,
    Channel.EVENTS: Event,
    Channel.TELEMETRY: Telemetry,
    Channel.STATUS: Status,
}


def decode(topic_name: str, payload: bytes | bytearray) -> tuple[str, Channel, DeviceMessage]:
    """Parse and validate one MQTT message; the device in the body must match the topic."""
    device, channel = parse_topic(topic_name)
    message = SCHEMAS[channel].from_json(payload)
    if message.device != device:
        raise ProtocolError(f"message on {topic_name!r} names device {message.device!r}; dropped")
    return device, channel, message


# --- TUF target custom fields ---------------------------------------------

CUSTOM_KEY = "edgefleet"


def target_path(model: str, version: str, variant: str, suffix: str = ".onnx") -> str:
    """TUF target path of one variant's file (model or golden set)."""
    return f"{model}/{version}/{variant}{suffix}"


def golden_path(model: str, version: str, variant: str) -> str:
    return target_path(model, version, variant, ".golden.npz")


@dataclass(frozen=True)
class TargetInfo(Message):
    """The ``custom.edgefleet`` object of a model target, signed by the targets role."""

    model: str
    version: str
    variant: str
    release: int                  # per-model counter; an agent never installs a lower one
    requirements: Requirements
    golden: str                   # TUF target path of the golden set
    golden_sha256: str            # digest of the golden set file
    accuracy: dict[str, float] = field(default_factory=dict)  # top1, agreement, max_abs_diff vs fp32
    preference: int = 0           # lower is preferred when there is no evidence
    p99_ms: float | None = None   # latency measured at build time (reference machine)

    def validate(self) -> None:
        for name in ("model", "version", "variant"):
            if not NAME.match(getattr(self, name)):
                raise ProtocolError(f"TargetInfo.{name} {getattr(self, name)!r} is invalid")
        _non_negative("TargetInfo", release=self.release)
        if not re.fullmatch(r"[0-9a-f]{64}", self.golden_sha256):
            raise ProtocolError("TargetInfo.golden_sha256 must be 64 hex digits")

    def to_custom(self) -> dict[str, Any]:
        # TUF signs canonical JSON, which has no floats: they travel as decimal strings.
        data = self.to_dict()
        data["accuracy"] = {k: repr(v) if isinstance(v, float) else v for k, v in self.accuracy.items()}
        data["p99_ms"] = None if self.p99_ms is None else repr(float(self.p99_ms))
        return {CUSTOM_KEY: data}

    @classmethod
    def from_custom(cls, custom: dict[str, Any] | None) -> TargetInfo:
        if not custom or not isinstance(custom.get(CUSTOM_KEY), dict):
            raise ProtocolError("target has no edgefleet custom fields")
        data = dict(custom[CUSTOM_KEY])
        try:
            if isinstance(data.get("accuracy"), dict):
                data["accuracy"] = {k: float(v) if isinstance(v, str) else v for k, v in data["accuracy"].items()}
            if isinstance(data.get("p99_ms"), str):
                data["p99_ms"] = float(data["p99_ms"])
        except ValueError as e:
            raise ProtocolError(f"TargetInfo has a malformed number: {e}") from None
        return cls.from_dict(data)
