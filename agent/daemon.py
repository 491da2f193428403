"""The agent process: wiring, the main loop, sd_notify and signals.

The main thread runs the reconcile loop, woken by a new desired state, a local
rollback (SIGUSR1 from ``fleet-agent rollback``) or a periodic tick, and pings
the systemd watchdog between steps. MQTT and the inference server run in their
own threads. On start the active slot (verified and gated when it was
installed) is loaded and served at once; an interrupted update resumes.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from edgefleet.common.errors import EdgefleetError
from edgefleet.common.fs import atomic_write, read_json
from edgefleet.common.hardware import HardwareProfile
from edgefleet.common.protocol import Desired, ExecutionState, Heartbeat, SamplingPolicy
from edgefleet.common.retry import Backoff
from edgefleet.common.systemd import sd_notify, watchdog_interval

from .config import AgentConfig
from .director import Director, Inbox
from .errors import ModelError
from .fetch import HttpFetcher, ModelUpdater
from .identity import IdentityFiles, Renewer
from .link import AgentLink
from .metrics import agent_registry
from .probe import probe
from .reconcile import Reconciler
from .runtime import ModelRuntime, RuntimeOptions, largest_batch, rss_kb
from .sampler import Sampler, controller_poster
from .serve import InferenceServer, limits_for, start_grpc
from .slots import Slots
from .units import DeviceReport, ModelUnit, UnitLink, Units
from .version import agent_version

log = logging.getLogger(__name__)

TICK_S = 60.0        # a level-triggered pass runs at least this often
UPLOAD_S = 60.0      # buffered samples are offered to the controller this often
PING_EVERY_S = 1.0   # at most this often to the watchdog from inside a step
PID_FILE = "agent.pid"
ROLLBACK_FILE = "rollback.json"  # {"model": NAME}: which model `fleet-agent rollback` asked for
LOOP_BACKOFF = Backoff(min_s=1.0, max_s=TICK_S)  # after the main loop raised: retry, never exit


class PingingFetcher(HttpFetcher):
    """Pings the watchdog as bytes arrive: a long download is progress, not a hang
    (a stall still ends after the download timeout)."""

    def __init__(self, timeout_s: float, ping: Callable[[], None]) -> None:
        super().__init__(timeout_s)
        self._ping = ping

    def fetch_from(self, url: str, offset: int) -> tuple[int, Iterator[bytes]]:
        start, chunks = super().fetch_from(url, offset)
        return start, self._pinging(chunks)

    def _pinging(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self._ping()
            yield chunk


def next_boot(state_dir: Path) -> int:
    """The persisted boot counter, one more than at the last start."""
    path = state_dir / "boot.json"
    previous = read_json(path)
    boot = (previous.get("boot", 0) if isinstance(previous, dict) else 0) + 1
    atomic_write(path, f'{{"boot": {boot}}}'.encode())
    return boot


def serve_installed(slots: Slots, runtime: ModelRuntime) -> bool:
    """Serve what the slot pointer names, else the previous slot if that will not load
    (as at start, in the daemon and each simulated device); False when neither will."""
    for slot in (slots.active(), slots.previous()):
        if slot is None:
            continue
        current = runtime.active
        if current is not None and current.ref == slot.meta.ref:
            return True
        try:
            runtime.swap(runtime.load(slot.model, slot.meta.ref))
            return True
        except ModelError as e:
            log.error("installed model %s does not load: %s", slot.name, e)
    return False


def hardware_profile(config: AgentConfig) -> HardwareProfile:
    """The probed profile; ``hardware_override`` replaces fields (simulated devices, tests)."""
    profile = probe()
    if not config.hardware_override:
        return profile
    return HardwareProfile.from_dict({**profile.to_dict(), **config.hardware_override})


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        state_dir = Path(config.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.boot = next_boot(state_dir)
        self.profile = hardware_profile(config)
        self.batch_limits = limits_for(largest_batch(config))  # checks every model_batching entry at start
        self.link = AgentLink(config, self.boot, self._on_desired)
        self.report = DeviceReport(self.link, self.profile.to_dict(), agent_version())
        self.renewer = _renewer(config, self.link)
        self.updater = ModelUpdater(
            state_dir / "tuf", config.tuf_metadata_url, config.tuf_target_base_url,
            fetcher=PingingFetcher(config.download_timeout_s, self._ping),
        )
        self.inbox = Inbox(Director(state_dir, config.device_id, self.updater), self._refused)
        self.units = Units(state_dir, self._make_unit)
        self.server = InferenceServer(
            self.units.served, config.serve, config.max_request_bytes, on_inference=self.units.on_inference,
            registry=agent_registry(self.units, config.device_id, agent_version()),
            limits=self.batch_limits,
        )
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._rollback = threading.Event()
        self._watchdog = watchdog_interval()
        self._last_ping = 0.0
        self._started = time.monotonic()

    def _make_unit(self, model: str, directory: Path) -> ModelUnit:
        slots = Slots(directory)
        runtime = ModelRuntime(RuntimeOptions.from_config(self.config, self.profile.providers, model))
        journal = slots.journal()
        sampler = Sampler(
            journal.desired.sampling if journal else SamplingPolicy(), directory / "samples",
            device=self.config.device_id, max_buffer_bytes=self.config.sample_buffer_bytes,
        )
        reconciler = Reconciler(slots, self.updater, runtime, UnitLink(model, self.link, self.report), self.profile,
                                on_step=self._ping)
        return ModelUnit(model, slots, runtime, sampler, reconciler)

    # --- callbacks from other threads and signals ---------------------------

    def _on_desired(self, raw: bytes) -> None:
        self.inbox.put(raw)
        self._wake.set()

    def _refused(self, generation: int, deployment: str | None, reason: str) -> None:
        self.link.event(ExecutionState.REJECTED, generation=generation, deployment=deployment,
                        detail=f"desired state refused: {reason}"[:2000])

    def stop(self, *_: object) -> None:
        self._stop.set()
        self._wake.set()

    def _on_rollback_signal(self, *_: object) -> None:
        self._rollback.set()
        self._wake.set()

    def _ping(self) -> None:
        now = time.monotonic()
        if self._watchdog is not None and now - self._last_ping >= min(PING_EVERY_S, self._watchdog):
            self._last_ping = now
            sd_notify("WATCHDOG=1")

    # --- lifecycle ------------------------------------------------------------

    def serve_active(self, unit: ModelUnit) -> None:
        if not serve_installed(unit.slots, unit.runtime):
            log.warning("no installed version of %s can be served yet; it is served after its next successful update",
                        unit.name)

    def run(self) -> int:
        pid_file = Path(self.config.state_dir) / PID_FILE
        atomic_write(pid_file, str(os.getpid()).encode())
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        signal.signal(signal.SIGUSR1, self._on_rollback_signal)
        for unit in self.units:
            self.serve_active(unit)
        # gRPC first: once REST answers (what health checks wait for), gRPC does too
        grpc_server = (start_grpc(self.units.served, self.config.serve_grpc, self.config.max_request_bytes,
                                  self.batch_limits, self.units.on_inference)
                       if self.config.serve_grpc else None)
        try:
            self.server.start()
        except BaseException:
            if grpc_server is not None:
                grpc_server.stop()
            raise
        if self.renewer is not None:
            self.renewer.start()
        self.link.start()
        self.report.publish()  # hardware and agent version, before any model has a unit
        for unit in self.units:
            unit.reconciler.announce()
        uploader = threading.Thread(target=self._upload_samples, name="sample-upload", daemon=True)
        uploader.start()
        sd_notify(f"READY=1\nSTATUS=serving on {self.server.url}")
        log.info("agent %s boot %d serving on %s", self.config.device_id, self.boot, self.server.url)
        try:
            self._loop()
        finally:
            sd_notify("STOPPING=1")
            uploader.join(5)
            if self.renewer is not None:
                self.renewer.stop()
            self.link.stop()
            if grpc_server is not None:
                grpc_server.stop()
            self.server.stop()
            self.units.served.close()
            pid_file.unlink(missing_ok=True)
        return 0

    def _loop(self) -> None:
        due = 0.0  # run a pass at once: it resumes an interrupted update
        next_heartbeat = 0.0
        failures = 0  # consecutive turns that raised
        while not self._stop.is_set():
            self._ping()
            now = time.monotonic()
            try:
                if self._rollback.is_set():
                    self._rollback.clear()
                    self._local_rollback()
                if self._wake.is_set() or now >= due:
                    self._wake.clear()
                    due = time.monotonic() + self._pass()
                if now >= next_heartbeat:
                    next_heartbeat = now + self.config.heartbeat_s
                    self._heartbeat()
                failures = 0
            except Exception:  # the last resort (Mender's per-state error handling): never exit, keep serving
                delay = LOOP_BACKOFF.delay(failures)
                failures += 1
                log.exception("agent main loop failed; still serving, next pass in %.0fs", delay)
                due = time.monotonic() + delay
            timeout = min(due, next_heartbeat) - time.monotonic()
            if self._watchdog is not None:
                timeout = min(timeout, self._watchdog)
            self._wake.wait(max(0.0, timeout))

    def _pass(self) -> float:
        """One reconcile pass over every model; seconds until the next."""
        try:
            desired, again = self.inbox.take()
        except EdgefleetError as e:  # e.g. the disk is full: keep serving, try again later
            log.error("reading the desired state failed: %s", e)
            return TICK_S
        delays = [TICK_S if again is None else again]
        for unit, entry in self.units.work(desired):
            if entry is not None:
                unit.sampler.set_policy(entry.sampling)
            delays.append(self._unit_pass(unit, entry))
        return min(delays)

    def _unit_pass(self, unit: ModelUnit, entry: Desired | None) -> float:
        """One model's pass; what it raises fails that model's execution in progress with its
        reason (reported), and the next pass waits a growing backoff."""
        try:
            delay = unit.reconciler.run_pass(entry)
        except EdgefleetError as e:  # e.g. the disk is full: keep serving, try again later
            log.error("reconcile pass of %s failed: %s", unit.name, e)
            return TICK_S
        except Exception as e:  # a bug: not met again on every pass
            unit.reconciler.fail(e)
            raise
        return TICK_S if delay is None else delay

    def _local_rollback(self) -> None:
        """`fleet-agent rollback` asked for it: the agent flips its own slots (its files stay its own)."""
        request = Path(self.config.state_dir) / ROLLBACK_FILE
        asked = read_json(request)
        request.unlink(missing_ok=True)
        model = asked.get("model") if isinstance(asked, dict) else None
        units = list(self.units)
        unit = self.units.get(model) if isinstance(model, str) else (units[0] if len(units) == 1 else None)
        if unit is None:
            log.error("local rollback refused: %s", f"no model {model!r} is installed" if model
                      else f"name the model to roll back ({', '.join(u.name for u in units) or 'none installed'})")
            return
        try:
            pointer = unit.slots.rollback()
        except EdgefleetError as e:
            log.error("local rollback of %s refused: %s", unit.name, e)
            return
        log.info("local rollback: %s is active again", pointer.active)
        self.serve_active(unit)
        unit.reconciler.report()

    def _upload_samples(self) -> None:
        """Its own thread: an upload waiting on a slow link must not hold up reconcile or the watchdog."""
        if not self.config.device_token:
            return
        post = controller_poster(self.config.controller_url, self.config.device_id, self.config.device_token)
        while not self._stop.wait(UPLOAD_S):
            for unit in self.units:
                unit.sampler.upload_pending(post)

    def _heartbeat(self) -> None:
        units = list(self.units)
        self.link.telemetry(Heartbeat(
            uptime_s=round(time.monotonic() - self._started, 1),
            active=self.units.serving(),
            counters=self.units.served.counters(),
            rss_kb=rss_kb(),
            samples_pending=sum(len(unit.sampler.pending()) for unit in units),
            samples_dropped=sum(unit.sampler.dropped for unit in units),
        ))
        for unit in units:  # the rollout's error-rate gate reads these, per model version
            counters = unit.runtime.active_counters()
            if counters is not None:
                self.link.telemetry(counters)


def _renewer(config: AgentConfig, link: AgentLink) -> Renewer | None:
    """Renews the MQTT client certificate (fetched at once when missing), if the agent has one."""
    if not (config.mqtt_cert_file and config.mqtt_key_file and config.device_token):
        return None
    certificate = Path(config.mqtt_cert_file)
    files = IdentityFiles(Path(config.mqtt_key_file), certificate,
                          Path(config.mqtt_ca_file) if config.mqtt_ca_file else certificate.with_name("ca.pem"))
    return Renewer(config.controller_url, config.device_id, config.device_token, files, link.reload_identity)


def signal_running_agent(state_dir: Path, model: str) -> bool:
    """Ask a running agent to roll ``model`` back to its previous slot; False when no agent runs."""
    try:
        pid = int((Path(state_dir) / PID_FILE).read_text())
        # a pid file left by a killed agent may name an unrelated process now
        if b"fleet-agent" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return False
        atomic_write(Path(state_dir) / ROLLBACK_FILE, json.dumps({"model": model}).encode())
        os.kill(pid, signal.SIGUSR1)
    except (OSError, ValueError):
        return False
    return True
