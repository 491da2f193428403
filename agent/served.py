"""The models the inference servers answer for, by name: one runtime each.

A device serves several models at once (a detector and a classifier on one box);
each has its own runtime, so one model's hot-swap or resource-preserving swap never
holds up another's requests. OIP routes address a model by name.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator

from edgefleet.common.protocol import CounterSnapshot

from .errors import AgentError
from .runtime import Counters, LoadedModel, ModelLabels, ModelRuntime


class UnknownModel(AgentError):
    """The request names a model or version this server does not serve (404, NOT_FOUND)."""


class NotLoaded(UnknownModel):
    """The model is served here but no version of it is loaded yet (404; gRPC UNAVAILABLE)."""


class ServedModels:
    @classmethod
    def of(cls, models: ServedModels | ModelRuntime) -> ServedModels:
        """``models``, or one runtime served under the name of whatever model it runs."""
        return models if isinstance(models, ServedModels) else _OneRuntime(models)

    def __init__(self, runtimes: dict[str, ModelRuntime] | None = None) -> None:
        self._runtimes = dict(runtimes or {})
        self._lock = threading.Lock()  # adding is rare; lookups read a dict that is only ever replaced

    def add(self, name: str, runtime: ModelRuntime) -> None:
        with self._lock:
            self._runtimes = {**self._runtimes, name: runtime}

    def __iter__(self) -> Iterator[tuple[str, ModelRuntime]]:
        return iter(sorted(self._runtimes.items()))

    def runtime(self, name: str) -> ModelRuntime:
        runtime = self._runtimes.get(name)
        if runtime is None:
            served = ", ".join(repr(n) for n in sorted(self._runtimes)) or "none yet"
            raise UnknownModel(f"unknown model {name!r}; this server serves {served}")
        return runtime

    def find(self, name: str, version: str | None) -> LoadedModel:
        """The active version of model ``name`` (and ``version``, when given), else UnknownModel."""
        loaded = self.runtime(name).active
        if loaded is None:
            raise NotLoaded(f"model {name!r} is not loaded yet")
        if version and version != loaded.version:
            raise UnknownModel(f"model {name!r} has no version {version!r}; serving {loaded.version!r}")
        return loaded

    @property
    def ready(self) -> bool:
        """Some model is loaded: a second model being installed must not take the device's first
        out of service (each model's own readiness is ``/v2/models/NAME/ready``)."""
        return any(runtime.active is not None for _, runtime in self)

    def counters(self) -> CounterSnapshot:
        """Every request since the runtimes started, whichever model served it."""
        total = Counters()
        for _, runtime in self:
            snapshot = runtime.counters()
            total.requests += snapshot.requests
            total.rejected += snapshot.rejected
            total.failures += snapshot.failures
            total.latency_counts = [a + b for a, b in zip(total.latency_counts, snapshot.latency_counts, strict=True)]
        return total.snapshot()

    def counters_by_model(self) -> dict[ModelLabels, Counters]:
        found: dict[ModelLabels, Counters] = {}
        for _, runtime in self:
            found.update(runtime.counters_by_model())
        return found

    def close(self) -> None:
        for _, runtime in self:
            runtime.close()


class _OneRuntime(ServedModels):
    """One runtime, named by the model it runs (`fleet-agent serve`, tests, benchmarks)."""

    def __init__(self, runtime: ModelRuntime) -> None:
        super().__init__()
        self._runtime = runtime

    def add(self, name: str, runtime: ModelRuntime) -> None:
        raise TypeError("a server of one runtime serves no other")

    def __iter__(self) -> Iterator[tuple[str, ModelRuntime]]:
        loaded = self._runtime.active
        return iter([(loaded.name if loaded is not None else "", self._runtime)])

    def runtime(self, name: str) -> ModelRuntime:
        loaded = self._runtime.active
        if loaded is not None and loaded.name != name:
            raise UnknownModel(f"unknown model {name!r}; this server serves {loaded.name!r}")
        return self._runtime
