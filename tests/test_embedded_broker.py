"""The embedded broker's fixes and rules, on real amqtt brokers: retained replay, disconnect, the ACL."""
from __future__ import annotations

import logging
import socket
import struct

import pytest

from edgefleet.common import protocol
from edgefleet.common.protocol import Action, Channel, Desired
from edgefleet.controller import broker_acl
from edgefleet.controller.broker_acl import CONTROLLER_USER
from edgefleet.controller.embedded_broker import EmbeddedBroker
from tests.conftest import free_port
from tests.support.mqtt import (  # noqa: F401  (fixtures)
    Recorder,
    embedded_broker,
    replaying_broker,
    unique_device,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)


def retained_desired_elsewhere(url: str) -> tuple[Recorder, str]:
    """Another device subscribed to its desired topic, which holds a retained desired state."""
    other = unique_device("other")
    owner = Recorder(url, protocol.topic(other, Channel.DESIRED))
    owner.publish(protocol.topic(other, Channel.DESIRED), Desired(device=other, generation=5,
                                                                   action=Action.NONE).to_json(), retain=True)
    return owner, other


@pytest.mark.parametrize("patched", [False, True], ids=["amqtt-0.12.1", "embedded"])
def test_a_connecting_client_gets_only_retained_messages_of_its_own_filters(patched, request):
    broker = request.getfixturevalue("embedded_broker" if patched else "replaying_broker")
    owner, other = retained_desired_elsewhere(broker.url)
    newcomer = Recorder(broker.url, "nothing/here")
    try:
        assert wait_until(lambda: owner.messages)  # the owner's own retained message does arrive
        replayed = wait_until(lambda: newcomer.messages, timeout=1.0)
        # amqtt replays the other device's retained desired state to whoever connects; ours does not
        assert replayed is not patched, newcomer.messages
    finally:
        owner.clear_retained(other)
        owner.close()
        newcomer.close()


def test_disconnect_closes_the_session_at_once(embedded_broker):
    device = unique_device()
    rec = Recorder(embedded_broker.url, protocol.topic(device, Channel.DESIRED))
    client_id = rec.client._client_id.decode()
    closed: list[object] = []
    rec.client.on_disconnect = lambda *args: closed.append(args)
    rec.client.reconnect_delay_set(30, 30)  # stays away, so the test sees the close
    assert embedded_broker.disconnect(client_id)
    assert wait_until(lambda: closed, timeout=2.0)
    assert not embedded_broker.disconnect("nobody-here")
    rec.close()


@pytest.mark.parametrize(("user", "client_id", "will", "refused"), [
    ("pi-1", "pi-1", "edgefleet/v1/pi-1/status", False),
    ("pi-1", "pi-1", None, False),
    ("pi-1", "pi-2", None, True),                            # another device's client id
    ("pi-1", broker_acl.reserved_client_id("host"), None, True),  # the controller's
    ("pi-1", "pi-1", "edgefleet/v1/pi-2/status", True),       # a will on another device's topic
    ("pi-1", "pi-1", "edgefleet/v1/pi-1/desired", True),
    (CONTROLLER_USER, broker_acl.reserved_client_id("host"), None, False),
    (CONTROLLER_USER, "pi-1", None, True),                   # not even the controller takes a device's id
])
def test_connect_rules(user, client_id, will, refused):
    assert (broker_acl.connect_refusal(user, client_id, will) is not None) is refused


def test_topic_rules():
    own = [protocol.topic("pi-1", c) for c in Channel]
    assert [broker_acl.may_publish("pi-1", t) for t in own] == [c is not Channel.DESIRED for c in Channel]
    assert [broker_acl.may_subscribe("pi-1", t) for t in own] == [c is Channel.DESIRED for c in Channel]
    for stranger in ("#", "edgefleet/v1/+/desired", "edgefleet/v1/pi-2/desired", "edgefleet/v1/pi-1/#",
                     "$share/g/edgefleet/v1/+/events", "edgefleet/v1/pi-2/events"):
        assert not broker_acl.may_subscribe("pi-1", stranger) and not broker_acl.may_publish("pi-1", stranger)
    assert not broker_acl.may_publish(None, own[1]) and not broker_acl.may_subscribe("", own[0])
    assert broker_acl.may_subscribe(CONTROLLER_USER, "edgefleet/v1/+/events")
    assert broker_acl.may_publish(CONTROLLER_USER, own[0])


def test_a_client_that_resets_during_connect_costs_one_line_not_a_traceback(caplog):
    """A reset while amqtt answers a CONNECT (a port probe, a client killed) reached asyncio as an
    unhandled OSError: one traceback per connection in the controller's log."""
    broker = EmbeddedBroker(port=free_port(), check_password=lambda _user, _password: False)
    broker.start()
    try:
        for level in (3, 4):  # an unsupported protocol level (amqtt answers), a refused login (we do)
            for _ in range(5):
                with socket.create_connection((broker.host, broker.port)) as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
                    sock.sendall(_connect(level))
        assert wait_until(lambda: sum("left during CONNECT" in r.getMessage() for r in caplog.records) >= 1)
    finally:
        broker.stop()
    assert [r.getMessage() for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR] == []


def _connect(level: int) -> bytes:
    """An MQTT CONNECT packet with protocol ``level``, clean session, client id "probe"."""
    body = b"\x00\x04MQTT" + bytes([level]) + b"\x02\x00\x3c" + b"\x00\x05probe"
    return bytes([0x10, len(body)]) + body
