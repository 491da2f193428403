"""The agent's Prometheus metrics, served as ``GET /metrics`` by the inference server.

Rendered when scraped from what the agent counts anyway: the runtime's cumulative
counters per model (one dict update per request, under the lock the request already
takes), the update journal on disk, and the sampler's counts. The request path holds
no Prometheus object. The address is the inference server's, with its trust: loopback
or a Unix socket by default, and no token (as for inference itself).
"""
from __future__ import annotations

from collections.abc import Iterator
from itertools import accumulate
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from .served import ServedModels
from .state import State

if TYPE_CHECKING:
    from .units import Units

MODEL_LABELS = ("model", "version", "variant")
CONTENT_TYPE = CONTENT_TYPE_LATEST


class InferenceCollector(Collector):
    """Requests, errors and latency per model/version/variant since the process started."""

    def __init__(self, models: ServedModels) -> None:
        self.models = models

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "edgefleet_agent_inference_requests", "Inference requests that reached a model, good or bad.",
            labels=MODEL_LABELS)
        errors = CounterMetricFamily(
            "edgefleet_agent_inference_errors",
            "Inference requests that failed: kind=rejected (a bad request), kind=failed (the model failed).",
            labels=(*MODEL_LABELS, "kind"))
        latency = HistogramMetricFamily(
            "edgefleet_agent_inference_duration_seconds", "Model run time of successful inference requests.",
            labels=MODEL_LABELS)
        for labels, counters in sorted(self.models.counters_by_model().items()):
            requests.add_metric(labels, counters.requests)
            errors.add_metric((*labels, "rejected"), counters.rejected)
            errors.add_metric((*labels, "failed"), counters.failures)
            bounds = [repr(ms / 1000.0) for ms in counters.latency_buckets_ms] + ["+Inf"]  # 0.0005 … 5.0
            latency.add_metric(labels, list(zip(bounds, accumulate(counters.latency_counts), strict=True)),
                               counters.latency_sum_s)
        active = GaugeMetricFamily("edgefleet_agent_model_active", "1 for each model version being served.",
                                   labels=MODEL_LABELS)
        memory = GaugeMetricFamily("edgefleet_agent_model_memory_bytes",
                                   "Resident memory each served model version took when it loaded.",
                                   labels=MODEL_LABELS)
        for _, runtime in self.models:
            loaded = runtime.active
            if loaded is not None:
                active.add_metric(loaded.labels, 1)
                if loaded.memory_kb is not None:
                    memory.add_metric(loaded.labels, loaded.memory_kb * 1024)
        yield from (requests, errors, latency, active, memory)


class AgentCollector(Collector):
    """Each model's update in progress (its journal) and sample buffer, for one agent."""

    def __init__(self, device: str, version: str, units: Units) -> None:
        self.device, self.version = device, version
        self.units = units

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("edgefleet_agent_info", "The agent's device id and version (always 1).",
                                 labels=("device", "agent_version"))
        info.add_metric((self.device, self.version), 1)
        state = GaugeMetricFamily(
            "edgefleet_agent_update_state",
            "1 for the state of each model's latest update execution, 0 for the others.", labels=("model", "state"))
        generation = GaugeMetricFamily(
            "edgefleet_agent_update_generation",
            "Generation of each model's latest desired entry acted on (0: none yet).", labels=("model",))
        buffered = GaugeMetricFamily("edgefleet_agent_samples_buffered", "Sampled requests waiting for upload.",
                                     labels=("model",))
        uploaded = CounterMetricFamily("edgefleet_agent_samples_uploaded", "Samples the controller took.",
                                       labels=("model",))
        dropped = CounterMetricFamily("edgefleet_agent_samples_dropped",
                                      "Samples refused by a cap or pushed out of the full buffer.", labels=("model",))
        for unit in self.units:
            journal = unit.slots.journal()
            for each in State:
                state.add_metric((unit.name, each.value), 1 if journal is not None and journal.state is each else 0)
            generation.add_metric((unit.name,), journal.generation if journal is not None else 0)
            buffered.add_metric((unit.name,), len(unit.sampler.pending()))
            uploaded.add_metric((unit.name,), unit.sampler.uploaded)
            dropped.add_metric((unit.name,), unit.sampler.dropped)
        yield from (info, state, generation, buffered, uploaded, dropped)


def agent_registry(units: Units, device: str, version: str) -> CollectorRegistry:
    """What ``fleet-agent run`` serves: inference, each model's update and samples, and the process."""
    return registry(InferenceCollector(units.served), AgentCollector(device, version, units), process=True)


def registry(*collectors: Collector, process: bool = False) -> CollectorRegistry:
    """A registry of its own (a simulator runs many agents in one process); ``process`` adds the
    standard ``process_*`` metrics (CPU, RSS, open files) for a daemon."""
    found = CollectorRegistry()
    for collector in collectors:
        found.register(collector)
    if process:
        ProcessCollector(registry=found)
    return found


def render(found: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of everything in ``found``."""
    return generate_latest(found)
