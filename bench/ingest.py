"""Telemetry ingest rate: the real Bridge + Ingest into PostgreSQL and into SQLite,
next to a bare paho subscriber on the same broker in the same run.

N simulated devices (one paho client each, in a publisher process) publish
Telemetry at QoS 1 as fast as the consumer takes it, for S seconds per phase:
first to a bare paho subscriber (its own process, counting only), then to the
controller's Bridge + Ingest (this process) into PostgreSQL, then into SQLite.

The publishers are flow-controlled end to end (at most WINDOW messages published
but not yet consumed): Mosquitto drops QoS 1 messages beyond a subscriber's queue
limit (max_queued_messages, 1000 by default; the run's own Mosquitto has none), so an
open-loop publisher faster than the consumer measures the broker's drops, not the consumer. The rate is
messages consumed (received, or committed to the database) per second of the
phase; zero lost means the database holds exactly as many rows as were published.

    python -m bench.ingest --seconds 30 --devices 20
"""
from __future__ import annotations

import argparse
import ctypes
import multiprocessing as mp
import ssl
import tempfile
import time
import uuid
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from functools import partial
from multiprocessing.context import SpawnContext
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import sqlalchemy as sa
from paho.mqtt.enums import CallbackAPIVersion
from securesystemslib.signer import CryptoSigner

from bench._common import table
from edgefleet.common import director, protocol
from edgefleet.common.mqtt import BrokerURL
from edgefleet.common.protocol import (
    Channel,
    ModelCounters,
    ModelRef,
    Telemetry,
    TelemetryKind,
)
from edgefleet.controller.broker import Bridge, BridgeOptions
from edgefleet.controller.db.models import Device, TelemetryRecord
from edgefleet.controller.db.session import Database
from edgefleet.controller.ingest import Ingest

DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432"
# Published but not yet consumed, over all devices. Devices publish regardless of the controller's
# commits, so the window must hold several of its batches (BridgeOptions.batch_max): at one batch the
# publisher waited on every commit and the run measured their lockstep, not the consumer.
WINDOW = 2000
DRAIN_TIMEOUT_S = 60.0  # after the publishers stop, everything must be consumed by then
BENCH_MODEL = ModelRef(model="bench", version="1", variant="cpu-fp32")  # what the counters name


@dataclass(frozen=True)
class Tls:
    """Client certificates for a broker that requires them: DIR/<identity>.pem and DIR/<identity>-key.pem,
    one per device and one each for the bare subscriber and the bridge."""

    ca: str
    certs: str
    bare: str      # identity of the bare subscriber
    bridge: str    # identity of the bridge
    share_group: str

    def context(self, identity: str) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca)
        context.load_cert_chain(f"{self.certs}/{identity}.pem", f"{self.certs}/{identity}-key.pem")
        return context


@dataclass
class Result:
    database: str
    devices: int
    seconds: float
    published: int
    bare_published: int
    bare_received: int
    bare_rate: float
    stored: int
    bridge_rate: float

    @property
    def lost(self) -> int:
        return self.published - self.stored

    @property
    def bare_lost(self) -> int:
        return self.bare_published - self.bare_received

    @property
    def ratio(self) -> float:
        return self.bridge_rate / self.bare_rate if self.bare_rate else 0.0


def _client(url: BrokerURL, client_id: str, tls: Tls | None = None, identity: str = "") -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    client.max_inflight_messages_set(2 * WINDOW)
    if tls is not None:
        client.tls_set_context(tls.context(identity))
    client.connect(url.host, url.port)
    client.loop_start()
    return client


def _publish(
    url: str, devices: list[str], seconds: float, start_at: float, consumed: ctypes.c_longlong, out: Queue[int],
    tls: Tls | None,
) -> None:
    """Publisher process: devices take turns publishing, never more than WINDOW ahead of the consumer."""
    parsed = BrokerURL.parse(url)
    clients = [_client(parsed, f"{d}-pub", tls, d) for d in devices]
    topics = [protocol.topic(d, Channel.TELEMETRY) for d in devices]
    time.sleep(max(0.0, start_at - time.time()))
    deadline, seq, sent = time.time() + seconds, 0, 0
    last: list[paho.MQTTMessageInfo] = []
    while time.time() < deadline:
        while sent - consumed.value > WINDOW and time.time() < deadline:
            time.sleep(0.0005)
        seq += 1
        last = []
        for client, topic, device in zip(clients, topics, devices, strict=True):
            counters = ModelCounters(model=BENCH_MODEL, since=start_at, requests=seq, rejected=0, failures=0,
                                     latency_buckets_ms=(1.0,), latency_counts=(seq, 0))
            payload = Telemetry(device=device, boot=1, seq=seq, kind=TelemetryKind.COUNTERS, counters=counters,
                                ts=time.time()).to_json()
            last.append(client.publish(topic, payload, qos=1))
            sent += 1
    for info in last:  # PUBACKs come in order: the last one acknowledged means all were
        info.wait_for_publish(60)
    for client in clients:
        client.disconnect()
        client.loop_stop()
    out.put(sent)


def _bare_subscriber(
    url: str, prefix: str, devices: list[str], consumed: ctypes.c_longlong, ready: Event, stop: Event,
    out: Queue[tuple[int, float]], tls: Tls | None,
) -> None:
    """Counts the run's telemetry with paho's automatic acks; reports (count, time of the last)."""
    received, last = 0, 0.0
    needle = f"{protocol.TOPIC_ROOT}/{prefix}"

    def on_message(_c: paho.Client, _u: Any, message: paho.MQTTMessage) -> None:
        nonlocal received, last
        if message.topic.startswith(needle):
            received += 1
            last = time.time()
            consumed.value = received

    client = _client(BrokerURL.parse(url), f"{prefix}bare", tls, tls.bare if tls else "")
    client.on_message = on_message
    # Only this run's devices: other traffic on a shared broker must not fill its queue.
    client.subscribe([(protocol.topic(d, Channel.TELEMETRY), 1) for d in devices])
    time.sleep(0.5)
    ready.set()
    stop.wait()
    client.disconnect()
    client.loop_stop()
    out.put((received, last))


def _run_publishers(
    ctx: SpawnContext, broker: str, names: list[str], seconds: float, consumed: ctypes.c_longlong, tls: Tls | None
) -> tuple[float, BaseProcess, Queue[int]]:
    start_at = time.time() + 1.0
    sent = ctx.Queue()
    publisher = ctx.Process(target=_publish, args=(broker, names, seconds, start_at, consumed, sent, tls),
                            daemon=True)
    publisher.start()
    return start_at, publisher, sent


def device_names(devices: int) -> list[str]:
    """The run's devices; a fresh prefix keeps runs on a shared broker apart."""
    prefix = f"b{uuid.uuid4().hex[:6]}-"
    return [f"{prefix}{i}" for i in range(devices)]


def bare_phase(broker: str, devices: int | list[str], seconds: float, tls: Tls | None = None) -> tuple[int, int, float]:
    """(published, received, msgs/s) for a bare paho subscriber."""
    ctx = mp.get_context("spawn")
    names = device_names(devices) if isinstance(devices, int) else devices
    prefix = names[0].rsplit("-", 1)[0]
    consumed, counts, ready, stop = ctx.Value("q", 0, lock=False), ctx.Queue(), ctx.Event(), ctx.Event()
    bare = ctx.Process(
        target=_bare_subscriber, args=(broker, prefix, names, consumed, ready, stop, counts, tls), daemon=True
    )
    bare.start()
    if not ready.wait(30):
        raise RuntimeError(f"the bare subscriber did not subscribe on {broker}")
    start_at, publisher, sent = _run_publishers(ctx, broker, names, seconds, consumed, tls)
    published = sent.get(timeout=seconds + 120)
    publisher.join()
    deadline = time.time() + DRAIN_TIMEOUT_S
    while consumed.value < published and time.time() < deadline:
        time.sleep(0.05)
    stop.set()
    received, last = counts.get(timeout=30)
    bare.join()
    return published, received, received / max(1e-9, last - start_at)


def _fresh_database(kind: str, postgres: str, workdir: Path) -> tuple[str, str | None]:
    """A new empty database URL (and the PostgreSQL name to drop afterwards)."""
    if kind == "sqlite":
        return f"sqlite:///{workdir / f'ingest-{uuid.uuid4().hex[:6]}.db'}", None
    name = f"edgefleet_bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(f"{postgres}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return f"{postgres}/{name}", name


def _drop(postgres: str, name: str) -> None:
    admin = sa.create_engine(f"{postgres}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _stored(db: Database) -> int:
    with db.unit_of_work() as session:
        return session.scalar(sa.select(sa.func.count()).select_from(TelemetryRecord)) or 0


def bridge_phase(kind: str, broker: str, postgres: str, devices: int | list[str], seconds: float,
                 workdir: Path, tls: Tls | None = None) -> tuple[int, int, float]:
    """(published, rows stored, msgs/s) through the real Bridge + Ingest into a fresh database."""
    url, pg_name = _fresh_database(kind, postgres, workdir)
    db = Database(url)
    try:
        db.upgrade()
        names = device_names(devices) if isinstance(devices, int) else devices
        with db.unit_of_work() as session:
            session.add_all(Device(id=name) for name in names)
        tag = uuid.uuid4().hex[:8]
        options = BridgeOptions(url=broker, client_id=f"bench-ctl-{tag}", share_group=f"bench{tag}",
                                session_expiry_s=60)
        if tls is not None:  # the broker names the session after the certificate; the fleet's share group
            options = replace(options, ca_file=tls.ca, cert_file=f"{tls.certs}/{tls.bridge}.pem",
                              key_file=f"{tls.certs}/{tls.bridge}-key.pem", share_group=tls.share_group,
                              session_expiry_s=0)
        bridge = Bridge(options, Ingest(db),
                        partial(director.seal, signers=[CryptoSigner.generate_ed25519()]))  # sends no desired state
        bridge.start()
        if not bridge.wait_connected(10):
            raise RuntimeError(f"the bridge could not connect to {broker}")
        ctx = mp.get_context("spawn")
        consumed = ctx.Value("q", 0, lock=False)
        start_at, publisher, sent = _run_publishers(ctx, broker, names, seconds, consumed, tls)
        published = None
        deadline = time.time() + seconds + DRAIN_TIMEOUT_S
        while time.time() < deadline:
            consumed.value = bridge.stats.ingested.applied  # committed rows of this run's devices
            if published is None and not sent.empty():
                published = sent.get()
            if published is not None and consumed.value >= published:
                break
            time.sleep(0.002)
        done = time.time()
        publisher.join()
        bridge.stop()
        stored = _stored(db)
        if published is None:
            raise RuntimeError("the publisher process did not finish")
        return published or 0, stored, stored / max(1e-9, done - start_at)
    finally:
        db.dispose()
        if pg_name:
            _drop(postgres, pg_name)


def report(results: Sequence[Result], broker: str) -> str:
    rows = [
        (r.database, r.devices, f"{r.seconds:g}", r.published, r.stored, r.lost, f"{r.bridge_rate:,.0f}",
         f"{r.bare_rate:,.0f}", r.bare_lost, f"{r.ratio:.2f}")
        for r in results
    ]
    headers = ("database", "devices", "phase s", "published", "rows", "lost", "bridge+ingest msgs/s",
               "bare paho msgs/s", "bare lost", "ratio")
    return f"Telemetry ingest on {broker}\n\n" + table(headers, rows)


def main(argv: Sequence[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", default="",
                        help="MQTT broker URL (default: a Mosquitto of this run's own, on a free port: a shared "
                             "broker's other traffic and caps would be measured too)")
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES, help="server URL without a database name")
    parser.add_argument("--databases", default="postgresql,sqlite")
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each phase")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="edgefleet-ingest-") as workdir, ExitStack() as stack:
        broker = args.broker or own_broker(stack, Path(workdir))
        bare_published, bare_received, bare_rate = bare_phase(broker, args.devices, args.seconds)
        for kind in args.databases.split(","):
            published, stored, rate = bridge_phase(
                kind.strip(), broker, args.postgres, args.devices, args.seconds, Path(workdir)
            )
            results.append(Result(
                database="PostgreSQL" if kind.strip() == "postgresql" else "SQLite",
                devices=args.devices, seconds=args.seconds, published=published, stored=stored,
                bridge_rate=rate, bare_received=bare_received, bare_published=bare_published,
                bare_rate=bare_rate,
            ))
    print(report(results, "a dedicated Mosquitto" if not args.broker else args.broker))
    return results


def own_broker(stack: ExitStack, workdir: Path) -> str:
    """A Mosquitto for this run alone (no cap on queued messages), stopped with the stack."""
    from bench.fanout import _connectable, mosquitto, process, wait_for
    from bench.ports import free_port

    port = free_port()
    stack.enter_context(process(mosquitto(workdir, port), workdir / "mosquitto.log"))
    wait_for("mosquitto", lambda: _connectable(port), 20)
    return f"mqtt://127.0.0.1:{port}"

if __name__ == "__main__":
    main()
