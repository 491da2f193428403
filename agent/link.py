"""The agent's link to the broker: the wire contract spoken for one device.

``AgentLink`` takes the desired state in, and sends reported state, events and
telemetry out, each stamped with device, boot, seq and time, through one bounded
queue that holds them while the broker is away.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode

from edgefleet.common import protocol
from edgefleet.common.mqtt import (
    DEFAULT_SESSION_EXPIRY_S,
    BrokerURL,
    ConnectionOptions,
    MqttConnection,
)
from edgefleet.common.protocol import (
    Channel,
    Event,
    ExecutionState,
    Reported,
    Status,
    Telemetry,
    TelemetryPayload,
    kind_of,
)
from edgefleet.common.retry import Backoff

from .config import AgentConfig

log = logging.getLogger(__name__)

M = TypeVar("M", bound=protocol.Message)

@dataclass(frozen=True)
class _Pending:
    channel: Channel
    payload: bytes
    retain: bool


class OfflineQueue:
    """Messages kept while the broker is unreachable, oldest first, at most ``limit``.

    When full, the oldest telemetry goes first; a newer reported state replaces an
    older one (it is retained state, only the latest matters); events are dropped
    (oldest first, with a warning) only when nothing else is left to drop.
    """

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self._items: collections.deque[_Pending] = collections.deque()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: _Pending) -> None:
        if item.channel is Channel.REPORTED:
            self._remove_first(lambda p: p.channel is Channel.REPORTED)
        if len(self._items) >= self.limit:
            if not self._remove_first(lambda p: p.channel is Channel.TELEMETRY):
                if item.channel is Channel.TELEMETRY:
                    self.dropped += 1
                    return
                self._items.popleft()
                log.warning("offline queue full (%d): dropped the oldest event", self.limit)
            self.dropped += 1
        self._items.append(item)

    def _remove_first(self, match: Callable[[_Pending], bool]) -> bool:
        for index, pending in enumerate(self._items):
            if match(pending):
                del self._items[index]
                return True
        return False

    def peek(self) -> _Pending:
        return self._items[0]

    def discard(self, item: _Pending) -> None:
        """Remove a sent item (it may already have been dropped while it was being sent)."""
        if self._items and self._items[0] is item:
            self._items.popleft()
        else:
            self._remove_first(lambda p: p is item)


class AgentLink:
    """One device's MQTT link. ``on_desired`` runs in paho's thread: store and wake, don't block.

    ``on_desired`` receives the signed bytes on the device's own desired topic, unverified
    (``.director.Director`` judges them).

    The retained desired state is delivered again after every reconnect (the reconcile
    loop is idempotent), so a desired state published while the device was away is
    never missed. Outgoing messages go through one bounded queue and one sender
    thread, so they leave in ``seq`` order and wait there while the broker is away.
    """

    def __init__(
        self,
        config: AgentConfig,
        boot: int,
        on_desired: Callable[[bytes], None],
        *,
        session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S,
    ) -> None:
        self.device = protocol.check_device_id(config.device_id)
        self._desired_topic = protocol.topic(self.device, Channel.DESIRED).encode()
        self.boot = boot
        self._on_desired = on_desired
        self._seq = 0
        self._outbox = threading.Condition()
        self._online = threading.Event()
        self._stopping = False
        self._sender: threading.Thread | None = None
        self.queue = OfflineQueue(config.offline_queue_max)
        offline = Status(device=self.device, boot=boot, online=False)
        self._conn = MqttConnection(
            BrokerURL.parse(config.broker_url),
            ConnectionOptions(
                client_id=self.device,
                username=config.mqtt_username,
                password=config.mqtt_password,
                ca_file=config.mqtt_ca_file,
                cert_file=config.mqtt_cert_file,
                key_file=config.mqtt_key_file,
                session_expiry_s=session_expiry_s,
                backoff=Backoff(config.reconnect_min_s, config.reconnect_max_s),
            ),
            on_connect=self._connected,
            on_message=self._message,
            will=(self._topic(Channel.STATUS), offline.to_json(), 1, True),
            on_disconnect=self._online.clear,
        )

    def _topic(self, channel: Channel) -> str:
        return protocol.topic(self.device, channel)

    @property
    def connected(self) -> bool:
        return self._conn.connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._conn.wait_connected(timeout)

    def reload_identity(self) -> None:
        """Reconnect at once with the client certificate now on disk (after a renewal)."""
        self._conn.reload_identity()

    def start(self) -> None:
        if self._sender is not None:
            return
        self._stopping = False
        self._sender = threading.Thread(target=self._send_loop, name=f"mqtt-out-{self.device}", daemon=True)
        self._sender.start()
        self._conn.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Say goodbye (retained offline status, as the will would) and disconnect.

        Messages still queued stay in ``queue``; they are not sent after stop().
        """
        with self._outbox:
            self._stopping = True
            self._outbox.notify_all()
        if self._sender is not None:
            self._sender.join(timeout)
            self._sender = None
        client = self._conn.client
        if client is not None and self.connected:
            goodbye = Status(device=self.device, boot=self.boot, online=False, ts=time.time())
            info = client.publish(self._topic(Channel.STATUS), goodbye.to_json(), qos=1, retain=True)
            if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                info.wait_for_publish(timeout)
        self._conn.stop(timeout)

    # --- outgoing -----------------------------------------------------------

    def report(self, **fields: Any) -> Reported:
        """Publish what the device runs now (retained): models, hardware, agent_version."""
        return self._send(Channel.REPORTED, Reported, retain=True, **fields)

    def event(self, state: ExecutionState, **fields: Any) -> Event:
        """Publish one execution transition; ``generation`` is required, the rest as in protocol.Event."""
        return self._send(Channel.EVENTS, Event, state=state, ts=time.time(), **fields)

    def telemetry(self, payload: TelemetryPayload) -> Telemetry:
        """Publish a heartbeat, benchmark report or counters, as the telemetry kind of that payload."""
        kind = kind_of(payload)
        carried: dict[str, Any] = {kind.value: payload}
        return self._send(Channel.TELEMETRY, Telemetry, kind=kind, ts=time.time(), **carried)

    def _send(self, channel: Channel, schema: Callable[..., M], retain: bool = False, **fields: Any) -> M:
        with self._outbox:
            self._seq += 1
            message = schema(device=self.device, boot=self.boot, seq=self._seq, **fields)
            message.validate()  # a bad outgoing message is our bug: fail here, not at the controller
            self.queue.put(_Pending(channel, message.to_json(), retain))
            self._outbox.notify()
        return message

    def _send_loop(self) -> None:
        while True:
            with self._outbox:
                while not self._stopping and not (len(self.queue) and self._online.is_set()):
                    self._outbox.wait(0.5)
                if self._stopping:
                    return
                pending = self.queue.peek()
            # Publish outside the lock: paho may take its callback lock inside publish().
            if self._publish(pending):
                with self._outbox:
                    self.queue.discard(pending)
            else:
                self._online.wait(0.5)

    def _publish(self, pending: _Pending) -> bool:
        """Hand one message to paho; False if it was not taken (then it stays queued)."""
        client = self._conn.client
        if client is None or not self._online.is_set():
            return False
        info = client.publish(self._topic(pending.channel), pending.payload, qos=1, retain=pending.retain)
        # NO_CONN: paho keeps a QoS 1 message and sends it after the reconnect.
        return info.rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN)

    # --- paho callbacks --------------------------------------------------------

    def _connected(self, client: paho.Client, _session_present: bool) -> None:
        # Subscribing again makes the broker resend the retained desired state.
        client.subscribe(self._topic(Channel.DESIRED), qos=1)
        online = Status(device=self.device, boot=self.boot, online=True, ts=time.time())
        client.publish(self._topic(Channel.STATUS), online.to_json(), qos=1, retain=True)
        self._online.set()
        with self._outbox:
            self._outbox.notify()

    def _message(self, message: paho.MQTTMessage) -> None:
        if message._topic != self._desired_topic:  # bytes: a broker may replay others' retained messages
            log.warning("dropped a message on %r: this device subscribes to its own desired state only",
                        message._topic[:200])
            return
        if not message.payload:
            log.info("desired state for %s was cleared; nothing to do", self.device)
            return
        self._on_desired(bytes(message.payload))
