"""The agent's link to the broker, and the paho plumbing the controller's bridge reuses.

``MqttConnection`` owns one paho client in its own thread: it picks the protocol
(MQTT 5 when the broker speaks it, else 3.1.1), keeps a persistent session, and
reconnects with exponential backoff and full jitter (paho's own reconnect has no
jitter, so a fleet restarted together would reconnect in lock-step).

``AgentLink`` speaks the wire contract for one device: desired state in, reported
state, events and telemetry out, each stamped with device, boot, seq and time.
"""
from __future__ import annotations

import collections
import logging
import random
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from . import protocol
from .config import AgentConfig
from .protocol import Channel, Desired, Event, ExecutionState, Reported, Status, Telemetry, TelemetryKind

log = logging.getLogger(__name__)

PROTOCOLS = {"5": paho.MQTTv5, "3.1.1": paho.MQTTv311, "auto": None}
DEFAULT_SESSION_EXPIRY_S = 7 * 86400  # MQTT 5: how long the broker keeps our session offline
KEEPALIVE_S = 30
PROBE_TIMEOUT_S = 5.0
UNSUPPORTED_PROTOCOL = 0x84  # MQTT 5 CONNACK reason code


@dataclass(frozen=True)
class BrokerURL:
    """``mqtt://host:port`` or ``mqtts://host:port``; ``?protocol=5|3.1.1|auto`` (default auto)."""

    host: str
    port: int
    tls: bool = False
    protocol: str = "auto"

    @classmethod
    def parse(cls, url: str) -> "BrokerURL":
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(f"broker URL {url!r} is not valid: use mqtt://HOST:PORT or mqtts://HOST:PORT")
        query = parse_qs(parts.query)
        unknown = sorted(set(query) - {"protocol"})
        if unknown:
            raise ValueError(f"broker URL {url!r} has unknown option(s) {', '.join(unknown)}; only protocol=")
        version = query.get("protocol", ["auto"])[-1]
        if version not in PROTOCOLS:
            raise ValueError(f"broker URL {url!r}: protocol must be 5, 3.1.1 or auto, not {version!r}")
        try:
            port = parts.port
        except ValueError as e:
            raise ValueError(f"broker URL {url!r} has an invalid port: {e}") from None
        tls = parts.scheme == "mqtts"
        return cls(parts.hostname, port or (8883 if tls else 1883), tls, version)


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter, between min_s and max_s seconds."""

    min_s: float = 0.5
    max_s: float = 60.0

    def delay(self, attempt: int) -> float:
        cap = min(self.max_s, self.min_s * (2 ** min(attempt, 32)))
        return random.uniform(self.min_s, max(self.min_s, cap))


@dataclass(frozen=True)
class ConnectionOptions:
    client_id: str
    username: str = ""
    password: str = ""
    ca_file: str = ""                 # TLS trust anchors (mqtts://); empty: the system store
    persistent: bool = True           # keep subscriptions and queued QoS 1 messages across reconnects
    session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S
    backoff: Backoff = Backoff()
    keepalive_s: int = KEEPALIVE_S
    manual_ack: bool = False          # the owner acks each QoS 1 message itself (client.ack)
    receive_maximum: int | None = None  # MQTT 5: unacked QoS 1 messages the broker may send us


Will = tuple[str, bytes, int, bool]  # topic, payload, qos, retain
OnConnect = Callable[[paho.Client, bool], None]  # client, session_present
OnMessage = Callable[[paho.MQTTMessage], None]


class MqttConnection:
    """One paho client, connected and reconnected by a supervisor thread of its own.

    Callbacks run in paho's network thread while paho holds its callback lock: they
    must not block, and must not wait for a lock that is held around a publish().
    """

    def __init__(
        self,
        url: BrokerURL,
        options: ConnectionOptions,
        on_connect: OnConnect,
        on_message: OnMessage,
        will: Will | None = None,
        on_disconnect: Callable[[], None] | None = None,
    ) -> None:
        self.url = url
        self.options = options
        self._on_connect = on_connect
        self._on_message = on_message
        self._on_disconnect = on_disconnect
        self._will = will
        self.client: paho.Client | None = None
        self.protocol: int | None = PROTOCOLS[url.protocol]
        self.connected = threading.Event()
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._session_ok = False  # the last attempt reached a CONNACK success

    @property
    def is_v5(self) -> bool:
        return self.protocol == paho.MQTTv5

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"mqtt-{self.options.client_id}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self.client is not None:
            self.client.disconnect()
        self._lost.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.connected.clear()

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def build_client(self) -> paho.Client:
        """The configured paho client, not yet connected (probing the broker's protocol once).

        For owners that drive the network themselves instead of calling start():
        the fleet simulator runs many connections on one selector thread.
        """
        if self.protocol is None:
            self.protocol = self._probe()
        self.client = self._build(self.protocol)
        return self.client

    # --- the connection thread ---------------------------------------------

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            self._session_ok = False
            self._lost.clear()
            try:
                if self.client is None:
                    self.build_client()
                self.client.reconnect()
            except (OSError, TimeoutError) as e:  # ssl.SSLError is an OSError
                log.info("MQTT broker %s:%s unreachable: %s", self.url.host, self.url.port, e)
            else:
                # paho's own network thread: its publish() wake-up path relies on it.
                self.client.loop_start()
                self._lost.wait()
                self.client.loop_stop()
            if self._session_ok:
                attempt = 0
            if self._stop.is_set():
                break
            delay = self.options.backoff.delay(attempt)
            attempt += 1
            self._stop.wait(delay)

    def _tls_and_auth(self, client: paho.Client) -> None:
        if self.options.username:
            client.username_pw_set(self.options.username, self.options.password or None)
        if self.url.tls:
            client.tls_set(ca_certs=self.options.ca_file or None, cert_reqs=ssl.CERT_REQUIRED)

    def _probe(self) -> int:
        """MQTT 5 if the broker answers a v5 CONNECT with anything but 'unsupported protocol'."""
        probe = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"{self.options.client_id}-probe", protocol=paho.MQTTv5
        )
        self._tls_and_auth(probe)
        answer: dict[str, Any] = {}
        probe.on_connect = lambda _c, _u, _f, rc, _p: answer.setdefault("connack", rc)
        probe.on_disconnect = lambda _c, _u, _f, rc, _p: answer.setdefault("closed", rc)
        probe.connect(self.url.host, self.url.port, keepalive=10, clean_start=True)
        deadline = time.monotonic() + PROBE_TIMEOUT_S
        try:
            while not answer and time.monotonic() < deadline:
                probe.loop(0.1)
        finally:
            probe.disconnect()
            probe.loop(0.1)
        if not answer:
            raise TimeoutError("no CONNACK to the MQTT 5 probe")
        connack = answer.get("connack")
        v5 = connack is not None and connack.value != UNSUPPORTED_PROTOCOL
        log.info("MQTT broker %s:%s speaks %s", self.url.host, self.url.port, "MQTT 5" if v5 else "MQTT 3.1.1")
        return paho.MQTTv5 if v5 else paho.MQTTv311

    def _build(self, version: int) -> paho.Client:
        opts = self.options
        kwargs: dict[str, Any] = {}
        if version != paho.MQTTv5:
            kwargs["clean_session"] = not opts.persistent
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=opts.client_id,
            protocol=version,
            reconnect_on_failure=False,  # our loop reconnects, with jitter
            **kwargs,
        )
        self._tls_and_auth(client)
        if self._will is not None:
            topic, payload, qos, retain = self._will
            client.will_set(topic, payload, qos=qos, retain=retain)
        client.manual_ack_set(opts.manual_ack)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        properties = None
        if version == paho.MQTTv5:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = opts.session_expiry_s if opts.persistent else 0
            if opts.receive_maximum:
                properties.ReceiveMaximum = opts.receive_maximum
        client.connect_async(
            self.url.host, self.url.port, opts.keepalive_s,
            clean_start=not opts.persistent, properties=properties,
        )
        return client

    def _handle_connect(self, client: paho.Client, _userdata, flags, reason, _props) -> None:
        if reason.is_failure:
            log.warning("MQTT broker %s:%s refused %s: %s", self.url.host, self.url.port,
                        self.options.client_id, reason)
            return
        self._session_ok = True
        try:
            self._on_connect(client, bool(flags.session_present))
        except Exception:  # a failing callback must not take the connection thread down
            log.exception("MQTT on-connect handler failed")
        self.connected.set()

    def _handle_disconnect(self, _client, _userdata, _flags, reason, _props) -> None:
        self.connected.clear()
        if self._on_disconnect is not None:
            self._on_disconnect()
        if not self._stop.is_set():
            log.info("MQTT connection to %s:%s lost: %s", self.url.host, self.url.port, reason)
        self._lost.set()

    def _handle_message(self, _client, _userdata, message: paho.MQTTMessage) -> None:
        try:
            self._on_message(message)
        except Exception:
            log.exception("MQTT message handler failed on %s; message dropped", message.topic)


# --- the agent's side of the wire contract ----------------------------------


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

    The retained desired state is delivered again after every reconnect (the reconcile
    loop is idempotent), so a desired state published while the device was away is
    never missed. Outgoing messages go through one bounded queue and one sender
    thread, so they leave in ``seq`` order and wait there while the broker is away.
    """

    def __init__(
        self,
        config: AgentConfig,
        boot: int,
        on_desired: Callable[[Desired], None],
        *,
        session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S,
    ) -> None:
        self.device = protocol.check_device_id(config.device_id)
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

    def report(self, generation: int, **fields: Any) -> Reported:
        """Publish what the device runs now (retained): active, previous, hardware, agent_version."""
        return self._send(Channel.REPORTED, Reported, retain=True, generation=generation, **fields)

    def event(self, state: ExecutionState | str, **fields: Any) -> Event:
        """Publish one execution transition; ``generation`` is required, the rest as in protocol.Event."""
        state = state.value if isinstance(state, ExecutionState) else state
        return self._send(Channel.EVENTS, Event, state=state, ts=time.time(), **fields)

    def telemetry(self, kind: TelemetryKind | str, data: dict[str, Any]) -> Telemetry:
        kind = kind.value if isinstance(kind, TelemetryKind) else kind
        return self._send(Channel.TELEMETRY, Telemetry, kind=kind, data=data, ts=time.time())

    def _send(self, channel: Channel, schema: type[protocol.Message], retain: bool = False, **fields: Any):
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
        if not message.payload:
            log.info("desired state for %s was cleared; nothing to do", self.device)
            return
        try:
            _device, channel, desired = protocol.decode(message.topic, message.payload)
        except protocol.ProtocolError as e:
            log.warning("dropped a malformed message on %s: %s", message.topic, e)
            return
        if channel is not Channel.DESIRED or not isinstance(desired, Desired):
            log.warning("dropped an unexpected %s message on %s", channel.value, message.topic)
            return
        self._on_desired(desired)
