"""MQTT test helpers: both brokers as one fixture, a recording subscriber, enrolled devices."""
from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import paho.mqtt.client as paho
import pytest
from amqtt.broker import Broker
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.common import protocol
from edgefleet.common.mqtt import BrokerURL
from edgefleet.controller import embedded_broker as embedded
from edgefleet.controller.db.models import Device
from edgefleet.controller.db.session import Database
from edgefleet.controller.embedded_broker import EmbeddedBroker
from tests.conftest import free_port

ANONYMOUS = "amqtt.plugins.authentication.AnonymousAuthPlugin"


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def unique_device(prefix: str = "dev") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def embedded_broker() -> Iterator[EmbeddedBroker]:
    broker = EmbeddedBroker(port=free_port())
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def replaying_broker(monkeypatch: pytest.MonkeyPatch) -> Iterator[EmbeddedBroker]:
    """amqtt 0.12.1's own Broker, unpatched (anonymous logins)."""
    monkeypatch.setattr(embedded, "_Broker", lambda config, _check: Broker(
        {**config, "plugins": {ANONYMOUS: {}}}, loop=asyncio.get_running_loop()))
    with EmbeddedBroker(port=free_port()) as broker:
        yield broker


@pytest.fixture(params=["embedded", "mosquitto"])
def broker_url(request) -> str:
    """Runs a test once on the embedded amqtt broker (3.1.1) and once on Mosquitto (5)."""
    if request.param == "embedded":
        return request.getfixturevalue("embedded_broker").url
    return request.getfixturevalue("mosquitto_url")


class Recorder:
    """A plain paho subscriber that keeps (topic, payload, retain) of what it receives."""

    def __init__(self, url: str, topic_filter: str) -> None:
        parsed = BrokerURL.parse(url)
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"rec-{uuid.uuid4().hex[:8]}")
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_args: self._subscribed.set()
        self.client.connect(parsed.host, parsed.port)
        self.client.subscribe(topic_filter, qos=1)
        self.client.loop_start()
        assert self._subscribed.wait(5), f"could not subscribe to {topic_filter} on {url}"

    def _on_message(self, _client, _userdata, message: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((message.topic, bytes(message.payload), bool(message.retain)))

    def on(self, channel: protocol.Channel) -> list[bytes]:
        with self._lock:
            return [p for t, p, _r in self.messages if t.endswith("/" + channel.value) and p]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def clear_retained(self, device: str) -> None:
        """Leave no retained messages of a test device on a shared broker."""
        for channel in protocol.RETAINED:
            self.publish(protocol.topic(device, channel), b"", retain=True)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def migrated(url: str) -> Database:
    db = Database(url)
    db.upgrade()
    return db


def enroll(db: Database, *device_ids: str) -> None:
    with db.unit_of_work() as session:
        for device_id in device_ids:
            session.add(Device(id=device_id))
