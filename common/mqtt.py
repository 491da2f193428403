"""MQTT connection plumbing both sides use.

``MqttConnection`` owns one paho client in its own thread: it picks the protocol
(MQTT 5 when the broker speaks it, else 3.1.1), keeps a persistent session, and
reconnects with exponential backoff and full jitter (paho's own reconnect has no
jitter, so a fleet restarted together would reconnect in lock-step).
"""
from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from .retry import Backoff

log = logging.getLogger(__name__)

PROTOCOLS: dict[str, MQTTProtocolVersion | None] = {"5": paho.MQTTv5, "3.1.1": paho.MQTTv311, "auto": None}
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
    def parse(cls, url: str) -> BrokerURL:
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
class ConnectionOptions:
    client_id: str
    username: str = ""
    password: str = ""
    ca_file: str = ""                 # TLS trust anchors (mqtts://); empty: the system store
    cert_file: str = ""               # TLS client certificate (mqtts://, with key_file): who we are to the broker
    key_file: str = ""
    persistent: bool = True           # keep subscriptions and queued QoS 1 messages across reconnects
    session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S
    backoff: Backoff = Backoff()  # noqa: RUF009 - Backoff is frozen
    keepalive_s: int = KEEPALIVE_S
    manual_ack: bool = False          # the owner acks each QoS 1 message itself (client.ack)
    receive_maximum: int | None = None  # MQTT 5: unacked QoS 1 messages the broker may send us
    # Local address to connect from; empty: the system's choice. One address has ~28,000 ephemeral
    # ports, so a simulated fleet larger than that spreads over several loopback addresses.
    bind_address: str = ""


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
        self.protocol: MQTTProtocolVersion | None = PROTOCOLS[url.protocol]
        self.connected = threading.Event()
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._session_ok = False  # the last attempt reached a CONNACK success
        self._tls: ssl.SSLContext | None = None  # one context for every client: reload_identity() updates it

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

    def reload_identity(self) -> None:
        """Present the client certificate files as they are now: reconnect with them at once
        (the broker keeps the session; paho resends what was in flight)."""
        if self._tls is not None and self.options.cert_file:
            self._tls.load_cert_chain(self.options.cert_file, self.options.key_file or None)
        client = self.client
        if client is not None and self.connected.is_set():
            client.disconnect()  # a clean DISCONNECT: no will, and _run reconnects

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
                client = self.build_client() if self.client is None else self.client
                client.reconnect()
            except (OSError, TimeoutError) as e:  # ssl.SSLError is an OSError
                log.info("MQTT broker %s:%s unreachable: %s", self.url.host, self.url.port, e)
            else:
                # paho's own network thread: its publish() wake-up path relies on it.
                client.loop_start()
                self._lost.wait()
                client.loop_stop()
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
            client.tls_set_context(self._tls_context())

    def _tls_context(self) -> ssl.SSLContext:
        """Server certificate and host name checked against ca_file; our certificate if configured."""
        if self._tls is None:
            context = ssl.create_default_context(cafile=self.options.ca_file or None)
            if self.options.cert_file:
                context.load_cert_chain(self.options.cert_file, self.options.key_file or None)
            self._tls = context
        return self._tls

    def _probe(self) -> MQTTProtocolVersion:
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

    def _build(self, version: MQTTProtocolVersion) -> paho.Client:
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
            clean_start=not opts.persistent, properties=properties, bind_address=opts.bind_address,
        )
        return client

    def _handle_connect(
        self, client: paho.Client, _userdata: Any, flags: paho.ConnectFlags, reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
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

    def _handle_disconnect(
        self, _client: paho.Client, _userdata: Any, _flags: paho.DisconnectFlags, reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        self.connected.clear()
        if self._on_disconnect is not None:
            self._on_disconnect()
        if not self._stop.is_set():
            log.info("MQTT connection to %s:%s lost: %s", self.url.host, self.url.port, reason)
        self._lost.set()

    def _handle_message(self, _client: paho.Client, _userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            self._on_message(message)
        except Exception:
            log.exception("MQTT message handler failed on %s; message dropped", message.topic)
