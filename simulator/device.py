"""One simulated device: the real agent's reconcile code on a faked profile and a temp state dir.

Everything below the MQTT socket is the agent's own: ``Slots`` on disk,
``ModelUpdater`` (TUF), ``Reconciler`` with its gate and benchmark, and
``ModelRuntime`` (with a shared session underneath), and with traffic on, the
``Sampler`` and its uploads (simulator/traffic.py). What differs from
``agent/daemon.py`` is only the wiring: the network is the fleet's shared
loop, passes run on the fleet's worker pool, and a power cut is an exception
that unwinds a pass and throws the in-memory device away, after which a new
incarnation boots from the same state directory.
"""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.daemon import TICK_S, next_boot, serve_installed
from edgefleet.agent.director import Director, Inbox
from edgefleet.agent.fetch import ModelUpdater, RangeFetcher
from edgefleet.agent.reconcile import Reconciler
from edgefleet.agent.runtime import LoadedModel
from edgefleet.agent.sampler import Sampler, controller_poster
from edgefleet.agent.slots import Slots
from edgefleet.agent.units import DeviceReport, ModelUnit, UnitLink, Units
from edgefleet.agent.version import agent_version
from edgefleet.common.errors import EdgefleetError
from edgefleet.common.hardware import HardwareProfile
from edgefleet.common.mqtt import BrokerURL
from edgefleet.common.protocol import (
    Event,
    ExecutionState,
    Heartbeat,
    SamplingPolicy,
)

from .faults import Faults, FaultyFetcher, PowerCut
from .link import SimLink
from .network import NetworkLoop
from .runtime import SessionCache, SimRuntime
from .traffic import TICK_S as TRAFFIC_TICK_S
from .traffic import UPLOAD_TIMEOUT_S, DeviceTraffic, Traffic

log = logging.getLogger(__name__)


class WorkerPool(Protocol):
    """What a device needs of the fleet's worker pool."""

    def wake(self, device: SimDevice, delay: float = 0.0) -> None: ...


@dataclass(frozen=True)
class Shared:
    """What every device of one fleet shares: immutable, or thread-safe."""

    loop: NetworkLoop
    workers: WorkerPool
    sessions: SessionCache
    fetcher: RangeFetcher
    broker: BrokerURL
    session_expiry_s: int
    heartbeat_s: float
    restart_after_s: float   # a power-cut device boots again after this long
    traffic: Traffic | None = None   # None: devices serve no requests


class _Incarnation:
    """The in-memory device between one boot and its shutdown or power cut."""

    def __init__(self, device: SimDevice) -> None:
        config, shared = device.config, device.shared
        self.boot = next_boot(Path(config.state_dir))
        self.updater = ModelUpdater(
            Path(config.state_dir) / "tuf", config.tuf_metadata_url, config.tuf_target_base_url,
            config.download_timeout_s, fetcher=FaultyFetcher(shared.fetcher, lambda: device.faults),
        )
        # as the daemon wires it; memory (what was received, what was admitted) dies with the incarnation
        self.inbox = Inbox(Director(Path(config.state_dir), config.device_id, self.updater), self._refused)
        self.link = SimLink(shared.loop, config, shared.broker, self.boot, self._on_desired, shared.session_expiry_s)
        self.report = DeviceReport(self.link, device.profile.to_dict(), agent_version())
        self._recording = _Recording(self.link, device)
        self._device = device
        self.units = Units(Path(config.state_dir), self._make_unit)
        self.traffic = self._traffic(device, shared.traffic) if shared.traffic is not None else None
        self.started = time.monotonic()
        self.alive = True

    def _make_unit(self, model: str, directory: Path) -> ModelUnit:
        """As the daemon makes one; the sampler resumes its on-disk buffer under the journal's policy."""
        device, config = self._device, self._device.config
        slots = Slots(directory)
        runtime = SimRuntime(device.shared.sessions, lambda: device.faults)
        journal = slots.journal()
        sampler = Sampler(journal.desired.sampling if journal else SamplingPolicy(), directory / "samples",
                          device=config.device_id, max_buffer_bytes=config.sample_buffer_bytes)
        reconciler = Reconciler(slots, self.updater, runtime, UnitLink(model, self._recording, self.report),
                                device.profile, on_step=device.check_power)
        return ModelUnit(model, slots, runtime, sampler, reconciler)

    def _on_desired(self, raw: bytes) -> None:
        self.inbox.put(raw)
        self._device.shared.workers.wake(self._device)

    def _refused(self, generation: int, deployment: str | None, reason: str) -> None:
        self.link.event(ExecutionState.REJECTED, generation=generation, deployment=deployment,
                        detail=f"desired state refused: {reason}"[:2000])

    def _traffic(self, device: SimDevice, traffic: Traffic) -> DeviceTraffic:
        config = device.config
        post = controller_poster(config.controller_url, config.device_id, config.device_token,
                                 UPLOAD_TIMEOUT_S) if config.device_token else None
        return DeviceTraffic(traffic, config.device_id, self.units, post)

    def serve_active(self) -> None:
        for unit in self.units:
            serve_installed(unit.slots, unit.runtime)


class _Recording:
    """The link as the reconciler sees it, remembering the device's last event for fleet statistics."""

    def __init__(self, link: SimLink, device: SimDevice) -> None:
        self._link = link
        self._device = device
        self.telemetry = link.telemetry

    def event(self, state: ExecutionState, **fields: Any) -> Event:
        event = self._link.event(state, **fields)
        self._device.last_event = event
        self._device.events_sent += 1
        return event


class SimDevice:
    def __init__(
        self, config: AgentConfig, profile: HardwareProfile, shared: Shared, faults: Faults | None = None
    ) -> None:
        self.config = config
        self.profile = profile
        self.shared = shared
        self.faults = faults or Faults()
        self.id = config.device_id
        self.last_event: Event | None = None
        self.events_sent = 0
        self.power_cuts = 0
        self._life: _Incarnation | None = None

    # --- lifecycle -----------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._life is not None and self._life.alive

    @property
    def boot(self) -> int:
        return self._life.boot if self._life is not None else 0

    @property
    def connected(self) -> bool:
        return self._life is not None and self._life.link.connected

    @property
    def units(self) -> Units | None:
        return self._life.units if self._life is not None else None

    def active(self, model: str) -> LoadedModel | None:
        """The version of ``model`` this incarnation serves (None: not running, or not served)."""
        unit = self._life.units.get(model) if self._life is not None else None
        return unit.runtime.active if unit is not None else None

    def start(self) -> None:
        """Boot from the state directory: serve what is installed, connect, resume any update."""
        life = _Incarnation(self)
        self._life = life
        life.serve_active()
        life.link.start()
        life.report.publish()
        for unit in life.units:
            unit.reconciler.report()
        self.shared.workers.wake(self)  # a pass at once: it resumes an interrupted update
        # spread over the interval: a fleet started together must not heartbeat in lock-step
        first = random.uniform(0.0, self.shared.heartbeat_s)
        self.shared.loop.call_later(first, lambda: self._heartbeat(life))
        if life.traffic is not None:
            self.shared.loop.call_later(random.uniform(0.0, TRAFFIC_TICK_S), lambda: self._traffic_tick(life))

    def stop(self, done: Callable[[], None] | None = None, forget: bool = False) -> None:
        """Shut down cleanly (``forget``: also empty the retained topics); ``done`` runs once disconnected."""
        life = self._life
        if life is None or not life.alive:
            if done is not None:
                done()
            return
        life.alive = False
        life.link.stop(after=done, forget=forget)
        life.units.served.close()

    def power_cut(self) -> None:
        """Drop the device now, wherever it is: no goodbye, nothing cleaned up; boot again later."""
        life = self._life
        if life is None or not life.alive:
            return
        life.alive = False
        self.power_cuts += 1  # memory is gone with the incarnation; the retained desired state comes back
        life.link.cut()
        self.shared.loop.call_later(self.shared.restart_after_s, self.start)

    def go_offline(self) -> None:
        """The network goes away (the broker sends the will); the device keeps running."""
        if self._life is not None:
            self._life.link.cut()

    # --- reconcile -------------------------------------------------------------

    def check_power(self) -> None:
        """The reconciler's between-steps hook: die here if a power cut is due in this state."""
        at = self.faults.power_cut_at
        life = self._life
        if at is None or life is None:
            return
        if any((journal := unit.slots.journal()) is not None and journal.state.value == at for unit in life.units):
            self.faults.clear_power_cut()
            raise PowerCut(f"power cut in {at}")

    def reconcile(self) -> float | None:
        """One level-triggered pass (on a worker); seconds until the next one is due."""
        life = self._life
        if life is None or not life.alive:
            return None
        try:
            desired, again = life.inbox.take()
        except EdgefleetError as e:
            log.error("%s: reading the desired state failed: %s", self.id, e)
            return TICK_S
        delays = [TICK_S if again is None else again]
        for unit, entry in life.units.work(desired):
            if entry is not None:
                unit.sampler.set_policy(entry.sampling)
            try:
                delay = unit.reconciler.run_pass(entry)
            except PowerCut as cut:
                log.info("%s: %s", self.id, cut)
                if self._life is life:
                    self.faults.clear_power_cut()
                    self.power_cut()
                return None
            except EdgefleetError as e:  # e.g. the disk is full: keep serving, try again later
                log.error("%s: reconcile pass of %s failed: %s", self.id, unit.name, e)
                delay = TICK_S
            except Exception as e:  # the daemon's last resort: the execution fails, the device keeps serving
                log.exception("%s: reconcile pass of %s failed unexpectedly", self.id, unit.name)
                unit.reconciler.fail(e)
                delay = TICK_S
            delays.append(TICK_S if delay is None else delay)
        return min(delays)

    def _heartbeat(self, life: _Incarnation) -> None:
        if not life.alive or self._life is not life:
            return
        if life.link.connected:  # as AgentLink's offline queue drops telemetry first, don't pile it up
            life.link.telemetry(Heartbeat(
                uptime_s=round(time.monotonic() - life.started, 1),
                active=life.units.serving(),
                counters=life.units.served.counters(),
            ))
            for unit in life.units:  # as the daemon sends them: the rollout's error-rate gate reads these
                counters = unit.runtime.active_counters()
                if counters is not None:
                    life.link.telemetry(counters)
        self.shared.loop.call_later(self.shared.heartbeat_s, lambda: self._heartbeat(life))

    def _traffic_tick(self, life: _Incarnation) -> None:
        if not life.alive or self._life is not life or life.traffic is None:
            return  # stopped or power-cut: the next incarnation ticks on its own
        life.traffic.tick(TRAFFIC_TICK_S)
        self.shared.loop.call_later(TRAFFIC_TICK_S, lambda: self._traffic_tick(life))
