"""Many simulated devices in one process: one network thread, a small worker pool, shared sessions.

Devices join the fleet in one of two ways: enrolled through the controller's
real API (an operator token creates a one-time enrollment token per device,
then the agent's own ``enroll`` trades it), or pre-registered with a trusted
root and repository URLs given (broker-only benchmarks, tests without a
controller). A state directory that already holds an enrolled device is reused.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.enroll import CONFIG_FILE, enroll
from edgefleet.agent.fetch import HttpFetcher, ModelUpdater, trust_root
from edgefleet.agent.runtime import RuntimeOptions
from edgefleet.common.hardware import HardwareProfile
from edgefleet.common.mqtt import (
    PROTOCOLS,
    BrokerURL,
    ConnectionOptions,
    MqttConnection,
)

from .device import Shared, SimDevice
from .faults import Faults
from .link import SimLink
from .network import NetworkLoop
from .runtime import SessionCache
from .thin import ThinDevice, ThinShared
from .traffic import Traffic, TrafficConfig
from .workers import Workers

if TYPE_CHECKING:
    from edgefleet.controller.cli.client import ApiClient

log = logging.getLogger(__name__)

# Simulated hardware classes: profile fields as the agent's probe would report them.
# Providers stay CPU-only: the model really runs here, on this machine's ONNX Runtime.
CLASSES: dict[str, dict[str, Any]] = {
    "x86_64": {"arch": "x86_64", "cpu_model": "Simulated x86-64", "cpu_features": ["avx", "avx2", "fma"],
               "cpu_count": 4, "memory_mb": 8192, "os": "Linux (simulated)"},
    "rpi-4": {"arch": "aarch64", "cpu_model": "Cortex-A72", "cpu_features": ["neon"], "cpu_count": 4,
              "memory_mb": 4096, "os": "Linux (simulated)", "device_model": "Raspberry Pi 4 Model B Rev 1.4"},
    "rpi-5": {"arch": "aarch64", "cpu_model": "Cortex-A76", "cpu_features": ["neon", "dotprod", "fp16"],
              "cpu_count": 4, "memory_mb": 8192, "os": "Linux (simulated)",
              "device_model": "Raspberry Pi 5 Model B Rev 1.0"},
    "jetson-orin-nano": {"arch": "aarch64", "cpu_model": "Cortex-A78AE", "cpu_features": ["neon", "dotprod", "fp16"],
                         "cpu_count": 6, "memory_mb": 8192, "os": "Linux (simulated)",
                         "jetson": {"l4t": "36.3", "module": "Orin Nano"}},
}


def profile_for(hardware_class: str) -> HardwareProfile:
    if hardware_class not in CLASSES:
        raise ValueError(f"unknown hardware class {hardware_class!r}; choose from {', '.join(CLASSES)}")
    profile = HardwareProfile.from_dict(CLASSES[hardware_class])
    assert profile.hardware_class == hardware_class, profile.hardware_class
    return profile


@dataclass
class FleetConfig:
    broker_url: str = ""                 # empty: the URL each device got at enrollment
    devices: int = 10
    classes: tuple[str, ...] = ("x86_64",)
    prefix: str = "sim"                  # device ids: PREFIX-CLASS-NNNNN
    state_root: Path | None = None       # None: a temp dir, removed on close()
    workers: int = 8                     # reconcile passes in parallel
    first: int = 0                       # index of the first device (several processes share one fleet)
    thin: bool = False                   # thin devices: the wire protocol without the model work (thin.py)
    bind_address: str = ""               # local address the devices' MQTT connections come from
    labels: dict[str, str] = field(default_factory=dict)
    # enrolled through the controller API ...
    controller_url: str = ""
    operator_token: str = ""
    # ... or pre-registered
    trusted_root: bytes = b""
    metadata_url: str = ""
    target_base_url: str = ""
    heartbeat_s: float = 30.0
    session_expiry_s: int = 3600         # MQTT 5: how long the broker keeps an offline device's session
    download_timeout_s: float = 30.0
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    restart_after_s: float = 0.5         # a power-cut device boots again after this long
    traffic: TrafficConfig = field(default_factory=TrafficConfig)  # inference requests, sampling, uploads

    def device_ids(self) -> Iterator[tuple[str, str]]:
        """(device id, hardware class), classes dealt round-robin."""
        for i in range(self.first, self.first + self.devices):
            cls = self.classes[i % len(self.classes)]
            yield f"{self.prefix}-{cls}-{i:05d}", cls


@dataclass
class FleetStats:
    devices: int
    running: int
    connected: int
    states: dict[str, int]            # last event state -> devices
    events_sent: int                  # execution events the devices published
    power_cuts: int
    threads: int
    sessions: int                     # distinct ONNX Runtime sessions behind every device
    rss_kb: int
    baseline_rss_kb: int              # before any device existed
    rss_per_device_kb: float
    traffic: dict[str, int] = field(default_factory=dict)  # TrafficStats: requests, failures, shed, samples

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Fleet:
    def __init__(self, config: FleetConfig) -> None:
        if config.devices < 1:
            raise ValueError("a fleet needs at least one device")
        for cls in config.classes:
            profile_for(cls)
        if not config.controller_url and not (config.trusted_root and config.metadata_url and config.broker_url):
            raise ValueError("give --controller (enroll through the API), or a trusted root, "
                             "repository URLs and a broker (pre-registered devices)")
        self.config = config
        self._own_root = config.state_root is None
        self.root = Path(config.state_root or tempfile.mkdtemp(prefix="edgefleet-sim-"))
        self.root.mkdir(parents=True, exist_ok=True)
        if not config.thin:
            import onnxruntime  # noqa: F401 - loaded before the baseline, so RSS per device counts devices only

        self.baseline_rss_kb = rss_kb()
        self.loop = NetworkLoop()
        self.workers = Workers(config.workers)
        options = RuntimeOptions()
        self.sessions = SessionCache(options)
        self.traffic = Traffic(config.traffic) if config.traffic.enabled else None
        self.fetcher = HttpFetcher(config.download_timeout_s, pool_size=config.workers)
        self.devices: dict[str, SimDevice | ThinDevice] = {}
        self._shared: Shared | None = None

    # --- setup ------------------------------------------------------------------

    def create(self) -> None:
        """Enroll or pre-register every device (in parallel), then settle the broker protocol once."""
        ids = list(self.config.device_ids())
        operator = self._operator_client()
        try:
            with ThreadPoolExecutor(max_workers=self.config.workers) as pool:
                configs = list(pool.map(lambda pair: self._device_config(pair[0], pair[1], operator), ids))
        finally:
            if operator is not None:
                operator.close()
        broker = BrokerURL.parse(self.config.broker_url or configs[0].broker_url)
        broker = self._settle_protocol(broker, configs[0])
        self._shared = Shared(
            loop=self.loop, workers=self.workers, sessions=self.sessions, fetcher=self.fetcher, broker=broker,
            session_expiry_s=self.config.session_expiry_s, heartbeat_s=self.config.heartbeat_s,
            restart_after_s=self.config.restart_after_s, traffic=self.traffic,
        )
        thin = self._thin_shared(self._shared)
        for (device_id, cls), config in zip(ids, configs, strict=True):
            self.devices[device_id] = (ThinDevice(config, profile_for(cls), thin) if thin is not None
                                       else SimDevice(config, profile_for(cls), self._shared))

    def _thin_shared(self, shared: Shared) -> ThinShared | None:
        if not self.config.thin:
            return None
        bind = self.config.bind_address

        def link(config: AgentConfig, boot: int, on_desired: Callable[[bytes], None]) -> SimLink:
            return SimLink(self.loop, config, shared.broker, boot, on_desired, shared.session_expiry_s, bind)

        def updater(config: AgentConfig) -> ModelUpdater:
            return ModelUpdater(Path(config.state_dir) / "tuf", config.tuf_metadata_url, config.tuf_target_base_url,
                                config.download_timeout_s, fetcher=self.fetcher)

        return ThinShared(link=link, wake=self.workers.wake, call_later=self.loop.call_later, updater=updater,
                          heartbeat_s=self.config.heartbeat_s)

    def _operator_client(self) -> ApiClient | None:
        """One client for every enrollment: building an httpx client costs ~0.2 s of CPU (its TLS context)."""
        if not self.config.controller_url:
            return None
        from edgefleet.controller.cli.client import (
            ApiClient,  # the operator's side: only when enrolling
        )

        return ApiClient(self.config.controller_url, self.config.operator_token)

    def _device_config(self, device_id: str, cls: str, operator: ApiClient | None) -> AgentConfig:
        state_dir = self.root / device_id
        path = state_dir / CONFIG_FILE
        if path.exists():
            config = AgentConfig.load(path)
        elif operator is not None:
            config = self._enroll(operator, device_id, cls, state_dir)
        else:
            trust_root(state_dir / "tuf", self.config.trusted_root)
            config = AgentConfig(device_id=device_id, state_dir=state_dir,
                                 metadata_url=self.config.metadata_url, target_base_url=self.config.target_base_url)
        return dataclasses.replace(
            config, broker_url=self.config.broker_url or config.broker_url,
            download_timeout_s=self.config.download_timeout_s,
            reconnect_min_s=self.config.reconnect_min_s, reconnect_max_s=self.config.reconnect_max_s,
        )

    def _enroll(self, operator: ApiClient, device_id: str, cls: str, state_dir: Path) -> AgentConfig:
        labels = {"fleet": self.config.prefix, **self.config.labels}
        issued = operator.post(f"/v1/devices/{device_id}/enroll-token", {"labels": labels, "ttl_s": 3600})
        return enroll(self.config.controller_url, issued["token"], state_dir, profile_for(cls)).config

    def _settle_protocol(self, broker: BrokerURL, sample: AgentConfig) -> BrokerURL:
        """Probe the broker once for the whole fleet instead of once per device."""
        if broker.protocol != "auto":
            return broker
        probe = MqttConnection(broker, ConnectionOptions(client_id=f"{sample.device_id}-fleet",
                                                         username=sample.mqtt_username, password=sample.mqtt_password),
                               on_connect=lambda *_: None, on_message=lambda _m: None)
        probe.build_client()
        name = next(name for name, number in PROTOCOLS.items() if number == probe.protocol)
        return dataclasses.replace(broker, protocol=name)

    # --- running -----------------------------------------------------------------

    def start(self) -> None:
        if self._shared is None:
            self.create()
        self.loop.start()
        self.workers.start()
        for device in self.devices.values():
            device.start()

    def device(self, device_id: str) -> SimDevice:
        device = self.devices[device_id]
        if not isinstance(device, SimDevice):
            raise ValueError(f"{device_id} is a thin device")
        return device

    def inject(self, device_id: str, faults: Faults) -> None:
        device = self.devices[device_id]
        if not isinstance(device, SimDevice):
            raise ValueError(f"{device_id} is a thin device: it runs no model, so it takes no faults")
        device.faults = faults

    def stats(self) -> FleetStats:
        devices = list(self.devices.values())
        states = collections.Counter(d.last_event.state.value for d in devices if d.last_event is not None)
        rss = rss_kb()
        return FleetStats(
            devices=len(devices), running=sum(d.running for d in devices),
            connected=sum(d.connected for d in devices), states=dict(states),
            events_sent=sum(d.events_sent for d in devices),
            power_cuts=sum(d.power_cuts for d in devices), threads=threading.active_count(),
            sessions=len(self.sessions), rss_kb=rss, baseline_rss_kb=self.baseline_rss_kb,
            rss_per_device_kb=(rss - self.baseline_rss_kb) / max(1, len(devices)),
            traffic=self.traffic.snapshot().to_dict() if self.traffic is not None else {},
        )

    def stop(self, timeout: float = 30.0, clear_retained: bool = False) -> None:
        """Every device says goodbye and disconnects; ``clear_retained`` also empties its retained topics."""
        left = threading.Semaphore(0)
        for device in self.devices.values():
            device.stop(done=left.release, forget=clear_retained)
        deadline = time.monotonic() + timeout
        for _ in self.devices:
            if not left.acquire(timeout=max(0.0, deadline - time.monotonic())):
                break
        self.workers.stop()
        if self.traffic is not None:
            self.traffic.close()
        time.sleep(0.2)  # DISCONNECT packets leave on the network thread
        self.loop.stop()

    def close(self) -> None:
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)
