"""The controller's MQTT bridge: device messages in (to ``Ingest``), desired states out.

Delivery to the database is at-least-once: the bridge acknowledges a QoS 1 message
(paho manual ack) only after the batch holding it has been committed. While the
database is down, received messages wait in memory and the batch is retried with
backoff; the broker stops sending once its in-flight window is full, and anything
unacknowledged is redelivered after a reconnect or a controller restart (persistent
session). Redeliveries are harmless: ingest is idempotent.

On MQTT 5 brokers the subscriptions are shared (``$share/GROUP/...``) so replicas
split the load; on 3.1.1 brokers (the embedded amqtt) they are plain.
"""
from __future__ import annotations

import hashlib
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho

from edgefleet.common import protocol
from edgefleet.common.defaults import fleet_home
from edgefleet.common.errors import ProtocolError
from edgefleet.common.mqtt import BrokerURL, ConnectionOptions, MqttConnection
from edgefleet.common.protocol import Channel, DesiredSet, DeviceMessage
from edgefleet.common.retry import Backoff

from .config import ControllerConfig
from .desired import stored_desired
from .errors import Conflict, ControllerError, InvalidInput, Unavailable
from .ingest import Ingest, IngestResult

log = logging.getLogger(__name__)

INBOUND = (Channel.REPORTED, Channel.EVENTS, Channel.TELEMETRY, Channel.STATUS)


# Unacked messages the broker may send us, in batches: a batch stays unacked until it commits, and
# at two batches the network thread went idle during every commit (ingest at 0.85x a bare subscriber
# instead of 0.98x, bench/ingest.py). The buffer, not this, bounds the controller's memory.
IN_FLIGHT_BATCHES = 4


@dataclass(frozen=True)
class BridgeOptions:
    url: str
    username: str = ""
    password: str = ""
    ca_file: str = ""
    cert_file: str = ""               # the controller's TLS client identity (mqtts://)
    key_file: str = ""
    share_group: str = "edgefleet"
    # Stable across restarts so the broker keeps our session (and unacked messages) meanwhile;
    # unique per controller home, or two controllers on one host would keep kicking each other off.
    client_id: str = field(default_factory=lambda: controller_client_id(fleet_home()))
    session_expiry_s: int = 86400
    batch_max: int = 500              # messages per transaction
    # A batch waits this long for more messages: under a steady stream the per-transaction
    # cost (statements, commit, handing the GIL back and forth) is then shared by many.
    batch_linger_s: float = 0.005
    buffer_max: int = 20000           # received, not yet committed; when full the network thread waits
    retry: Backoff = Backoff(0.2, 10.0)
    publish_timeout_s: float = 10.0

    @classmethod
    def from_config(cls, config: ControllerConfig) -> BridgeOptions:
        return cls(
            url=config.effective_broker_url,
            client_id=config.mqtt_client_id or controller_client_id(config.home),
            username=config.mqtt_username,
            password=config.mqtt_password,
            ca_file=config.mqtt_ca_file,
            cert_file=config.mqtt_cert_file,
            key_file=config.mqtt_key_file,
            share_group=config.effective_share_group,
        )


def controller_client_id(home: Path) -> str:
    digest = hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:8]
    return f"edgefleet-controller-{socket.gethostname()[:30]}-{digest}"


@dataclass
class BridgeStats:
    received: int = 0
    dropped: int = 0          # malformed, oversized, unknown channel, device mismatch
    retries: int = 0          # database unavailable (or a replica race), batch retried
    ingested: IngestResult = field(default_factory=IngestResult)
    lag_s: float = 0.0        # receipt to commit, for the oldest message of the latest batch


@dataclass(frozen=True)
class _Received:
    message: DeviceMessage
    mid: int
    qos: int
    epoch: int  # connection it arrived on: a mid is only meaningful on that connection
    at: float   # time.monotonic() of receipt


class Bridge:
    """``start()``/``stop()``; ``publish_desired(desired)`` from any thread but paho's.

    ``seal`` turns a desired state into the signed bytes published (``DirectorSigner.seal``).
    """

    def __init__(
        self,
        options: BridgeOptions,
        ingest: Ingest,
        seal: Callable[[DesiredSet], bytes],
        desired_source: Callable[[], Iterable[DesiredSet]] | None = None,
    ) -> None:
        try:
            url = BrokerURL.parse(options.url)
        except ValueError as e:
            raise InvalidInput(str(e)) from e
        self.options = options
        self.ingest = ingest
        self._seal = seal
        # After a broker restart the retained desired states may be gone: publish them again.
        self._desired_source = desired_source or self._stored_desired
        self.stats = BridgeStats()
        self._buffer: queue.Queue[_Received] = queue.Queue(options.buffer_max)
        self._stop = threading.Event()
        self._epoch = 0
        self._unfinished = 0
        self._idle = threading.Condition()
        self._worker: threading.Thread | None = None
        self._control: dict[bytes, Callable[[bytes], None]] = {}  # broker administration topic -> handler
        self._reread_lock = threading.Lock()
        self._rereading: list[str] = []  # reported topics subscribed by the last reread_reports
        self._conn = MqttConnection(
            url,
            ConnectionOptions(
                client_id=options.client_id,
                username=options.username,
                password=options.password,
                ca_file=options.ca_file,
                cert_file=options.cert_file,
                key_file=options.key_file,
                session_expiry_s=options.session_expiry_s,
                manual_ack=True,
                receive_maximum=min(options.buffer_max, IN_FLIGHT_BATCHES * options.batch_max),
            ),
            on_connect=self._connected,
            on_message=self._received,
        )

    @property
    def is_v5(self) -> bool:
        return self._conn.is_v5

    def start(self) -> None:
        if self._worker is not None:
            return
        self._stop.clear()
        self._worker = threading.Thread(target=self._work, name="mqtt-ingest", daemon=True)
        self._worker.start()
        self._conn.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop receiving; a batch being retried is abandoned (the broker redelivers it)."""
        self._conn.stop(timeout)
        self._stop.set()
        if self._worker is not None:
            self._worker.join(timeout)
            self._worker = None

    def wait_connected(self, timeout: float) -> bool:
        return self._conn.wait_connected(timeout)

    @property
    def backlog(self) -> int:
        """Device messages received and not yet committed."""
        return self._unfinished

    def wait_idle(self, timeout: float) -> bool:
        """True once everything received so far has been committed (tests, benchmarks)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._unfinished == 0, timeout)

    # --- desired state out ------------------------------------------------------

    def publish_desired(self, *desired: DesiredSet, timeout: float | None = None) -> None:
        """Publish each retained at QoS 1, then wait for every PUBACK (in flight together, so a
        batch costs one round trip); Unavailable if any does not come."""
        timeout = self.options.publish_timeout_s if timeout is None else timeout
        where = f"{self._conn.url.host}:{self._conn.url.port}"
        client = self._conn.client
        if client is None or not self._conn.wait_connected(timeout):
            raise Unavailable(f"MQTT broker {where} is not connected; {len(desired)} desired state(s) not sent")
        signed = [(d, self._seal(d)) for d in desired]  # a signing failure sends none of them
        sent = [
            (d, client.publish(protocol.topic(d.device, Channel.DESIRED), raw, qos=1, retain=True))
            for d, raw in signed
        ]
        deadline = time.monotonic() + timeout
        for d, info in sent:
            try:
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            except (RuntimeError, ValueError) as e:
                raise Unavailable(f"MQTT broker {where} did not take the desired state for {d.device}: {e}") from e
            if not info.is_published():
                raise Unavailable(
                    f"MQTT broker {where} did not acknowledge the desired state for {d.device} "
                    f"within {timeout:g}s; it is sent when the connection is back"
                )

    # --- retained reports read again --------------------------------------------------

    def reread_reports(self, devices: list[str]) -> int:
        """Have the broker send these devices' retained reports to this replica again.

        A plain (not shared) subscription to a topic delivers its retained message; ingest then
        settles an execution from the report even when its events, or the report itself, went
        astray (on a shared subscription Mosquitto also queues messages for a replica that died,
        in its session, until it comes back). The previous call's subscriptions are dropped
        first, so at most one sweep's worth is held. Returns how many were asked for.
        """
        client = self._conn.client
        if client is None or not self._conn.connected.is_set():
            return 0
        topics = [protocol.topic(device, Channel.REPORTED) for device in devices]
        with self._reread_lock:
            if self._rereading:
                client.unsubscribe(self._rereading)
            self._rereading = topics
            if topics:
                client.subscribe([(topic, 1) for topic in topics])
        return len(topics)

    # --- broker administration (e.g. Mosquitto's $CONTROL/ topics) --------------------

    def on_control(self, topic: str, handler: Callable[[bytes], None]) -> None:
        """Deliver what arrives on ``topic`` to ``handler`` (in paho's thread: don't block).
        Call before start(): the topic is subscribed on every connect."""
        self._control[topic.encode()] = handler

    def publish_control(self, topic: str, payload: bytes, timeout: float) -> None:
        """Publish one administration request at QoS 1 and wait for its PUBACK."""
        where = f"{self._conn.url.host}:{self._conn.url.port}"
        client = self._conn.client
        if client is None or not self._conn.wait_connected(timeout):
            raise Unavailable(f"MQTT broker {where} is not connected; retry when it is")
        info = client.publish(topic, payload, qos=1)
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError) as e:
            raise Unavailable(f"MQTT broker {where} did not take the request on {topic}: {e}") from e
        if not info.is_published():
            raise Unavailable(f"MQTT broker {where} did not acknowledge the request on {topic} within {timeout:g}s")

    def _stored_desired(self) -> list[DesiredSet]:
        with self.ingest.db.reading() as session:
            return stored_desired(session)

    def _republish(self, client: paho.Client) -> None:
        try:
            states = [(d, self._seal(d)) for d in self._desired_source()]
        except ControllerError as e:
            log.warning("desired states not republished after the broker reconnect: %s", e)
            return
        for desired, raw in states:
            client.publish(protocol.topic(desired.device, Channel.DESIRED), raw, qos=1, retain=True)
        log.info("republished %d desired state(s) to a broker that had no session for us", len(states))

    # --- device messages in (paho thread) ------------------------------------------

    def _connected(self, client: paho.Client, session_present: bool) -> None:
        self._epoch += 1
        group = self.options.share_group if self._conn.is_v5 else None
        client.subscribe([(protocol.subscription(ch, group), 1) for ch in INBOUND]
                         + [(control.decode(), 1) for control in self._control])
        if not session_present:
            threading.Thread(target=self._republish, args=(client,), name="mqtt-republish", daemon=True).start()

    def _received(self, message: paho.MQTTMessage) -> None:
        control = self._control.get(message._topic)  # bytes: a device's topic may not be UTF-8
        if control is not None:
            self._ack([(message.mid, message.qos)])
            control(bytes(message.payload))
            return
        self.stats.received += 1
        if not message.payload:  # a retained message being cleared, not a message
            self._ack([(message.mid, message.qos)])
            return
        try:
            _device, channel, decoded = protocol.decode(message.topic, message.payload)
            if channel not in INBOUND:
                raise ProtocolError(f"{channel.value} is not a device-to-controller channel")
        except ProtocolError as e:
            self._drop(message, str(e))
            return
        except Exception as e:  # noqa: BLE001  any bad bytes: unacked, the broker would redeliver them forever
            self._drop(message, f"undecodable ({type(e).__name__}: {e})"[:300])
            return
        with self._idle:
            self._unfinished += 1
        # Blocks when the buffer is full: paho then stops reading and the broker holds the rest.
        self._buffer.put(_Received(decoded, message.mid, message.qos, self._epoch, time.monotonic()))

    def _drop(self, message: paho.MQTTMessage, why: str) -> None:
        """Count, log and acknowledge a message that is not ingested."""
        self.stats.dropped += 1
        log.warning("dropped message on %r: %s", message._topic[:200], why)  # bytes: a topic may not be UTF-8
        self._ack([(message.mid, message.qos)])

    def _ack(self, items: Iterable[tuple[int, int]]) -> None:
        client = self._conn.client
        if client is None:
            return
        for mid, qos in items:
            if qos > 0:
                client.ack(mid, qos)

    # --- the ingest worker ------------------------------------------------------------

    def _work(self) -> None:
        while not self._stop.is_set():
            batch = self._take()
            if batch and self._commit(batch):
                epoch = self._epoch
                # Acks of an earlier connection would hit other messages' mids: the broker redelivers those.
                self._ack((r.mid, r.qos) for r in batch if r.epoch == epoch)
            if batch:
                with self._idle:
                    self._unfinished -= len(batch)
                    self._idle.notify_all()

    def _take(self) -> list[_Received]:
        try:
            batch = [self._buffer.get(timeout=0.2)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.options.batch_linger_s
        while len(batch) < self.options.batch_max:
            try:
                batch.append(self._buffer.get_nowait())
            except queue.Empty:
                if not self._wait_for_more(batch, deadline):
                    break
        return batch

    def _wait_for_more(self, batch: list[_Received], deadline: float) -> bool:
        """Append the next message if one arrives before ``deadline``; False if none did."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        try:
            batch.append(self._buffer.get(timeout=remaining))
        except queue.Empty:
            return False
        return True

    def _commit(self, batch: list[_Received]) -> bool:
        """Apply the batch, retrying while the database is unavailable; False if stopped first."""
        attempt = 0
        while not self._stop.is_set():
            try:
                result = self._apply(batch)
            except (Unavailable, Conflict) as e:
                # Conflict: another replica inserted the same event meanwhile; the retry skips it.
                if attempt == 0:
                    log.warning("holding %d device message(s), database not writable: %s", len(batch), e)
                self.stats.retries += 1
                self._stop.wait(self.options.retry.delay(attempt))
                attempt += 1
                continue
            if attempt:
                log.info("database writable again; %d held message(s) committed", len(batch))
            self.stats.ingested += result
            self.stats.lag_s = time.monotonic() - batch[0].at
            return True
        return False

    def _apply(self, batch: list[_Received]) -> IngestResult:
        try:
            return self.ingest.apply([r.message for r in batch])
        except (Unavailable, Conflict):
            raise
        except Exception:
            log.exception("ingest failed on a batch of %d; applying one by one", len(batch))
        # Isolate the message that breaks ingest: it is dropped, the others are kept.
        total = IngestResult()
        for received in batch:
            try:
                total += self.ingest.apply([received.message])
            except (Unavailable, Conflict):
                raise
            except Exception:
                self.stats.dropped += 1
                log.exception("dropped a %s from %s that ingest cannot apply",
                              type(received.message).__name__, getattr(received.message, "device", "?"))
        return total
