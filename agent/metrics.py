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

from prometheus_client import CONTENT_TYPE_LATEST, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from .runtime import ModelRuntime
from .sampler import Sampler
from .slots import Slots
from .state import State

MODEL_LABELS = ("model", "version", "variant")
CONTENT_TYPE = CONTENT_TYPE_LATEST


class InferenceCollector(Collector):
    """Requests, errors and latency per model/version/variant since the process started."""

    def __init__(self, runtime: ModelRuntime) -> None:
        self.runtime = runtime

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
        for labels, counters in sorted(self.runtime.counters_by_model().items()):
            requests.add_metric(labels, counters.requests)
            errors.add_metric((*labels, "rejected"), counters.rejected)
            errors.add_metric((*labels, "failed"), counters.failures)
            bounds = [repr(ms / 1000.0) for ms in counters.latency_buckets_ms] + ["+Inf"]  # 0.0005 … 5.0
            latency.add_metric(labels, list(zip(bounds, accumulate(counters.latency_counts), strict=True)),
                               counters.latency_sum_s)
        active = GaugeMetricFamily("edgefleet_agent_model_active", "1 for the model being served.",
                                   labels=MODEL_LABELS)
        loaded = self.runtime.active
        if loaded is not None:
            active.add_metric(loaded.labels, 1)
        yield from (requests, errors, latency, active)


class AgentCollector(Collector):
    """The update in progress (journal) and the sample buffer, for one agent."""

    def __init__(self, device: str, version: str, slots: Slots, sampler: Sampler) -> None:
        self.device, self.version = device, version
        self.slots = slots
        self.sampler = sampler

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("edgefleet_agent_info", "The agent's device id and version (always 1).",
                                 labels=("device", "agent_version"))
        info.add_metric((self.device, self.version), 1)
        journal = self.slots.journal()
        state = GaugeMetricFamily(
            "edgefleet_agent_update_state", "1 for the state of the latest update execution, 0 for the others.",
            labels=("state",))
        for each in State:
            state.add_metric((each.value,), 1 if journal is not None and journal.state is each else 0)
        generation = GaugeMetricFamily(
            "edgefleet_agent_update_generation", "Generation of the latest desired state acted on (0: none yet).")
        generation.add_metric((), journal.generation if journal is not None else 0)
        buffered = GaugeMetricFamily("edgefleet_agent_samples_buffered", "Sampled requests waiting for upload.")
        buffered.add_metric((), len(self.sampler.pending()))
        uploaded = CounterMetricFamily("edgefleet_agent_samples_uploaded", "Samples the controller took.")
        uploaded.add_metric((), self.sampler.uploaded)
        dropped = CounterMetricFamily("edgefleet_agent_samples_dropped",
                                      "Samples refused by a cap or pushed out of the full buffer.")
        dropped.add_metric((), self.sampler.dropped)
        yield from (info, state, generation, buffered, uploaded, dropped)


def agent_registry(
    runtime: ModelRuntime, device: str, version: str, slots: Slots, sampler: Sampler
) -> CollectorRegistry:
    """What ``fleet-agent run`` serves: inference, the update, samples and the process."""
    return registry(InferenceCollector(runtime), AgentCollector(device, version, slots, sampler), process=True)


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
