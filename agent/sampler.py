"""Sampling production inputs and outputs for retraining, buffered on disk, uploaded later.

The controller's SamplingPolicy picks requests at a fixed rate, by a uniform
reservoir per time window, and by low confidence (top-1 probability or top-1
minus top-2 margin below a threshold). Caps on samples per hour and bytes per
day hold in any case, and survive restarts (a small state file).

Each sample is one ``.npz`` (``input/<name>``, ``output/<name>``, ``meta`` JSON
string; readable with ``allow_pickle=False``) written atomically into the
buffer directory, which is bounded in bytes: the oldest samples go first.
Uploads delete a sample only after the controller took it, so samples wait out
offline periods and restarts.
"""
from __future__ import annotations

import io
import itertools
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.common.errors import GoldenFormatError
from edgefleet.common.fs import TEMP_GLOB, atomic_write
from edgefleet.common.golden import read_npz
from edgefleet.common.protocol import ModelRef, SamplingPolicy

from .config import AgentConfig
from .errors import RemoteError, TransportError
from .runtime import LoadedModel

log = logging.getLogger(__name__)

Post = Callable[[bytes, dict], None]

_STATE_FILE = "caps.json"
_RESERVOIR = "reservoir"


@dataclass(frozen=True)
class SampleMeta:
    model: str
    version: str
    variant: str
    device: str
    ts: float
    reason: str            # low_confidence | low_margin | rate | reservoir
    top1: float | None     # lowest top-1 probability over the request's rows
    margin: float | None   # lowest top-1 minus top-2 probability

    def headers(self) -> dict[str, str]:
        return {"X-Edgefleet-Model": self.model, "X-Edgefleet-Version": self.version,
                "X-Edgefleet-Variant": self.variant}


def confidence(outputs: Mapping[str, np.ndarray]) -> tuple[float, float] | None:
    """(lowest top-1 probability, lowest margin) over the rows of the first probability output.

    A probability output is a float tensor whose last axis has >= 2 classes,
    values in [0, 1] and rows that sum to 1 (as a softmax gives). None if the
    model has no such output.
    """
    for value in outputs.values():
        if value.dtype.kind != "f" or value.ndim < 1 or value.shape[-1] < 2 or value.size == 0:
            continue
        rows = value.reshape(-1, value.shape[-1]).astype(np.float64)
        if rows.min() < 0 or rows.max() > 1 or not np.allclose(rows.sum(axis=1), 1.0, atol=1e-3):
            continue
        top2 = np.sort(rows, axis=1)[:, -2:]
        return float(top2[:, 1].min()), float((top2[:, 1] - top2[:, 0]).min())
    return None


def encode_sample(inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], meta: SampleMeta) -> bytes:
    arrays: dict[str, Any] = {f"input/{k}": np.asarray(v) for k, v in inputs.items()}
    arrays.update({f"output/{k}": np.asarray(v) for k, v in outputs.items()})
    arrays["meta"] = np.array(json.dumps(asdict(meta)))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def read_meta(path: Path, max_bytes: int) -> SampleMeta:
    """The metadata of one buffered sample (GoldenFormatError if it is unreadable)."""
    arrays = read_npz(path, max_file_bytes=max_bytes)
    try:
        return SampleMeta(**json.loads(str(arrays["meta"])))
    except (KeyError, TypeError, ValueError) as e:
        raise GoldenFormatError(f"sample {path.name} has no valid metadata: {e}") from e


@dataclass
class _Caps:
    """Fixed-window counters, persisted so a restart does not reset them."""

    hour: int = 0
    hour_count: int = 0
    day: int = 0
    day_bytes: int = 0

    def roll(self, ts: float) -> None:
        if int(ts // 3600) != self.hour:
            self.hour, self.hour_count = int(ts // 3600), 0
        if int(ts // 86400) != self.day:
            self.day, self.day_bytes = int(ts // 86400), 0


class Sampler:
    def __init__(
        self,
        policy: SamplingPolicy,
        buffer_dir: Path,
        device: str = "",
        max_buffer_bytes: int = AgentConfig.sample_buffer_bytes,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.policy = policy
        self.buffer_dir = Path(buffer_dir)
        self.device = device
        self.max_buffer_bytes = max_buffer_bytes
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - picks which requests to sample, not a secret
        self._lock = threading.Lock()
        self._seq = itertools.count()
        self.dropped = 0  # samples refused by a cap or pushed out of the full buffer
        self.uploaded = 0  # samples the controller took, since the process started
        self._reservoir_dir = self.buffer_dir / _RESERVOIR
        self._reservoir_dir.mkdir(parents=True, exist_ok=True)
        for stale in [*self.buffer_dir.glob(TEMP_GLOB), *self._reservoir_dir.glob(TEMP_GLOB)]:
            stale.unlink(missing_ok=True)  # half-written before a crash
        self._caps = self._load_caps()
        self._window: int | None = None
        self._seen = 0
        with self._lock:
            self._promote_reservoir()  # a restart closes the window that was open

    # --- policy -------------------------------------------------------------

    def set_policy(self, policy: SamplingPolicy) -> None:
        with self._lock:
            self.policy = policy

    def on_inference(self, inputs: dict, outputs: dict, loaded: LoadedModel) -> None:
        """The InferenceServer hook."""
        ref = loaded.ref or ModelRef(model=loaded.name, version=loaded.version, variant="local")
        self.observe(inputs, outputs, ref)

    def observe(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], ref: ModelRef) -> str | None:
        """Consider one request; returns why it was kept (or reservoir-held), else None."""
        policy = self.policy
        if not policy.enabled:
            return None
        now = self._clock()
        scores = confidence(outputs) if (
            policy.low_confidence_below is not None or policy.low_margin_below is not None) else None
        reason = self._reason(policy, scores)
        if scores is None and (reason is not None or policy.reservoir_per_window > 0):
            scores = confidence(outputs)  # recorded with every kept sample: the controller indexes it
        with self._lock:
            self._roll_window(now, policy)
            meta = SampleMeta(ref.model, ref.version, ref.variant, self.device, now, reason or "reservoir",
                              *(scores if scores else (None, None)))
            if reason is not None:
                self._caps.roll(now)
                if self._caps.hour_count >= policy.max_per_hour:  # spare the encoding when capped anyway
                    self.dropped += 1
                    return None
                return reason if self._commit(encode_sample(inputs, outputs, meta), now) else None
            if policy.reservoir_per_window > 0 and self._reservoir_offer(
                policy.reservoir_per_window, inputs, outputs, meta
            ):
                return "reservoir"
        return None

    def _reason(self, policy: SamplingPolicy, scores: tuple[float, float] | None) -> str | None:
        if scores is not None:
            top1, margin = scores
            if policy.low_confidence_below is not None and top1 < policy.low_confidence_below:
                return "low_confidence"
            if policy.low_margin_below is not None and margin < policy.low_margin_below:
                return "low_margin"
        if policy.rate > 0 and self._rng.random() < policy.rate:
            return "rate"
        return None

    # --- reservoir (Algorithm R over each window, slots kept on disk) ---------

    def _roll_window(self, now: float, policy: SamplingPolicy) -> None:
        window = int(now // policy.window_s)
        if window != self._window:
            self._promote_reservoir()
            self._window, self._seen = window, 0

    def _reservoir_offer(
        self, k: int, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], meta: SampleMeta
    ) -> bool:
        self._seen += 1
        slot = self._seen - 1 if self._seen <= k else self._rng.randrange(self._seen)
        if slot >= k:
            return False
        atomic_write(self._reservoir_dir / f"slot-{slot:06d}.npz", encode_sample(inputs, outputs, meta))
        return True

    def _promote_reservoir(self) -> None:
        for path in sorted(self._reservoir_dir.glob("slot-*.npz")):
            data = path.read_bytes()
            path.unlink()
            self._commit(data, self._clock())

    def tick(self) -> None:
        """Close the reservoir window if it has ended (traffic may have stopped before the next request)."""
        with self._lock:
            if self._window is not None and int(self._clock() // self.policy.window_s) != self._window:
                self._promote_reservoir()
                self._window, self._seen = None, 0

    # --- buffer -------------------------------------------------------------

    def _commit(self, data: bytes, now: float) -> bool:
        """Write one sample into the buffer if the caps allow; drop the oldest beyond the byte bound."""
        caps = self._caps
        caps.roll(now)
        policy = self.policy
        if caps.hour_count >= policy.max_per_hour or caps.day_bytes + len(data) > policy.max_bytes_per_day \
                or len(data) > self.max_buffer_bytes:
            self.dropped += 1
            return False
        name = f"{time.time_ns():020d}-{os.getpid()}-{next(self._seq):06d}.npz"
        atomic_write(self.buffer_dir / name, data)
        caps.hour_count += 1
        caps.day_bytes += len(data)
        atomic_write(self.buffer_dir / _STATE_FILE, json.dumps(asdict(caps)).encode())
        self._enforce_bound()
        return True

    def _enforce_bound(self) -> None:
        files = self._pending()
        total = sum(p.stat().st_size for p in files)
        for oldest in files:
            if total <= self.max_buffer_bytes:
                break
            total -= oldest.stat().st_size
            oldest.unlink(missing_ok=True)
            self.dropped += 1

    def _load_caps(self) -> _Caps:
        try:
            return _Caps(**json.loads((self.buffer_dir / _STATE_FILE).read_text()))
        except (OSError, ValueError, TypeError):
            return _Caps()  # missing or damaged: start counting afresh

    def _pending(self) -> list[Path]:
        return sorted(self.buffer_dir.glob("*.npz"))

    def pending(self) -> list[Path]:
        """Buffered samples, oldest first."""
        self.tick()
        with self._lock:
            return self._pending()

    def upload_pending(self, post: Post) -> int:
        """Post buffered samples oldest first; returns how many the controller took.

        A sample is deleted only after ``post`` returns. A TransportError stops
        the upload and keeps everything for the next attempt; a RemoteError
        (the controller refuses that sample for good) or an unreadable file
        drops that one sample so it cannot block the queue forever.
        """
        uploaded = 0
        for path in self.pending():
            try:
                meta = read_meta(path, self.max_buffer_bytes)
                data = path.read_bytes()
            except (GoldenFormatError, OSError) as e:
                log.warning("dropping unreadable sample %s: %s", path.name, e)
                path.unlink(missing_ok=True)
                continue
            try:
                post(data, asdict(meta))
            except TransportError as e:
                log.info("sample upload paused, %d left: %s", len(self.pending()), e)
                break
            except RemoteError as e:
                log.warning("controller refused sample %s; dropped: %s", path.name, e)
                path.unlink(missing_ok=True)
                continue
            path.unlink(missing_ok=True)
            uploaded += 1
            self.uploaded += 1
        return uploaded


def controller_poster(controller_url: str, device_id: str, device_token: str, timeout_s: float = 30.0) -> Post:
    """``post(data, meta)`` to ``POST {controller}/v1/devices/{id}/samples`` with the device's bearer token."""
    url = f"{controller_url.rstrip('/')}/v1/devices/{device_id}/samples"

    def post(data: bytes, meta: dict) -> None:
        headers = {"Authorization": f"Bearer {device_token}", "Content-Type": "application/octet-stream",
                   **SampleMeta(**meta).headers()}
        request = urllib.request.Request(url, data=data, headers=headers, method="POST")  # noqa: S310 - agent.toml's URL
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 - as above
                response.read()
        except urllib.error.HTTPError as e:
            # 401/403/408/429 and 5xx may pass (token rotation, overload): retry later
            if 400 <= e.code < 500 and e.code not in (401, 403, 408, 429):
                raise RemoteError(f"controller refused the sample: HTTP {e.code} {e.reason}") from e
            raise TransportError(f"sample upload to {url} failed: HTTP {e.code} {e.reason}") from e
        except (urllib.error.URLError, OSError) as e:
            raise TransportError(f"sample upload to {url} failed: {e}") from e

    return post

