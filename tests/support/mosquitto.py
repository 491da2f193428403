"""A real Mosquitto started from ``fleetctl broker config mosquitto``, and TLS clients that
play a device (or an attacker holding one device's certificate) against it."""
from __future__ import annotations

import contextlib
import getpass
import re
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from demo.scenario import AgentProcess, Controller, Fleetctl, stop_process, wait_for, write_config
from edgefleet.common.settings import toml_value
from edgefleet.controller.cli.client import ApiClient, read_token
from edgefleet.controller.config import ControllerConfig
from tests.conftest import free_port, need_program, reachable
from tests.support.mqtt import wait_until

START_TIMEOUT_S = 20.0
REPLICA = "r2"  # a second controller identity the broker admits; tests may start that replica


@contextlib.contextmanager
def running_mosquitto(config_dir: Path, port: int) -> Iterator[Path]:
    """``mosquitto -c DIR/mosquitto.conf`` until the block ends; yields its log file."""
    program = need_program("mosquitto", "apt-get install mosquitto")
    log = config_dir / "mosquitto.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([program, "-c", str(config_dir / "mosquitto.conf"), "-v"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not reachable("127.0.0.1", port):
            assert proc.poll() is None, f"mosquitto exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"mosquitto did not listen on {port}:\n{log.read_text()[-3000:]}"
            time.sleep(0.05)
        yield log
    finally:
        stop_process(proc, 10)


def settings_printed(output: str) -> dict[str, str]:
    """The ``key = "value"`` lines `fleetctl broker config mosquitto` tells the operator to set."""
    return dict(re.findall(r'^\s+(\w+) = "([^"]*)"$', output, re.M))


@dataclass(frozen=True)
class Identity:
    """Certificate, key and trusted CA files of one TLS client."""

    cert: Path | None
    key: Path | None
    ca: Path

    @classmethod
    def of_agent(cls, state_dir: Path) -> Identity:
        folder = state_dir / "mqtt"
        return cls(folder / "client.pem", folder / "client-key.pem", folder / "ca.pem")


@dataclass
class TlsClient:
    """A paho MQTT 5 client over TLS that records what it is told: CONNACK, SUBACK and PUBACK
    reason codes, messages, and why it was disconnected."""

    port: int
    identity: Identity
    client_id: str = "attacker"
    connack: str | None = None
    error: str | None = None
    subacks: list[list[str]] = field(default_factory=list)
    pubacks: dict[int, str] = field(default_factory=dict)
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    disconnects: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._answered = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=paho.MQTTv5)
        context = ssl.create_default_context(cafile=str(self.identity.ca))
        if self.identity.cert is not None:
            context.load_cert_chain(str(self.identity.cert), str(self.identity.key))
        self.client.tls_set_context(context)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = lambda _c, _u, _mid, codes, _p: self._add(self.subacks, [str(c) for c in codes])
        self.client.on_publish = lambda _c, _u, mid, code, _p: self.pubacks.__setitem__(mid, str(code))
        self.client.on_message = lambda _c, _u, m: self._add(self.messages, (m.topic, bytes(m.payload)))

    def _add(self, into: list, item: object) -> None:
        with self._lock:
            into.append(item)

    def _on_connect(self, _c: paho.Client, _u: object, _f: object, reason: object, _p: object) -> None:
        self.connack = str(reason)
        self._answered.set()

    def _on_disconnect(self, _c: paho.Client, _u: object, _f: object, reason: object, _p: object) -> None:
        self.disconnects.append(str(reason))
        self._answered.set()

    def connect(self, timeout: float = 10.0) -> TlsClient:
        """Connected, or ``error``/``disconnects`` say why not (a refused TLS handshake raises in connect)."""
        try:
            self.client.connect("127.0.0.1", self.port, keepalive=30)
        except (OSError, ssl.SSLError) as e:
            self.error = f"{type(e).__name__}: {e}"
            return self
        self.client.loop_start()
        self._answered.wait(timeout)
        return self

    @property
    def connected(self) -> bool:
        return self.error is None and self.connack == "Success" and not self.disconnects

    def subscribe(self, *filters: str) -> list[str]:
        before = len(self.subacks)
        self.client.subscribe([(f, 1) for f in filters])
        assert wait_until(lambda: len(self.subacks) > before, 5), "no SUBACK"
        return self.subacks[before]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> str:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        assert wait_until(lambda: info.mid in self.pubacks, 5), f"no PUBACK for {topic}"
        return self.pubacks[info.mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class TlsFleet:
    home: Path
    port: int
    broker_log: Path
    controller: Controller
    fleetctl: Fleetctl
    api: ApiClient
    agents: dict[str, AgentProcess]
    share_group: str

    def identity(self, device: str) -> Identity:
        return Identity.of_agent(self.agents[device].state_dir)

    def client(self, identity: Identity, client_id: str = "attacker") -> TlsClient:
        return TlsClient(self.port, identity, client_id).connect()

    def device(self, device: str) -> dict:
        return self.api.get(f"/v1/devices/{device}")

    def events(self, device: str) -> list[dict]:
        return self.api.get(f"/v1/devices/{device}/events")


@contextlib.contextmanager
def tls_fleet(tmp: Path, devices: tuple[str, ...], before_start: Callable[[], object] = lambda: None,
              **config_items: object) -> Iterator[TlsFleet]:
    """A fleet home configured for a Mosquitto of `fleetctl broker config mosquitto`, that Mosquitto,
    the controller process and one agent process per device (labelled fleet=tls), all online.
    ``before_start`` runs after `fleetctl init` (publish bundles there); ``config_items``: more config.toml keys."""
    home, api_port, port = tmp / "home", free_port(), free_port()
    write_config(home, api_port, broker_url=f"mqtts://127.0.0.1:{port}", embedded_broker_port=free_port())
    fleetctl = Fleetctl(home)
    fleetctl("init")
    before_start()
    printed = fleetctl("broker", "config", "mosquitto", "-o", str(tmp / "broker"), "--host", "127.0.0.1",
                       "--port", str(port), "--bind", "127.0.0.1", "--user", getpass.getuser(),
                       "--replica", REPLICA)
    settings = settings_printed(printed)
    assert settings["broker_url"] == f"mqtts://127.0.0.1:{port}" and settings["broker_admin"] == "mosquitto"
    with open(home / "config.toml", "a") as config:
        config.writelines(f'{k} = "{v}"\n' for k, v in settings.items() if k != "broker_url")
        config.writelines(f"{k} = {toml_value(v)}\n" for k, v in config_items.items())
    with running_mosquitto(tmp / "broker", port) as broker_log:
        controller = Controller(home, f"http://127.0.0.1:{api_port}").start()
        api = ApiClient(controller.url, read_token(home))
        agents = {name: AgentProcess(name, "x86_64", tmp / name, free_port()) for name in devices}
        try:
            for agent in agents.values():
                agent.enroll(fleetctl, controller.url)
                fleetctl("devices", "label", agent.name, "fleet=tls")
                agent.start()
            wait_for(lambda: all(api.get(f"/v1/devices/{n}")["online"] for n in agents), 60,
                     "the agents online over TLS", lambda: "\n".join(a.log() for a in agents.values()))
            group = ControllerConfig.load(home).effective_share_group
            yield TlsFleet(home, port, broker_log, controller, fleetctl, api, agents, group)
        finally:
            for agent in agents.values():
                agent.stop()
            controller.stop()
