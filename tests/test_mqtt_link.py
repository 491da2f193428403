"""The agent's MQTT link against real brokers: the embedded amqtt (3.1.1) and Mosquitto (5)."""
from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import cast

import pytest

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.link import AgentLink, OfflineQueue, _Pending
from edgefleet.common import protocol
from edgefleet.common.mqtt import BrokerURL
from edgefleet.common.protocol import Action, Channel, Desired, ExecutionState
from edgefleet.common.retry import Backoff
from tests.support.messages import heartbeat
from tests.support.mqtt import (  # noqa: F401  (fixtures)
    Recorder,
    broker_url,
    embedded_broker,
    replaying_broker,
    unique_device,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)


def make_link(url: str, device: str, desired: list, boot: int = 7, queue_max: int = 1000,
              raw: bool = False) -> AgentLink:
    """A link whose desired bytes land in ``desired`` (parsed, unless ``raw``: the director judges them)."""
    config = AgentConfig(device_id=device, broker_url=url, offline_queue_max=queue_max,
                         reconnect_min_s=0.05, reconnect_max_s=0.3)
    take = desired.append if raw else (lambda payload: desired.append(Desired.from_json(payload)))
    return AgentLink(config, boot=boot, on_desired=take, session_expiry_s=5)


@pytest.fixture
def device() -> str:
    return unique_device("link")


@pytest.fixture
def recorder(broker_url, device) -> Iterator[Recorder]:
    rec = Recorder(broker_url, f"{protocol.TOPIC_ROOT}/{device}/#")
    yield rec
    rec.clear_retained(device)
    rec.close()


def desired_for(device: str, generation: int) -> Desired:
    return Desired(device=device, generation=generation, action=Action.NONE)


def statuses(rec: Recorder) -> list[dict]:
    return [json.loads(p) for p in rec.on(Channel.STATUS)]


def test_round_trip_desired_in_reports_events_telemetry_out(broker_url, recorder, device):
    got: list[Desired] = []
    link = make_link(broker_url, device, got)
    link.start()
    try:
        assert link.wait_connected(10)
        recorder.publish(protocol.topic(device, Channel.DESIRED), desired_for(device, 3).to_json(), retain=True)
        assert wait_until(lambda: got), "the desired state never reached on_desired"
        assert got[-1].generation == 3

        link.report(agent_version="t")
        link.event(ExecutionState.DOWNLOADING, generation=3, deployment="r1")
        link.telemetry(heartbeat())
        assert wait_until(lambda: recorder.on(Channel.TELEMETRY))
        sent = [json.loads(recorder.on(ch)[-1]) for ch in (Channel.REPORTED, Channel.EVENTS, Channel.TELEMETRY)]
        assert [m["seq"] for m in sent] == [1, 2, 3]
        assert all(m["device"] == device and m["boot"] == 7 for m in sent)
        assert sent[1]["state"] == "DOWNLOADING" and sent[1]["deployment"] == "r1"
        assert statuses(recorder)[0] == {**statuses(recorder)[0], "online": True, "boot": 7}
    finally:
        link.stop()
    assert wait_until(lambda: statuses(recorder)[-1]["online"] is False), "stop() did not say offline"


def test_will_marks_offline_and_desired_is_redelivered_after_reconnect(broker_url, recorder, device):
    recorder.publish(protocol.topic(device, Channel.DESIRED), desired_for(device, 1).to_json(), retain=True)
    got: list[Desired] = []
    link = make_link(broker_url, device, got, boot=42)
    link.start()
    try:
        assert wait_until(lambda: got)
        time.sleep(0.3)  # amqtt may deliver a retained message twice on one subscribe
        delivered = len(got)
        # Cut the TCP connection under paho: the broker sees an unclean disconnect.
        cast(socket.socket, link._conn.client.socket()).shutdown(socket.SHUT_RDWR)
        assert wait_until(lambda: any(s["online"] is False for s in statuses(recorder)))
        will = next(s for s in statuses(recorder) if s["online"] is False)
        assert will["boot"] == 42
        assert wait_until(lambda: len(got) > delivered), "the retained desired state was not re-read on reconnect"
        assert wait_until(lambda: statuses(recorder)[-1]["online"] is True)
    finally:
        link.stop()


def test_the_link_takes_only_its_own_desired_state_from_a_broker_that_replays_others(replaying_broker):
    # amqtt 0.12.1 hands a connecting client the retained messages of every client's subscriptions
    other, device = unique_device("other"), unique_device("own")
    owner = Recorder(replaying_broker.url, protocol.topic(other, Channel.DESIRED))
    owner.publish(protocol.topic(other, Channel.DESIRED), desired_for(other, 5).to_json(), retain=True)
    got: list[Desired] = []
    link = make_link(replaying_broker.url, device, got)
    probe = Recorder(replaying_broker.url, "nothing/here")  # sees what the broker replays
    link.start()
    try:
        assert link.wait_connected(10)
        assert wait_until(lambda: probe.messages), "the broker no longer replays: drop this fixture"
        owner.publish(protocol.topic(device, Channel.DESIRED), desired_for(device, 1).to_json())
        assert wait_until(lambda: got)
        time.sleep(0.3)
        assert [(d.device, d.generation) for d in got] == [(device, 1)]
    finally:
        link.stop()
        probe.close()
        owner.close()


def test_the_link_hands_over_its_own_desired_bytes_unjudged_and_keeps_working(embedded_broker):
    """Judging a desired state is the director's (agent/director.py): the link passes on the bytes
    of its own desired topic, whatever they are, and nothing of another device's."""
    device = unique_device("bad")
    rec = Recorder(embedded_broker.url, f"{protocol.TOPIC_ROOT}/{device}/#")
    got: list[bytes] = []
    link = make_link(embedded_broker.url, device, got, raw=True)
    link.start()
    try:
        assert link.wait_connected(10)
        topic = protocol.topic(device, Channel.DESIRED)
        payloads = [b"{not json", desired_for("someone-else", 1).to_json(), b" " * (protocol.MAX_MESSAGE_BYTES + 1)]
        for payload in payloads:
            rec.publish(topic, payload)
        rec.publish(protocol.topic(unique_device("other"), Channel.DESIRED), desired_for(device, 8).to_json())
        rec.publish(topic, desired_for(device, 9).to_json())
        assert wait_until(lambda: len(got) == 4)
        assert got == [*payloads, desired_for(device, 9).to_json()]
        assert link.connected
    finally:
        link.stop()
        rec.close()


def test_offline_queue_keeps_events_drops_oldest_telemetry_and_flushes_in_order(embedded_broker):
    device = unique_device("queue")
    rec = Recorder(embedded_broker.url, f"{protocol.TOPIC_ROOT}/{device}/#")
    link = make_link(embedded_broker.url, device, [], queue_max=5)
    # Not started yet: the broker is unreachable as far as the link knows.
    link.report(agent_version="1")                            # seq 1
    link.event(ExecutionState.DOWNLOADING, generation=1)                    # seq 2
    for i in range(6):
        link.telemetry(heartbeat(i))                            # seq 3..8
    link.event(ExecutionState.VERIFYING, generation=1)                      # seq 9
    link.report(agent_version="2")                            # seq 10 replaces seq 1
    assert len(link.queue) == 5 and link.queue.dropped == 4  # a superseded report is no loss
    link.start()
    try:
        assert wait_until(lambda: len(rec.on(Channel.EVENTS)) == 2 and rec.on(Channel.REPORTED))
        assert wait_until(lambda: len(rec.on(Channel.TELEMETRY)) == 2)
        seqs = [json.loads(p)["seq"] for t, p, _ in rec.messages if not t.endswith("/status")]
        assert seqs == [2, 7, 8, 9, 10]
        assert len(link.queue) == 0
    finally:
        link.stop()
        rec.close()


def test_offline_queue_drops_the_oldest_event_only_when_nothing_else_is_left():
    queue = OfflineQueue(2)
    for n in range(3):
        queue.put(_Pending(Channel.EVENTS, str(n).encode(), False))
    queue.put(_Pending(Channel.TELEMETRY, b"t", False))
    assert [p.payload for p in queue._items] == [b"1", b"2"] and queue.dropped == 2


def test_reconnects_after_broker_restart(embedded_broker):
    device = unique_device("restart")
    got: list[Desired] = []
    link = make_link(embedded_broker.url, device, got)
    link.start()
    try:
        assert link.wait_connected(10)
        embedded_broker.stop()
        assert wait_until(lambda: not link.connected)
        link.event(ExecutionState.STAGED, generation=1)  # queued while the broker is away
        embedded_broker.start()
        assert link.wait_connected(10)
        rec = Recorder(embedded_broker.url, f"{protocol.TOPIC_ROOT}/{device}/#")
        try:
            rec.publish(protocol.topic(device, Channel.DESIRED), desired_for(device, 5).to_json(), retain=True)
            assert wait_until(lambda: got and got[-1].generation == 5)
            link.telemetry(heartbeat())
            assert wait_until(lambda: rec.on(Channel.TELEMETRY))
            assert json.loads(rec.on(Channel.TELEMETRY)[-1])["seq"] == 2
        finally:
            rec.close()
    finally:
        link.stop()


def test_broker_url_and_backoff():
    assert BrokerURL.parse("mqtts://h") == BrokerURL("h", 8883, True, "auto")
    assert BrokerURL.parse("mqtt://h:1?protocol=3.1.1").protocol == "3.1.1"
    for bad in ("http://h", "mqtt://h?protocol=4", "mqtt://h?x=1", "mqtt://:1"):
        with pytest.raises(ValueError):
            BrokerURL.parse(bad)
    backoff = Backoff(0.5, 4.0)
    delays = [backoff.delay(attempt) for attempt in range(40) for _ in range(5)]
    assert all(0.5 <= d <= 4.0 for d in delays)
    assert len({round(d, 3) for d in delays}) > 10  # jittered, not lock-step
