"""The agent process: wiring, the main loop, sd_notify and signals.

The main thread runs the reconcile loop, woken by a new desired state, a local
rollback (SIGUSR1 from ``fleet-agent rollback``) or a periodic tick, and pings
the systemd watchdog between steps. MQTT and the inference server run in their
own threads. On start the active slot (verified and gated when it was
installed) is loaded and served at once; an interrupted update resumes.
"""
from __future__ import annotations

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
from edgefleet.common.protocol import ExecutionState, Heartbeat, SamplingPolicy
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
from .runtime import ModelRuntime, RuntimeOptions
from .sampler import Sampler, controller_poster
from .serve import InferenceServer, limits_for, start_grpc
from .slots import Slots
from .version import agent_version

log = logging.getLogger(__name__)

TICK_S = 60.0        # a level-triggered pass runs at least this often
UPLOAD_S = 60.0      # buffered samples are offered to the controller this often
PING_EVERY_S = 1.0   # at most this often to the watchdog from inside a step
PID_FILE = "agent.pid"
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
        self.slots = Slots(state_dir)
        self.boot = next_boot(state_dir)
        self.profile = hardware_profile(config)
        self.runtime = ModelRuntime(RuntimeOptions.from_config(config, self.profile.providers))
        journal = self.slots.journal()
        self.sampler = Sampler(
            journal.desired.sampling if journal else SamplingPolicy(), state_dir / "samples",
            device=config.device_id, max_buffer_bytes=config.sample_buffer_bytes,
        )
        self.server = InferenceServer(
            self.runtime, config.serve, config.max_request_bytes, on_inference=self.sampler.on_inference,
            registry=agent_registry(self.runtime, config.device_id, agent_version(), self.slots, self.sampler),
            limits=limits_for(config.max_batch_size),
        )
        self.link = AgentLink(config, self.boot, self._on_desired)
        self.renewer = _renewer(config, self.link)
        updater = ModelUpdater(
            state_dir / "tuf", config.tuf_metadata_url, config.tuf_target_base_url,
            fetcher=PingingFetcher(config.download_timeout_s, self._ping),
        )
        self.inbox = Inbox(Director(state_dir, config.device_id, updater), self._refused)
        self.reconciler = Reconciler(
            self.slots, updater, self.runtime, self.link, self.profile,
            agent_version=agent_version(), on_step=self._ping,
        )
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._rollback = threading.Event()
        self._watchdog = watchdog_interval()
        self._last_ping = 0.0
        self._started = time.monotonic()

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

    def serve_active(self) -> None:
        if not serve_installed(self.slots, self.runtime):
            log.warning("no installed model can be served yet; serving starts after the next successful update")

    def run(self) -> int:
        pid_file = Path(self.config.state_dir) / PID_FILE
        atomic_write(pid_file, str(os.getpid()).encode())
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        signal.signal(signal.SIGUSR1, self._on_rollback_signal)
        self.serve_active()
        self.server.start()
        try:
            grpc_server = (start_grpc(self.runtime, self.config.serve_grpc, self.config.max_request_bytes,
                                      limits_for(self.config.max_batch_size), self.sampler.on_inference)
                           if self.config.serve_grpc else None)
        except BaseException:
            self.server.stop()
            raise
        if self.renewer is not None:
            self.renewer.start()
        self.link.start()
        self.reconciler.announce()
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
            self.runtime.close()
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
        """One reconcile pass; seconds until the next. What it raises fails the execution in
        progress with its reason (reported), and the next pass waits a growing backoff."""
        try:
            desired, again = self.inbox.take()
            if desired is not None:
                self.sampler.set_policy(desired.sampling)
            delay = self.reconciler.run_pass(desired)
        except EdgefleetError as e:  # e.g. the disk is full: keep serving, try again later
            log.error("reconcile pass failed: %s", e)
            return TICK_S
        except Exception as e:  # a bug: not met again on every pass
            self.reconciler.fail(e)
            raise
        return min(TICK_S if delay is None else delay, TICK_S if again is None else again)

    def _local_rollback(self) -> None:
        """`fleet-agent rollback` asked for it: the agent flips its own slots (its files stay its own)."""
        try:
            pointer = self.slots.rollback()
        except EdgefleetError as e:
            log.error("local rollback refused: %s", e)
            return
        log.info("local rollback: %s is active again", pointer.active)
        self.serve_active()
        self.reconciler.report()

    def _upload_samples(self) -> None:
        """Its own thread: an upload waiting on a slow link must not hold up reconcile or the watchdog."""
        if not self.config.device_token:
            return
        post = controller_poster(self.config.controller_url, self.config.device_id, self.config.device_token)
        while not self._stop.wait(UPLOAD_S):
            self.sampler.upload_pending(post)

    def _heartbeat(self) -> None:
        active = self.runtime.active
        self.link.telemetry(Heartbeat(
            uptime_s=round(time.monotonic() - self._started, 1),
            active=active.ref if active is not None else None,
            counters=self.runtime.counters(),
            rss_kb=_rss_kb(),
            samples_pending=len(self.sampler.pending()),
            samples_dropped=self.sampler.dropped,
        ))
        counters = self.runtime.active_counters()
        if counters is not None:  # the rollout's error-rate gate reads these, per model version
            self.link.telemetry(counters)


def _renewer(config: AgentConfig, link: AgentLink) -> Renewer | None:
    """Renews the MQTT client certificate (fetched at once when missing), if the agent has one."""
    if not (config.mqtt_cert_file and config.mqtt_key_file and config.device_token):
        return None
    certificate = Path(config.mqtt_cert_file)
    files = IdentityFiles(Path(config.mqtt_key_file), certificate,
                          Path(config.mqtt_ca_file) if config.mqtt_ca_file else certificate.with_name("ca.pem"))
    return Renewer(config.controller_url, config.device_id, config.device_token, files, link.reload_identity)


def _rss_kb() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def signal_running_agent(state_dir: Path) -> bool:
    """Ask a running agent to roll back to its previous slot; False when no agent runs."""
    try:
        pid = int((Path(state_dir) / PID_FILE).read_text())
        # a pid file left by a killed agent may name an unrelated process now
        if b"fleet-agent" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return False
        os.kill(pid, signal.SIGUSR1)
    except (OSError, ValueError):
        return False
    return True
