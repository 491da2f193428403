"""ONNX Runtime sessions shared by every simulated device that runs the same model file.

A session is immutable once created and ``InferenceSession.run`` is thread-safe,
so ten thousand devices running one model need one session, not ten thousand.
Each device still gets its own ``LoadedModel`` (in-flight counting, swap and
release are per device), loaded through the real ``ModelRuntime``; only the
session under it is shared, keyed by the file's SHA-256.
"""
from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgefleet.agent.runtime import LoadedModel, ModelRuntime, RuntimeOptions
from edgefleet.common.protocol import ModelRef

from .faults import Faults, FaultySession


class SessionCache:
    """sha256 of a model file -> its ONNX Runtime session (created once, under a per-digest lock)."""

    def __init__(self, options: RuntimeOptions) -> None:
        self.options = options
        self._sessions: dict[str, tuple[Any, float]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._loader = ModelRuntime(options)

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, path: Path) -> tuple[Any, float]:
        """(session, load_ms of its creation); raises ModelError like ModelRuntime.load."""
        digest = _sha256(path)
        with self._guard:
            lock = self._locks.setdefault(digest, threading.Lock())
        with lock:
            if digest not in self._sessions:
                loaded = self._loader.load(path)
                self._sessions[digest] = (loaded.session, loaded.load_ms)
            return self._sessions[digest]


class SimRuntime(ModelRuntime):
    """The agent's runtime with sessions from the fleet's cache and this device's model faults."""

    def __init__(self, cache: SessionCache, faults: Callable[[], Faults]) -> None:
        super().__init__(cache.options, free_memory=lambda: 1 << 40)  # shared sessions cost no new memory
        self._cache = cache
        self._faults = faults

    def load(self, path: Path, ref: ModelRef | None = None) -> LoadedModel:
        started = time.perf_counter()
        session, _created_ms = self._cache.get(path)
        faults = self._faults()
        if faults.model_faulty(ref):
            session = FaultySession(session, faults.extra_latency_ms / 1000.0, faults.fail_golden)
        return LoadedModel(session, Path(path), ref, (time.perf_counter() - started) * 1000.0)

    def swap(self, new: LoadedModel) -> LoadedModel | None:
        if isinstance(new.session, FaultySession):  # active now: production requests may fail
            new.session.fail_fraction = self._faults().fail_infer
        return super().swap(new)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
