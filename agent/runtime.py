"""ONNX Runtime sessions for the agent: load, validate inputs, infer, hot-swap.

A swap never fails or drops a request: each request pins the ``LoadedModel``
it started on (an in-flight counter), new requests take whatever is active
when they start, and a swapped-out model releases its session the moment its
last in-flight request finishes. When memory cannot hold two sessions the
runtime swaps resource-preserving: new requests wait while the old session
drains and the new one loads.
"""
from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgefleet.common.protocol import CounterSnapshot, ModelCounters, ModelRef
from edgefleet.common.settings import ConfigError

from .batching import Batcher, BatchPolicy
from .config import AgentConfig
from .errors import ModelError, RequestError

if TYPE_CHECKING:
    import onnxruntime as ort  # imported when a model loads, not with the agent

log = logging.getLogger(__name__)

# ORT element type -> (Open Inference Protocol datatype, numpy dtype)
_TYPES: dict[str, tuple[str, np.dtype]] = {
    "tensor(bool)": ("BOOL", np.dtype(np.bool_)),
    "tensor(uint8)": ("UINT8", np.dtype(np.uint8)),
    "tensor(uint16)": ("UINT16", np.dtype(np.uint16)),
    "tensor(uint32)": ("UINT32", np.dtype(np.uint32)),
    "tensor(uint64)": ("UINT64", np.dtype(np.uint64)),
    "tensor(int8)": ("INT8", np.dtype(np.int8)),
    "tensor(int16)": ("INT16", np.dtype(np.int16)),
    "tensor(int32)": ("INT32", np.dtype(np.int32)),
    "tensor(int64)": ("INT64", np.dtype(np.int64)),
    "tensor(float16)": ("FP16", np.dtype(np.float16)),
    "tensor(float)": ("FP32", np.dtype(np.float32)),
    "tensor(double)": ("FP64", np.dtype(np.float64)),
}
DATATYPES: dict[str, np.dtype] = dict(_TYPES.values())
"""Open Inference Protocol datatype -> numpy dtype, for the tensor types the runtime serves."""


class NotServingError(ModelError):
    """No model is active right now (none loaded yet, or a resource-preserving swap ran long)."""


LATENCY_BUCKETS_MS: tuple[float, ...] = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)

ModelLabels = tuple[str, str, str]  # (model, version, variant): one series of /metrics


@dataclass(frozen=True)
class RuntimeOptions:
    """Session settings. Defaults suit a small device shared with other work."""

    intra_op_threads: int = 1
    inter_op_threads: int = 1
    allow_spinning: bool = False             # busy-waiting pool threads burn CPU that others need
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    parallel_execution: bool = False         # ORT_PARALLEL only helps graphs with many branches
    memory_margin_bytes: int = 64 * 1024 * 1024  # free memory kept back when loading beside a session
    session_memory_factor: float = 2.0       # a session takes about this many times its file size
    hold_timeout_s: float = 30.0             # longest a request waits out a resource-preserving swap
    batching: BatchPolicy | None = None      # dynamic batching for models with a batch dimension; None: off

    @classmethod
    def from_config(cls, config: AgentConfig, providers: tuple[str, ...] | None = None,
                    model: str | None = None) -> RuntimeOptions:
        """The options of ``model``'s runtime (its ``model_batching`` entry, if any)."""
        return cls(
            intra_op_threads=config.intra_op_threads,
            inter_op_threads=config.inter_op_threads,
            allow_spinning=config.allow_spinning,
            providers=providers or cls.providers,
            batching=batch_policy(config, model),
        )

    def session_options(self) -> ort.SessionOptions:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.intra_op_threads
        so.inter_op_num_threads = self.inter_op_threads
        so.execution_mode = (
            ort.ExecutionMode.ORT_PARALLEL if self.parallel_execution else ort.ExecutionMode.ORT_SEQUENTIAL
        )
        spin = "1" if self.allow_spinning else "0"
        so.add_session_config_entry("session.intra_op.allow_spinning", spin)
        so.add_session_config_entry("session.inter_op.allow_spinning", spin)
        so.log_severity_level = 3  # errors only: warnings would flood a device's journal
        return so


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: ``None`` in ``shape`` is a dynamic dimension."""

    name: str
    datatype: str
    dtype: np.dtype
    shape: tuple[int | None, ...]

    def to_dict(self) -> dict:
        """Open Inference Protocol tensor metadata (-1 marks a dynamic dimension)."""
        return {"name": self.name, "datatype": self.datatype, "shape": [-1 if d is None else d for d in self.shape]}

    def check(self, value: np.ndarray) -> None:
        """Raise RequestError unless ``value`` has this tensor's dtype and a compatible shape."""
        if value.dtype != self.dtype:
            got = _DATATYPE_OF.get(value.dtype, str(value.dtype))
            raise RequestError(f"input {self.name!r} has datatype {got}; the model expects {self.datatype}")
        if value.ndim != len(self.shape) or any(
            want is not None and got != want for got, want in zip(value.shape, self.shape, strict=True)
        ):
            raise RequestError(
                f"input {self.name!r} has shape {list(value.shape)}; the model expects "
                f"{self.to_dict()['shape']} (-1 = any size)"
            )


_DATATYPE_OF = {dtype: name for name, dtype in DATATYPES.items()}


def _spec(arg: ort.NodeArg) -> TensorSpec | None:
    known = _TYPES.get(arg.type)
    if known is None:
        return None  # sequences, maps, strings: not served over the tensor protocol
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in (arg.shape or ()))
    return TensorSpec(arg.name, known[0], known[1], shape)


class LoadedModel:
    """An ONNX Runtime session plus what the server and gate need to know about it.

    The session is released once the model is retired (swapped out or discarded)
    and its last in-flight request has finished.
    """

    def __init__(self, session: ort.InferenceSession, path: Path, ref: ModelRef | None, load_ms: float,
                 memory_kb: int | None = None) -> None:
        self.session = session
        self.path = path
        self.ref = ref
        self.load_ms = load_ms  # untimed-phase figure for the benchmark's cold start
        self.memory_kb = memory_kb  # resident memory the process grew by while the session was created
        self.size_bytes = path.stat().st_size
        self.provider = session.get_providers()[0]
        inputs = [_spec(a) for a in session.get_inputs()]
        specs = tuple(spec for spec in inputs if spec is not None)
        if len(specs) != len(inputs):
            bad = [a.name for a, s in zip(session.get_inputs(), inputs, strict=True) if s is None]
            raise ModelError(
                f"model {path.name} has non-tensor input(s) {', '.join(bad)}; only tensor inputs are served"
            )
        self.inputs: tuple[TensorSpec, ...] = specs
        self.outputs: tuple[TensorSpec, ...] = tuple(s for s in map(_spec, session.get_outputs()) if s is not None)
        self._output_names = [s.name for s in self.outputs]
        self.input_specs = {spec.name: spec for spec in self.inputs}
        self.output_specs = {spec.name: spec for spec in self.outputs}
        # This model's own requests: a swap starts a new segment, so a new version's error
        # rate is never diluted by the old one's. ``since`` (wall clock) names the segment.
        self.counters = Counters()
        self.since = time.time()
        self.labels: ModelLabels = (self.name, self.version, ref.variant if ref else "local")
        self.batcher: Batcher | None = None  # set by ModelRuntime.load when its options batch this model
        self._lock = threading.Lock()
        self._inflight = 0
        self._retired = False
        self._released = threading.Event()

    @property
    def name(self) -> str:
        return self.ref.model if self.ref else self.path.stem

    @property
    def version(self) -> str:
        return self.ref.version if self.ref else "1"

    @property
    def released(self) -> bool:
        return self._released.is_set()

    def validate(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        expected = self.input_specs
        unknown = sorted(set(inputs) - set(expected))
        if unknown:
            raise RequestError(f"unknown input(s) {', '.join(unknown)}; the model takes {', '.join(expected)}")
        missing = [name for name in expected if name not in inputs]
        if missing:
            raise RequestError(f"missing input(s) {', '.join(missing)}")
        checked = {}
        for name, spec in expected.items():
            value = inputs[name]
            if not isinstance(value, np.ndarray):
                raise RequestError(f"input {name!r} must be a numpy array")
            spec.check(value)
            checked[name] = value
        return checked

    @property
    def batchable(self) -> bool:
        """Every input's first dimension is dynamic: requests can be stacked along it."""
        return bool(self.inputs) and all(spec.shape and spec.shape[0] is None for spec in self.inputs)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate and run on this model's session (no swap protection: use ModelRuntime.infer to serve)."""
        return self.run_feed(self.validate(inputs))

    def serve(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``run``, through the dynamic batcher when this model has one."""
        feed = self.validate(inputs)
        return self.run_feed(feed) if self.batcher is None else self.batcher.infer(feed)

    def run_feed(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run a validated feed."""
        session = self.session
        if session is None:
            raise ModelError(f"model {self.name} {self.version} was released; run it through the active runtime")
        try:
            values = session.run(self._output_names, feed)
        except Exception as e:  # ORT raises many unrelated types for one failure
            from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

            if isinstance(e, InvalidArgument):
                raise RequestError(f"model {self.name} rejected the input: {_first_line(e)}") from e
            raise ModelError(f"model {self.name} {self.version} failed to run: {_first_line(e)}") from e
        return dict(zip(self._output_names, values, strict=True))

    def retire(self) -> None:
        """Release the session once in-flight requests drain (at once if none)."""
        with self._lock:
            self._retired = True
            self._release_if_drained()

    def wait_released(self, timeout: float | None = None) -> bool:
        return self._released.wait(timeout)

    def _enter(self) -> None:
        with self._lock:
            self._inflight += 1

    def _exit(self) -> None:
        with self._lock:
            self._inflight -= 1
            self._release_if_drained()

    def _release_if_drained(self) -> None:
        if self._retired and self._inflight == 0 and self.session is not None:
            self.session = None  # the last reference: ORT frees the session's memory here
            self._released.set()

    def __repr__(self) -> str:
        return f"<LoadedModel {self.name} {self.version} {self.provider} inflight={self._inflight}>"


@dataclass
class Counters:
    """Inference counters for telemetry, cumulative since counting began (runtime start or model load)."""

    requests: int = 0   # every request that reached a model, good or bad
    rejected: int = 0   # bad requests (RequestError)
    failures: int = 0   # the model failed to run
    latency_buckets_ms: tuple[float, ...] = LATENCY_BUCKETS_MS
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))
    latency_sum_s: float = 0.0  # a Prometheus histogram's _sum (not on the wire)

    def add(self, rejected: int = 0, failures: int = 0, seconds: float | None = None) -> None:
        self.requests += 1
        self.rejected += rejected
        self.failures += failures
        if seconds is not None:
            self.latency_counts[bisect.bisect_left(self.latency_buckets_ms, seconds * 1000.0)] += 1
            self.latency_sum_s += seconds

    def snapshot(self) -> CounterSnapshot:
        return CounterSnapshot(
            requests=self.requests, rejected=self.rejected, failures=self.failures,
            latency_buckets_ms=self.latency_buckets_ms, latency_counts=tuple(self.latency_counts),
        )


@dataclass(frozen=True)
class SwapOutcome:
    loaded: LoadedModel
    previous: ModelRef | None
    preserved: bool  # True: requests were held while the old session made room for the new one


_BATCH_KEYS = ("max_batch_size", "max_queue_delay_us")


def batch_policy(config: AgentConfig, model: str | None = None) -> BatchPolicy | None:
    """How ``model`` batches: its ``model_batching`` entry over the agent-wide settings; None: off.
    A malformed entry raises ConfigError naming it."""
    entry = config.model_batching.get(model, {}) if model else {}
    where = f"model_batching.{model}"
    if not isinstance(entry, dict) or set(entry) - set(_BATCH_KEYS):
        raise ConfigError(f"{where} must be a table of {' and '.join(_BATCH_KEYS)}, got {entry!r}")
    size = entry.get("max_batch_size", config.max_batch_size)
    delay = entry.get("max_queue_delay_us", config.max_queue_delay_us)
    for key, value in zip(_BATCH_KEYS, (size, delay), strict=True):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{where}.{key} must be an integer of 0 or more, got {value!r}")
    return BatchPolicy(size, delay) if size > 1 else None


def largest_batch(config: AgentConfig) -> int:
    """The most rows any model batches (every ``model_batching`` entry checked on the way)."""
    sizes = [policy.max_batch_size for model in (None, *config.model_batching)
             if (policy := batch_policy(config, model)) is not None]
    return max(sizes, default=0)


def rss_kb() -> int | None:
    """This process's resident memory (VmRSS), None where /proc does not tell."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def available_memory() -> int:
    """MemAvailable in bytes (0 when unknown, which forces a resource-preserving swap)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class ModelRuntime:
    def __init__(
        self, options: RuntimeOptions | None = None, free_memory: Callable[[], int] = available_memory
    ) -> None:
        self.options = options or RuntimeOptions()
        self._free_memory = free_memory
        self._cond = threading.Condition()
        self._active: LoadedModel | None = None
        self._held = False
        self._counters = Counters()
        # every model this process served, cumulative across swaps and reloads: what /metrics shows
        self._by_model: dict[ModelLabels, Counters] = {}
        self._counter_lock = threading.Lock()

    @property
    def active(self) -> LoadedModel | None:
        return self._active

    def load(self, path: Path, ref: ModelRef | None = None) -> LoadedModel:
        import onnxruntime as ort

        path = Path(path)
        available = ort.get_available_providers()
        providers = [p for p in self.options.providers if p in available] or ["CPUExecutionProvider"]
        started, rss_before = time.perf_counter(), rss_kb()
        try:
            session = ort.InferenceSession(str(path), self.options.session_options(), providers=providers)
        except Exception as e:  # ORT raises many unrelated types for one failure
            raise ModelError(f"cannot load model {path.name}: {_first_line(e)}") from e
        rss_after = rss_kb()
        memory_kb = max(0, rss_after - rss_before) if rss_before is not None and rss_after is not None else None
        loaded = LoadedModel(session, path, ref, (time.perf_counter() - started) * 1000.0, memory_kb)
        if self.options.batching is not None:
            if loaded.batchable:
                loaded.batcher = Batcher(loaded.run_feed, self.options.batching)
            else:
                log.warning("%s has an input without a dynamic first (batch) dimension: served without batching",
                            path.name)
        return loaded

    def swap(self, new: LoadedModel) -> LoadedModel | None:
        """Make ``new`` active; the old model drains and releases its session. Returns the old one."""
        with self._cond:
            old, self._active = self._active, new
            self._cond.notify_all()
        if old is not None and old is not new:
            old.retire()
        return old

    def fits_beside(self, path: Path) -> bool:
        """Whether a second session for ``path`` fits in free memory with the configured margin."""
        need = Path(path).stat().st_size * self.options.session_memory_factor + self.options.memory_margin_bytes
        return self._free_memory() >= need

    def replace(
        self, path: Path, ref: ModelRef | None, check: Callable[[LoadedModel], None] | None = None
    ) -> SwapOutcome:
        """Load ``path``, run ``check`` on it (raise to refuse), and make it active.

        Loads beside the serving session when memory allows, else swaps
        resource-preserving. A failed load or check leaves the old model serving.
        """
        if self._active is None or self.fits_beside(path):
            new = self.load(path, ref)
            try:
                if check is not None:
                    check(new)
            except BaseException:
                new.retire()
                raise
            old = self.swap(new)
            return SwapOutcome(new, old.ref if old else None, preserved=False)
        return self.swap_preserving(path, ref, check)

    def swap_preserving(
        self, path: Path, ref: ModelRef | None, check: Callable[[LoadedModel], None] | None = None
    ) -> SwapOutcome:
        """Hold new requests, drain and release the old session, load (and check) the new one, resume.

        If the new model fails to load or its check raises, the old model is
        loaded again from its file before requests resume, and the error is re-raised.
        """
        with self._cond:
            self._held = True
            old, self._active = self._active, None
        try:
            if old is not None:
                old.retire()
                old.wait_released()
            try:
                new = self.load(path, ref)
                if check is not None:
                    check(new)
            except BaseException:
                if old is not None:
                    self._set_active(self.load(old.path, old.ref))
                raise
            self._set_active(new)
            return SwapOutcome(new, old.ref if old else None, preserved=True)
        finally:
            with self._cond:
                self._held = False
                self._cond.notify_all()

    def _set_active(self, loaded: LoadedModel) -> None:
        with self._cond:
            self._active = loaded
            self._cond.notify_all()

    def _acquire(self) -> LoadedModel:
        """Count a request on the active model, waiting out a resource-preserving swap."""
        with self._cond:
            if self._held and not self._cond.wait_for(lambda: not self._held, self.options.hold_timeout_s):
                raise NotServingError("the model is being replaced and did not come back in time; retry")
            loaded = self._active
            if loaded is None:
                raise NotServingError("no model is loaded; wait for the agent to install one")
            loaded._enter()
            return loaded

    @contextmanager
    def pinned(self) -> Iterator[LoadedModel]:
        """The active model, kept from release until the block ends, however many swaps happen meanwhile."""
        loaded = self._acquire()
        try:
            yield loaded
        finally:
            loaded._exit()

    def infer(self, inputs: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], LoadedModel]:
        loaded = self._acquire()  # pinned() inlined: this is every request's path
        started = time.perf_counter()
        try:
            outputs = loaded.serve(inputs)
        except RequestError:
            self._count(loaded, rejected=1)
            raise
        except ModelError:
            self._count(loaded, failures=1)
            raise
        finally:
            loaded._exit()
        self._count(loaded, seconds=time.perf_counter() - started)
        return outputs, loaded

    def _count(self, loaded: LoadedModel, rejected: int = 0, failures: int = 0, seconds: float | None = None) -> None:
        with self._counter_lock:
            self._counters.add(rejected, failures, seconds)
            loaded.counters.add(rejected, failures, seconds)
            served = self._by_model.get(loaded.labels)
            if served is None:
                served = self._by_model[loaded.labels] = Counters()
            served.add(rejected, failures, seconds)

    def counters(self) -> CounterSnapshot:
        """Every request since the runtime started, whichever model served it."""
        with self._counter_lock:
            return self._counters.snapshot()

    def counters_by_model(self) -> dict[ModelLabels, Counters]:
        """Copies of the cumulative counters of every model served since the runtime started."""
        with self._counter_lock:
            return {labels: replace(c, latency_counts=list(c.latency_counts)) for labels, c in self._by_model.items()}

    def active_counters(self) -> ModelCounters | None:
        """The payload of ``counters`` telemetry: the active model's own counters since it was
        loaded, tagged with its ModelRef; ``since`` tells one load (segment) from the next.
        None when nothing with a ModelRef is being served."""
        loaded = self._active
        if loaded is None or loaded.ref is None:
            return None
        with self._counter_lock:
            return ModelCounters.of(loaded.ref, loaded.since, loaded.counters.snapshot())

    def close(self) -> None:
        with self._cond:
            old, self._active = self._active, None
        if old is not None:
            old.retire()


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
