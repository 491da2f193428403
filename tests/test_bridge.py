"""The controller's MQTT bridge + ingest against real brokers and real databases."""
from __future__ import annotations

import json
import socket
import threading
import uuid
from collections.abc import Iterator
from typing import cast

import pytest
import sqlalchemy as sa
from securesystemslib.signer import CryptoSigner

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.link import AgentLink
from edgefleet.common import director, protocol
from edgefleet.common.hardware import HardwareProfile
from edgefleet.common.protocol import (
    Action,
    Channel,
    Desired,
    DesiredSet,
    Event,
    ExecutionState,
    ModelRef,
    ModelStatus,
    Reported,
    Status,
    Telemetry,
    TelemetryKind,
)
from edgefleet.common.retry import Backoff
from edgefleet.controller.broker import Bridge, BridgeOptions, _Received
from edgefleet.controller.db.models import (
    Benchmark,
    Device,
    EventRecord,
    Execution,
    Rollout,
    TelemetryRecord,
)
from edgefleet.controller.db.session import Database
from edgefleet.controller.ingest import Ingest
from tests.support.messages import benchmark_report, heartbeat, model_counters
from tests.support.mqtt import (  # noqa: F401  (fixtures)
    Recorder,
    broker_url,
    embedded_broker,
    enroll,
    migrated,
    unique_device,
    wait_until,
)

DIGITS = ModelRef(model="digits", version="1.0", variant="cpu-fp32")

pytestmark = pytest.mark.timeout(90)


DIRECTOR = CryptoSigner.generate_ed25519()


def seal(desired: DesiredSet) -> bytes:
    return director.seal(desired, [DIRECTOR])


def unseal(raw: bytes) -> DesiredSet:
    """The desired state in a published envelope, whose signature must be the director's."""
    envelope = director.open_envelope(raw)
    envelope.verify([DIRECTOR.public_key], 1)
    return DesiredSet.from_json(envelope.payload)


def one_model(device: str, generation: int, **entry) -> DesiredSet:
    """A desired set whose only entry, of digits, changed at ``generation``."""
    return DesiredSet(device=device, generation=generation,
                      models=(Desired(device=device, generation=generation, model="digits", **entry),))


def make_bridge(url: str, db: Database) -> Bridge:
    tag = uuid.uuid4().hex[:8]
    options = BridgeOptions(url=url, client_id=f"ctl-{tag}", share_group=f"g{tag}",
                            session_expiry_s=5, retry=Backoff(0.05, 0.5))
    return Bridge(options, Ingest(db), seal)


def make_link(url: str, device: str, boot: int = 1, desired: list | None = None) -> AgentLink:
    config = AgentConfig(device_id=device, broker_url=url, reconnect_min_s=0.05, reconnect_max_s=0.3)
    got = desired if desired is not None else []
    return AgentLink(config, boot, lambda raw: got.append(unseal(raw)), session_expiry_s=5)


@pytest.fixture
def db(tmp_path) -> Iterator[Database]:
    database = migrated(f"sqlite:///{tmp_path / 'controller.db'}")
    yield database
    database.dispose()


@pytest.fixture
def bridge(broker_url, db) -> Iterator[Bridge]:
    b = make_bridge(broker_url, db)
    b.start()
    assert b.wait_connected(10)
    yield b
    b.stop()


def count(db: Database, table, **where) -> int:
    with db.unit_of_work() as s:
        query = sa.select(sa.func.count()).select_from(table).filter_by(**where)
        return s.scalar(query)


def device_row(db: Database, device: str) -> Device:
    with db.unit_of_work() as s:
        return s.get(Device, device)


def test_a_batch_waits_its_linger_for_messages_that_follow_the_first(db):
    def bridge(linger_s: float) -> Bridge:  # never started: only its batching is used
        options = BridgeOptions(url="mqtt://127.0.0.1:1", client_id="ctl-linger", batch_max=3, batch_linger_s=linger_s)
        return Bridge(options, Ingest(db), seal)

    def put(b: Bridge) -> None:
        b._buffer.put(_Received(Status(device="d1", boot=1, online=True), mid=1, qos=1, epoch=1, at=0.0))

    lingering = bridge(linger_s=0.5)
    put(lingering)
    for delay in (0.05, 0.1, 0.15):
        threading.Timer(delay, put, (lingering,)).start()
    assert len(lingering._take()) == 3  # batch_max ends the wait; the fourth opens the next batch
    assert len(lingering._take()) == 1
    hasty = bridge(linger_s=0.05)
    put(hasty)
    threading.Timer(0.5, put, (hasty,)).start()
    assert len(hasty._take()) == 1  # the linger ran out first


def test_round_trip_desired_out_reports_events_telemetry_in(broker_url, db, bridge):
    assert bridge.is_v5 == broker_url.endswith(":1883")  # Mosquitto speaks 5, amqtt 3.1.1
    device = unique_device()
    enroll(db, device)
    with db.unit_of_work() as s:
        s.add(Rollout(id="r1", model="digits", version="1.0"))
        s.flush()
        s.add(Execution(rollout_id="r1", device_id=device, stage=0, generation=1))
        s.get(Device, device).desired_generation = 3  # the generations sent below
    got: list[DesiredSet] = []
    link = make_link(broker_url, device, boot=3, desired=got)
    rec = Recorder(broker_url, "x/none")
    link.start()
    try:
        desired = one_model(device, 1, deployment="r1", version="1.0", variant="cpu-fp32",
                            target="digits/1.0/cpu-fp32.onnx")
        bridge.publish_desired(desired)  # returns after the PUBACK
        assert wait_until(lambda: got and got[-1] == desired)
        newer = [one_model(device, g, action=Action.NONE) for g in (2, 3)]
        bridge.publish_desired(*newer)  # one batch, every PUBACK awaited
        assert wait_until(lambda: got[-1] == newer[-1])

        # the report as the device's link would send it (the agent's own reports are its tests')
        report = Reported(device=device, boot=3, seq=1000, models=(ModelStatus(model="digits", generation=1),),
                          hardware=HardwareProfile(arch="x86_64").to_dict())
        rec.publish(protocol.topic(device, Channel.REPORTED), report.to_json(), retain=True)
        link.event(ExecutionState.DOWNLOADING, generation=1, deployment="r1")
        link.event(ExecutionState.SUCCEEDED, generation=1, deployment="r1", detail="swapped")
        link.telemetry(benchmark_report(DIGITS, p99_ms=0.3))
        link.telemetry(heartbeat())
        assert wait_until(lambda: count(db, TelemetryRecord, device_id=device) == 2)
        assert bridge.wait_idle(10)
    finally:
        link.stop()
        rec.clear_retained(device)
        rec.close()

    row = device_row(db, device)
    assert (row.online, row.boot) == (True, 3) or not row.online  # stop() may already have said offline
    assert row.reported["models"][0]["generation"] == 1 and row.hardware_class == "x86_64"
    assert count(db, EventRecord, device_id=device) == 2
    assert count(db, Benchmark, device_id=device, hardware_class="x86_64", model="digits") == 1
    with db.unit_of_work() as s:
        execution = s.scalars(sa.select(Execution).filter_by(device_id=device)).one()
        assert (execution.state, execution.detail) == (ExecutionState.SUCCEEDED, "swapped")
    assert bridge.stats.dropped == 0


def test_will_marks_offline_and_a_late_will_from_an_older_boot_is_ignored(broker_url, db, bridge):
    device = unique_device()
    enroll(db, device)
    rec = Recorder(broker_url, f"{protocol.TOPIC_ROOT}/{device}/#")
    link = make_link(broker_url, device, boot=5)
    link.start()
    try:
        assert wait_until(lambda: device_row(db, device).online)
        cast(socket.socket, link._conn.client.socket()).shutdown(2)  # unclean: the broker publishes the will
        assert wait_until(lambda: not device_row(db, device).online), "the will did not mark the device offline"
        assert wait_until(lambda: device_row(db, device).online), "the reconnect did not mark it online"
        stale_before = bridge.stats.ingested.stale
        rec.publish(protocol.topic(device, Channel.STATUS), Status(device=device, boot=4, online=False).to_json())
        assert wait_until(lambda: bridge.stats.ingested.stale > stale_before)
        row = device_row(db, device)
        assert (row.online, row.boot) == (True, 5)
    finally:
        link.stop()
        rec.clear_retained(device)
        rec.close()


def test_qos1_redeliveries_are_deduplicated(broker_url, db, bridge):
    device = unique_device()
    enroll(db, device)
    rec = Recorder(broker_url, "x/none")
    event = Event(device=device, boot=1, seq=1, generation=1, state=ExecutionState.DOWNLOADING)
    telemetry = Telemetry(device=device, boot=1, seq=2, kind=TelemetryKind.COUNTERS, counters=model_counters(DIGITS, 1))
    for message, channel in ((event, Channel.EVENTS), (telemetry, Channel.TELEMETRY)):
        rec.publish(protocol.topic(device, channel), message.to_json())
        rec.publish(protocol.topic(device, channel), message.to_json())
    assert wait_until(lambda: bridge.stats.ingested.duplicates >= 2
                      and count(db, TelemetryRecord, device_id=device) == 1)
    assert bridge.wait_idle(10)
    assert count(db, EventRecord, device_id=device) == 1
    assert count(db, TelemetryRecord, device_id=device) == 1
    rec.close()


def test_bad_messages_are_dropped_without_writes_and_the_bridge_keeps_going(broker_url, db, bridge):
    device, stranger = unique_device(), unique_device("stranger")
    enroll(db, device)
    rec = Recorder(broker_url, "x/none")
    good = Telemetry(device=device, boot=1, seq=1, kind=TelemetryKind.HEARTBEAT, heartbeat=heartbeat()).to_json()
    rec.publish(protocol.topic(device, Channel.EVENTS), b"{not json")
    rec.publish(protocol.topic(device, Channel.TELEMETRY), b"x" * (protocol.MAX_MESSAGE_BYTES + 1))
    rec.publish(protocol.topic(device, Channel.TELEMETRY),
                Telemetry(device="other-device", boot=1, seq=1, kind=TelemetryKind.HEARTBEAT,
                          heartbeat=heartbeat()).to_json())
    rec.publish(protocol.topic(device, Channel.TELEMETRY),  # a payload that is not the one its kind names
                Telemetry(device=device, boot=1, seq=1, kind=TelemetryKind.COUNTERS, heartbeat=heartbeat()).to_json())
    rec.publish(protocol.topic(device, Channel.TELEMETRY), json.dumps({"v": 1, "device": device}).encode())
    rec.publish(f"{protocol.TOPIC_ROOT}/{device}/firmware", good)  # unknown channel: not even received
    # Nested past the parser's recursion limit (RecursionError, once never acked) and past the bound.
    rec.publish(protocol.topic(device, Channel.TELEMETRY), b"[" * 30_000 + b"]" * 30_000)
    rec.publish(protocol.topic(device, Channel.EVENTS), b'{"a":' * 10_000 + b"1" + b"}" * 10_000)
    rec.publish(protocol.topic(device, Channel.STATUS), b"[" * 40 + b"]" * 40)
    rec.publish(protocol.topic(stranger, Channel.TELEMETRY),
                Telemetry(device=stranger, boot=1, seq=1, kind=TelemetryKind.HEARTBEAT,
                          heartbeat=heartbeat()).to_json())
    # A shared broker may carry other tests' traffic too: counts are lower bounds.
    assert wait_until(lambda: bridge.stats.dropped >= 8 and bridge.stats.ingested.unknown >= 1)
    assert bridge.wait_idle(10)
    assert count(db, TelemetryRecord) == 0 and count(db, EventRecord) == 0
    assert device_row(db, device).last_seen is None and device_row(db, stranger) is None

    rec.publish(protocol.topic(device, Channel.TELEMETRY), good)
    assert wait_until(lambda: count(db, TelemetryRecord, device_id=device) == 1)
    rec.close()


def test_undecodable_messages_are_acked_so_the_broker_keeps_delivering(broker_url, db):
    """More parser-breaking messages than the broker's in-flight window: each is acked and counted."""
    tag = uuid.uuid4().hex[:8]
    bridge = Bridge(BridgeOptions(url=broker_url, client_id=f"ctl-{tag}", share_group=f"g{tag}",
                                  session_expiry_s=5, batch_max=2, retry=Backoff(0.05, 0.5)), Ingest(db), seal)
    bridge.start()
    assert bridge.wait_connected(10)
    device = unique_device()
    enroll(db, device)
    rec = Recorder(broker_url, "x/none")
    for _ in range(12):  # receive maximum is 4: unacked, the fifth would never be delivered
        rec.publish(protocol.topic(device, Channel.TELEMETRY), b"[" * 30_000 + b"]" * 30_000)
    rec.publish(protocol.topic(device, Channel.TELEMETRY),
                Telemetry(device=device, boot=1, seq=1, kind=TelemetryKind.HEARTBEAT, heartbeat=heartbeat()).to_json())
    assert wait_until(lambda: count(db, TelemetryRecord, device_id=device) == 1, timeout=20)
    assert bridge.stats.dropped >= 12
    rec.close()
    bridge.stop()


def test_database_down_then_back_loses_nothing(mosquitto_url, make_postgres_db):
    url = make_postgres_db()
    name = url.rsplit("/", 1)[1]
    db = migrated(url)
    device = unique_device()
    enroll(db, device)
    bridge = make_bridge(mosquitto_url, db)
    bridge.start()
    link = make_link(mosquitto_url, device)
    link.start()
    admin = sa.create_engine(url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    try:
        assert bridge.wait_connected(10) and link.wait_connected(10)
        with admin.connect() as c:  # the database really goes away for the bridge
            c.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
            c.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"), {"n": name})
        for i in range(60):
            link.telemetry(model_counters(DIGITS, i))
            if i % 10 == 0:
                link.event(ExecutionState.DOWNLOADING, generation=i)
        assert wait_until(lambda: bridge.stats.retries >= 2, timeout=20), "the bridge never hit the outage"
        with admin.connect() as c:
            c.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        assert wait_until(lambda: count(db, TelemetryRecord, device_id=device) == 60, timeout=30)
        assert count(db, EventRecord, device_id=device) == 6
    finally:
        with admin.connect() as c:
            c.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        link.stop()
        bridge.stop()
        Recorder(mosquitto_url, "x/none").clear_retained(device)
        db.dispose()
        admin.dispose()


def test_restarted_embedded_broker_gets_the_desired_states_back(embedded_broker, db):
    device = unique_device()
    desired = one_model(device, 4, action=Action.NONE)
    enroll(db, device)
    with db.unit_of_work() as s:
        s.get(Device, device).desired = desired.to_dict()
    bridge = make_bridge(embedded_broker.url, db)
    bridge.start()
    got: list[DesiredSet] = []
    link = make_link(embedded_broker.url, device, desired=got)
    try:
        assert bridge.wait_connected(10)
        link.start()
        assert wait_until(lambda: got and got[-1] == desired)
        embedded_broker.stop()  # amqtt keeps retained messages in memory only
        got.clear()
        embedded_broker.start()
        assert wait_until(lambda: got and got[-1] == desired, timeout=20), "desired state not republished"
    finally:
        link.stop()
        bridge.stop()


def test_replicas_split_the_load_with_shared_subscriptions(mosquitto_url, db):
    device = unique_device()
    enroll(db, device)
    first = make_bridge(mosquitto_url, db)
    second = Bridge(BridgeOptions(url=mosquitto_url, client_id=f"{first.options.client_id}-2",
                                  share_group=first.options.share_group, session_expiry_s=5), Ingest(db), seal)
    rec = Recorder(mosquitto_url, "x/none")
    try:
        for b in (first, second):
            b.start()
            assert b.wait_connected(10) and b.is_v5
        for seq in range(1, 41):
            rec.publish(protocol.topic(device, Channel.TELEMETRY),
                        Telemetry(device=device, boot=1, seq=seq, kind=TelemetryKind.COUNTERS,
                                  counters=model_counters(DIGITS, seq)).to_json())
        # Split between the replicas, committed out of order, and still none lost or doubled.
        assert wait_until(lambda: count(db, TelemetryRecord, device_id=device) == 40)
        assert first.stats.ingested.applied > 0 and second.stats.ingested.applied > 0
        assert first.wait_idle(5) and second.wait_idle(5)
        assert count(db, TelemetryRecord, device_id=device) == 40
    finally:
        first.stop()
        second.stop()
        rec.close()


def test_a_retained_report_missed_on_the_shared_subscription_is_read_again(mosquitto_url, db):
    """Shared subscriptions get no retained messages: a report published while no replica
    listened reaches ingest only when the bridge asks for it again (the leader's sweep)."""
    device = unique_device()
    enroll(db, device)
    rec = Recorder(mosquitto_url, "x/none")
    bridge = make_bridge(mosquitto_url, db)
    try:
        report = Reported(device=device, boot=1, seq=3, models=(ModelStatus(model="digits", generation=0, active=DIGITS),))
        rec.publish(protocol.topic(device, Channel.REPORTED), report.to_json(), retain=True)
        bridge.start()
        assert bridge.wait_connected(10) and bridge.is_v5
        assert bridge.wait_idle(5)
        assert device_row(db, device).reported is None, "a shared subscription got a retained message"
        assert bridge.reread_reports([device]) == 1
        assert wait_until(lambda: (device_row(db, device).reported or {}).get("seq") == 3, timeout=30)
        assert bridge.reread_reports([]) == 0  # the previous sweep's subscriptions are dropped
    finally:
        bridge.stop()
        rec.clear_retained(device)
        rec.close()
