"""Production-like inference traffic for simulated devices, and the data it sends back.

Each device, at ``requests_per_s``, runs single-row requests on its ACTIVE model
through the real ``ModelRuntime.infer`` (counters, swap pinning; the session
underneath is the fleet's shared one), feeds the outputs to the real
``Sampler`` under the policy of its desired state, and offers the buffered
samples to the controller through the real ``controller_poster``. Counters
telemetry goes out with the device's heartbeat, as the daemon sends it.

No thread per device: a device's tick is a timer on the fleet's network loop
that hands a batch of requests (or an upload) to a small shared pool. A device
whose previous batch has not finished yet sheds the new one, so a slow model
or an overloaded machine bounds the queue instead of growing it.

Inputs, first that fits the model: rows of ``inputs`` (an ``.npz`` keyed by the
model's input names, e.g. the digits eval set), the golden inputs of the active
slot, or a seeded generator matching the model's input specs.
"""
from __future__ import annotations

import logging
import random
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefleet.agent.errors import ModelError
from edgefleet.agent.runtime import (
    LoadedModel,
    NotServingError,
    TensorSpec,
)
from edgefleet.agent.sampler import Post
from edgefleet.agent.slots import GOLDEN_FILE
from edgefleet.agent.units import Units
from edgefleet.common.errors import EdgefleetError, GoldenFormatError
from edgefleet.common.golden import GoldenSet

log = logging.getLogger(__name__)

TICK_S = 1.0                 # a device's requests are batched per tick of this length
UPLOAD_TIMEOUT_S = 10.0      # one sample upload; a pool thread must not wait out a dead link for long
MAX_INPUT_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class TrafficConfig:
    requests_per_s: float = 0.0          # per device; 0: no traffic, no sampling
    upload_interval_s: float = 10.0      # buffered samples are offered to the controller this often
    inputs: Path | None = None           # .npz of input rows keyed by input name
    threads: int = 2                     # the shared pool that runs every device's requests and uploads
    seed: int = 0

    @property
    def enabled(self) -> bool:
        return self.requests_per_s > 0


@dataclass
class TrafficStats:
    requests: int = 0        # requests that reached a model
    failures: int = 0        # the model failed to run
    shed: int = 0            # requests not run: the device's previous batch was still running
    samples_uploaded: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"requests": self.requests, "failures": self.failures, "shed": self.shed,
                "samples_uploaded": self.samples_uploaded}


class InputSource:
    """Single-row requests cycling through rows of arrays keyed by input name."""

    def __init__(self, arrays: Mapping[str, np.ndarray], rng: random.Random) -> None:
        self.arrays = dict(arrays)
        self.rows = min(len(a) for a in self.arrays.values())
        self._next = rng.randrange(self.rows)

    def take(self) -> dict[str, np.ndarray]:
        row, self._next = self._next, (self._next + 1) % self.rows
        return {name: values[row:row + 1] for name, values in self.arrays.items()}

    @classmethod
    def matching(cls, arrays: Mapping[str, np.ndarray], specs: tuple[TensorSpec, ...],
                 rng: random.Random) -> InputSource | None:
        """Rows of the arrays the model takes (others, such as labels, left out); None if they do not fit."""
        if not cls.fits(arrays, specs):
            return None
        return cls({spec.name: arrays[spec.name] for spec in specs}, rng)

    @staticmethod
    def fits(arrays: Mapping[str, np.ndarray], specs: tuple[TensorSpec, ...]) -> bool:
        """Whether one row of ``arrays`` is a valid request for inputs ``specs``."""
        for spec in specs:
            value = arrays.get(spec.name)
            if value is None or value.dtype != spec.dtype or value.ndim != len(spec.shape) or len(value) == 0:
                return False
            if any(want is not None and got != want for got, want in zip(value.shape[1:], spec.shape[1:], strict=True)):
                return False
        return True

    @classmethod
    def generated(cls, specs: tuple[TensorSpec, ...], rng: random.Random, rows: int = 64) -> InputSource:
        """Seeded inputs of the right dtype and shape (dynamic dimensions: 1)."""
        generator = np.random.default_rng(rng.getrandbits(32))
        arrays = {}
        for spec in specs:
            shape = (rows, *(1 if d is None else d for d in spec.shape[1:]))
            if spec.dtype.kind == "f":
                arrays[spec.name] = generator.random(shape).astype(spec.dtype)
            elif spec.dtype.kind == "b":
                arrays[spec.name] = generator.random(shape) < 0.5
            else:
                arrays[spec.name] = generator.integers(0, 10, shape).astype(spec.dtype)
        return cls(arrays, rng)


def load_inputs(path: Path) -> dict[str, np.ndarray]:
    """The ``--inputs`` file: arrays by input name (ValueError names the problem)."""
    try:
        if path.stat().st_size > MAX_INPUT_BYTES:
            raise ValueError(f"input file {path} is larger than {MAX_INPUT_BYTES} bytes")
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read input rows from {path}: {e}; give an .npz keyed by input name") from e


class Traffic:
    """The fleet-wide part: configuration, the shared pool, the input rows, the totals."""

    def __init__(self, config: TrafficConfig) -> None:
        self.config = config
        self.dataset = load_inputs(config.inputs) if config.inputs else {}
        self.pool = ThreadPoolExecutor(max_workers=config.threads, thread_name_prefix="sim-traffic")
        self.stats = TrafficStats()
        self._lock = threading.Lock()

    def count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + delta)

    def snapshot(self) -> TrafficStats:
        with self._lock:
            return TrafficStats(**self.stats.to_dict())

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class DeviceTraffic:
    """One device incarnation's requests, sampling and uploads (driven by ``tick`` on the network loop).
    The requests go to the models the device serves in turn."""

    def __init__(self, traffic: Traffic, device_id: str, units: Units, post: Post | None) -> None:
        self.traffic = traffic
        self.device_id = device_id
        self.units = units
        self.post = post
        self._rng = random.Random(f"{traffic.config.seed}:{device_id}")
        self._sources: dict[str, tuple[LoadedModel, InputSource]] = {}
        self._owed = 0.0
        self._serving = False
        self._uploading = False
        self._since_upload = 0.0

    def tick(self, elapsed_s: float = TICK_S) -> None:
        """Due requests go to the pool (unless the last batch still runs); an upload when it is time."""
        self._owed += self.traffic.config.requests_per_s * elapsed_s
        due, self._owed = int(self._owed), self._owed - int(self._owed)
        if due:
            if self._serving:
                self.traffic.count(shed=due)
            else:
                self._serving = True
                self.traffic.pool.submit(self._serve, due)
        self._since_upload += elapsed_s
        upload_due = self._since_upload >= self.traffic.config.upload_interval_s
        if self.post is not None and not self._uploading and upload_due:
            self._since_upload = 0.0
            self._uploading = True
            self.traffic.pool.submit(self._upload)

    def _serve(self, count: int) -> None:
        try:
            serving = [(unit, loaded) for unit in self.units if (loaded := unit.runtime.active) is not None]
            served = failures = 0
            for i, (unit, loaded) in enumerate(serving):
                source = self._inputs(loaded)
                for _ in range(count // len(serving) + (i < count % len(serving))):
                    inputs = source.take()
                    try:
                        outputs, used = unit.runtime.infer(inputs)
                    except NotServingError:
                        break  # mid-swap or nothing loaded: the rest does not reach a model
                    except ModelError:
                        served, failures = served + 1, failures + 1  # the runtime counts it as this model's failure
                        continue
                    served += 1
                    if used.ref is not None:
                        unit.sampler.observe(inputs, outputs, used.ref)
            self.traffic.count(requests=served, failures=failures)
        except (EdgefleetError, OSError) as e:  # e.g. a full disk under the sample buffer
            log.warning("%s: traffic batch stopped: %s", self.device_id, e)
        finally:
            self._serving = False

    def _upload(self) -> None:
        try:
            assert self.post is not None  # an upload is only started with a poster
            self.traffic.count(samples_uploaded=sum(unit.sampler.upload_pending(self.post) for unit in self.units))
        except OSError as e:
            log.warning("%s: sample upload stopped: %s", self.device_id, e)
        finally:
            self._uploading = False

    def _inputs(self, loaded: LoadedModel) -> InputSource:
        """The input rows for the active model, chosen once per loaded model."""
        known = self._sources.get(loaded.name)
        if known is not None and known[0] is loaded:
            return known[1]
        source = InputSource.matching(self.traffic.dataset, loaded.inputs, self._rng)
        golden = loaded.path.with_name(GOLDEN_FILE)  # an installed slot keeps its golden set beside the model
        if source is None and golden.exists():
            try:
                source = InputSource.matching(GoldenSet.load(golden).inputs, loaded.inputs, self._rng)
            except (GoldenFormatError, OSError) as e:
                log.info("%s: golden inputs unreadable (%s); generating inputs", self.device_id, e)
        if source is None:
            source = InputSource.generated(loaded.inputs, self._rng)
        self._sources[loaded.name] = (loaded, source)
        return source
