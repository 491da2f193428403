"""A thin simulated device: the real wire protocol without the model work, to measure the controller.

What a thin device does is what a device does on the wire: its own MQTT session
(the agent's ``AgentLink`` on the fleet's network loop: client id, will, retained
status, desired-state subscription), the director's check of each desired state
(``Inbox``/``Director`` over its own TUF metadata), a real TUF refresh and a real,
verified download of the target from the repository over HTTP, every execution
event in the agent's order (its state table) for each model whose desired entry
changed, the benchmark telemetry, a report with each model's outcome, heartbeats
and counters.

What it skips is the ONNX work: no session is created, no golden set is fetched or
checked, no benchmark runs; the benchmark it reports is FIXED_BENCHMARK. Its state
lives in memory (and the TUF metadata on disk), so ten thousand fit in a process.
"""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.daemon import TICK_S, next_boot
from edgefleet.agent.director import Director, Inbox
from edgefleet.agent.errors import RejectedError, TransportError
from edgefleet.agent.fetch import ModelUpdater, check_release
from edgefleet.agent.state import Outcome, State, first_state, next_state
from edgefleet.common.errors import EdgefleetError
from edgefleet.common.hardware import HardwareProfile
from edgefleet.common.protocol import (
    Action,
    BenchmarkReport,
    BenchmarkResult,
    CounterSnapshot,
    Desired,
    Event,
    ExecutionState,
    GateReport,
    Heartbeat,
    ModelCounters,
    ModelRef,
    ModelStatus,
)
from edgefleet.common.retry import Backoff

from .link import SimLink

log = logging.getLogger(__name__)

RETRY = Backoff(min_s=1.0, max_s=30.0)


def fixed_benchmark(ref: ModelRef) -> BenchmarkReport:
    """What a thin device reports instead of benchmarking: 1 ms p50, 2 ms p99."""
    result = BenchmarkResult(
        model=ref.model, version=ref.version, provider="thin (no model run)", session_create_ms=0.0,
        first_query_ms=0.0, warmup_queries=0, queries=0, duration_s=0.0, p50_ms=1.0, p90_ms=1.5, p99_ms=2.0,
        max_ms=2.0, mean_ms=1.0, throughput_qps=1000.0, offline_batch=0, offline_samples_per_s=None,
        peak_rss_mb=0.0,
    )
    return BenchmarkReport(model=ref, gate=GateReport(p99_budget_ms=None, max_p99_regression=0.5, benchmark=result))


_NO_COUNTS = CounterSnapshot(requests=0, rejected=0, failures=0, latency_buckets_ms=(1.0,), latency_counts=(0, 0))


@dataclass(frozen=True)
class ThinShared:
    """What every thin device of one fleet shares (the network loop, workers and HTTP pool)."""

    link: Callable[[AgentConfig, int, Callable[[bytes], None]], SimLink]
    wake: Callable[[ThinDevice, float], None]
    call_later: Callable[[float, Callable[[], None]], None]
    updater: Callable[[AgentConfig], ModelUpdater]
    heartbeat_s: float


@dataclass
class Served:
    """One model on a thin device: what runs, and how its last execution ended."""

    active: ModelRef | None = None
    previous: ModelRef | None = None
    finished: int = 0                      # the last generation whose execution ended
    outcome: ExecutionState | None = None  # and how

    def status(self, model: str) -> ModelStatus:
        return ModelStatus(model=model, generation=self.finished, active=self.active, previous=self.previous,
                           outcome=self.outcome)


class ThinDevice:
    """One thin device; ``reconcile()`` runs on a worker, heartbeats on the network loop."""

    def __init__(self, config: AgentConfig, profile: HardwareProfile, shared: ThinShared) -> None:
        self.config = config
        self.profile = profile
        self.shared = shared
        self.id = config.device_id
        self.last_event: Event | None = None
        self.events_sent = 0
        self.power_cuts = 0  # thin devices never lose power; the fleet's statistics count it
        self.running = False
        self._state_dir = Path(config.state_dir)
        self._updater = shared.updater(config)
        self._inbox = Inbox(Director(self._state_dir, self.id, self._updater), self._refused)
        self._link: SimLink | None = None
        self._served: dict[str, Served] = {}  # by model; reported once an execution of it ended
        self._attempts = 0          # consecutive retries of the current step
        self._started = time.monotonic()

    @property
    def connected(self) -> bool:
        return self._link is not None and self._link.connected

    def start(self) -> None:
        self._link = self.shared.link(self.config, next_boot(self._state_dir), self._on_desired)
        self._link.start()
        self.running = True
        self._report()
        self.shared.call_later(random.uniform(0.0, self.shared.heartbeat_s), self._heartbeat)

    def stop(self, done: Callable[[], None] | None = None, forget: bool = False) -> None:
        self.running = False
        if self._link is None:
            if done is not None:
                done()
            return
        self._link.stop(after=done, forget=forget)

    def _on_desired(self, raw: bytes) -> None:
        self._inbox.put(raw)
        self.shared.wake(self, 0.0)

    def _refused(self, generation: int, deployment: str | None, reason: str) -> None:
        self._event(ExecutionState.REJECTED, generation=generation, deployment=deployment,
                    detail=f"desired state refused: {reason}"[:2000])

    # --- the execution: the agent's state table, thin handlers ---------------------

    def reconcile(self) -> float | None:
        if not self.running:
            return None
        desired, again = self._inbox.take()
        acted = False
        for entry in desired.models if desired is not None else ():
            served = self._served.setdefault(entry.model or "", Served())
            state = first_state(entry, served.active, served.finished or None)
            if state is None or state is State.ROLLBACK or entry.action is not Action.INSTALL:
                continue  # thin devices only install (the fan-out); a rollback needs a previous slot
            retry = self._execute(state, entry, served)
            if retry is not None:
                return retry
            acted = True
        return TICK_S if acted and again is None else again

    def _execute(self, state: State, entry: Desired, served: Served) -> float | None:
        """Run the execution of one entry to its end; the delay of a step to retry, else None."""
        while not state.terminal:
            self._event_for(state, entry)
            outcome, detail = self._step(state, entry, served)
            if outcome is Outcome.RETRY:
                delay = RETRY.delay(self._attempts)
                self._attempts += 1
                self._event_for(state, entry, f"{detail}; retrying in {delay:.0f}s")
                return delay
            self._attempts = 0
            state = next_state(state, outcome)
        served.finished, served.outcome = entry.generation, state.reported
        self._event_for(state, entry)
        self._report()
        return None

    def _step(self, state: State, desired: Desired, served: Served) -> tuple[Outcome, str]:
        try:
            if state is State.DOWNLOAD:
                return self._download(desired, served)
            if state is State.ACTIVATE:
                ref = ModelRef(model=desired.model or "", version=desired.version or "",
                               variant=desired.variant or "")
                self._benchmark(ref)
                served.previous, served.active = served.active, ref
                return Outcome.DONE, "swapped (thin: no model loaded)"
            return Outcome.DONE, ""  # VERIFY (the download verified it), STAGE: nothing to do in memory
        except TransportError as e:
            return Outcome.RETRY, str(e)
        except RejectedError as e:
            return Outcome.REJECTED, str(e)
        except EdgefleetError as e:
            return Outcome.FAILED, str(e)

    def _download(self, desired: Desired, served: Served) -> tuple[Outcome, str]:
        self._updater.refresh()
        target, info = self._updater.find(desired.target or "")
        unmet = info.requirements.unmet(self.profile)
        if unmet:
            raise RejectedError(f"{info.variant} cannot run here: {'; '.join(unmet)}")
        check_release(info, served.active.release if served.active else 0)
        self._updater.download(target, self._state_dir / f"{desired.model}.onnx")
        return Outcome.DONE, f"downloaded {target.length} bytes"

    def _benchmark(self, ref: ModelRef) -> None:
        if self._link is not None:
            self._link.telemetry(fixed_benchmark(ref))

    # --- the wire --------------------------------------------------------------------

    def _event_for(self, state: State, desired: Desired, detail: str = "") -> None:
        self._event(state.reported, generation=desired.generation, deployment=desired.deployment,
                    model=desired.model, version=desired.version, variant=desired.variant, detail=detail)

    def _event(self, state: ExecutionState, **fields: object) -> None:
        if self._link is not None:
            self.last_event = self._link.event(state, **fields)
            self.events_sent += 1

    def _report(self) -> None:
        if self._link is not None:
            statuses = tuple(served.status(model) for model, served in sorted(self._served.items()) if served.finished)
            self._link.report(models=statuses, hardware=self.profile.to_dict(), agent_version="thin")

    def _heartbeat(self) -> None:
        if not self.running or self._link is None:
            return
        if self._link.connected:
            active = tuple(served.active for served in self._served.values() if served.active is not None)
            self._link.telemetry(Heartbeat(uptime_s=round(time.monotonic() - self._started, 1),
                                           active=active, counters=_NO_COUNTS))
            for ref in active:
                self._link.telemetry(ModelCounters.of(ref, self._started, _NO_COUNTS))
        self.shared.call_later(self.shared.heartbeat_s, self._heartbeat)
