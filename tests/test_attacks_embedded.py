"""Attacks on the embedded broker with one enrolled device's own credentials (issue 11).

A real ``fleetctl controller run`` (embedded amqtt broker, SQLite) and a real agent
process, the victim, serving digits 1.0.0. The attacker is another enrolled device
whose MQTT login is driven by hand (paho). Each case asserts the attack is refused,
that nothing of it was ingested or installed, and the last one that a normal update
still goes through.
"""
from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
import pytest
import sqlalchemy as sa
from paho.mqtt.enums import CallbackAPIVersion

from demo.scenario import AgentProcess, Controller, Fleetctl, wait_for, wait_for_fleet, wait_rollout, write_config
from edgefleet.agent.config import AgentConfig
from edgefleet.common import protocol
from edgefleet.common.director import open_envelope
from edgefleet.common.hardware import HardwareProfile
from edgefleet.common.protocol import (
    Action,
    Channel,
    Desired,
    DesiredSet,
    Event,
    ExecutionState,
    Heartbeat,
    ModelStatus,
    Reported,
    Status,
    Telemetry,
    TelemetryKind,
)
from edgefleet.controller.broker_acl import CONTROLLER_USER, reserved_client_id
from edgefleet.controller.db.models import Device, EventRecord, Execution, TelemetryRecord
from edgefleet.controller.db.session import Database
from tests.conftest import free_port
from tests.support.messages import counter_snapshot, heartbeat

pytestmark = pytest.mark.slow
QUIET_S = 3.0  # longer than the victim's heartbeat (2 s): what would arrive has arrived
DEPLOY = ["--stages", "100%", "--bake", "1s", "--min-devices-per-stage", "1", "--device-timeout", "2m",
          "--max-p99-regression", "100%"]


class Login:
    """One MQTT 3.1.1 connection made by hand; ``refused`` holds the CONNACK failure, if any."""

    def __init__(self, port: int, username: str | None, password: str | None, client_id: str,
                 will_topic: str | None = None) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._subacks: dict[int, bool] = {}  # by mid: a SUBACK may arrive before subscribe() returns
        self.refused: str | None = None
        self.closed = threading.Event()
        self._answered = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311)
        if username is not None:
            self.client.username_pw_set(username, password)
        if will_topic is not None:
            self.client.will_set(will_topic, b"x", qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *_a: self.closed.set()
        self.client.on_message = lambda _c, _u, m: self.messages.append((m.topic, bytes(m.payload)))
        self.client.on_subscribe = self._on_subscribe
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._answered.wait(10), "no CONNACK"
        if self.refused:
            self.client.loop_stop()  # paho would keep retrying a refused login

    def _on_connect(self, _c: paho.Client, _u: object, _f: object, reason: paho.ReasonCode, _p: object) -> None:
        self.refused = str(reason) if reason.is_failure else None
        self._answered.set()

    def _on_subscribe(self, _c: paho.Client, _u: object, mid: int, codes: list, _p: object) -> None:
        self._subacks[mid] = not codes[0].is_failure

    def subscribe(self, topic_filter: str) -> bool:
        _rc, mid = self.client.subscribe(topic_filter, qos=1)
        assert wait_for(lambda: mid in self._subacks, 10, f"SUBACK for {topic_filter}")
        return self._subacks[mid]

    def publish(self, topic: str, message: protocol.Message, retain: bool = False) -> None:
        self.client.publish(topic, message.to_json(), qos=1, retain=retain).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Fleet:
    fleetctl: Fleetctl
    controller: Controller
    db: Database
    broker_port: int
    victim: AgentProcess
    mallory: AgentConfig  # the attacker: an enrolled device that is not running
    work: Path

    def login(self, config: AgentConfig | None = None, client_id: str | None = None,
              will_topic: str | None = None) -> Login:
        config = config or self.mallory
        return Login(self.broker_port, config.mqtt_username, config.mqtt_password,
                     client_id or config.device_id, will_topic)

    def enroll(self, name: str, label: str) -> AgentProcess:
        return enroll(self.fleetctl, self.controller, self.work, name, label)

    def device(self, device_id: str) -> Device | None:
        with self.db.reading() as session:
            device = session.get(Device, device_id)
            if device is not None:
                session.expunge(device)  # readable after the session ends
            return device

    def events(self, device_id: str) -> int:
        with self.db.reading() as session:
            return session.scalar(sa.select(sa.func.count()).where(EventRecord.device_id == device_id)) or 0

    def uptimes(self, device_id: str) -> set[float]:
        with self.db.reading() as session:
            rows = session.scalars(sa.select(TelemetryRecord.data).where(TelemetryRecord.device_id == device_id))
            return {row.get("uptime_s") for row in rows}

    def still_ingesting(self, device_id: str) -> None:
        """The device's next heartbeat reaches the database: ingest keeps working."""
        before = self.device(device_id)
        assert before is not None
        wait_for(lambda: (d := self.device(device_id)) and d.last_telemetry_seq > before.last_telemetry_seq,
                 15, f"a new heartbeat of {device_id} ingested", self.controller.log)


def enroll(fleetctl: Fleetctl, controller: Controller, work: Path, name: str, label: str) -> AgentProcess:
    """A device enrolled through ``fleet-agent enroll`` (not started), with one label."""
    agent = AgentProcess(name, "x86_64", work / name, free_port()).enroll(fleetctl, controller.url)
    fleetctl("devices", "label", name, label)
    return agent


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Fleet]:
    from bench import models

    work = tmp_path_factory.mktemp("attacks")
    home, api_port, broker_port = work / "home", free_port(), free_port()
    write_config(home, api_port, embedded_broker_port=broker_port)
    fleetctl = Fleetctl(home)
    fleetctl("init")
    digits = models.digits(model_cache)
    for version in ("1.0.0", "1.1.0"):
        fleetctl("bundle", "build", str(digits.model), "--name", "digits", "--version", version,
                 "--variant", "cpu-fp32", "--calibration", str(digits.calibration_data),
                 "--eval", str(digits.eval_data), "-o", str(work / version))
        fleetctl("bundle", "publish", str(work / version))
    controller = Controller(home, f"http://127.0.0.1:{api_port}").start()
    run = uuid.uuid4().hex[:6]
    victim = AgentProcess(f"victim-{run}", "x86_64", work / "victim", free_port())
    db = Database(f"sqlite:///{home / 'controller.db'}")
    try:
        victim.enroll(fleetctl, controller.url).start()
        fleetctl("devices", "label", victim.name, "role=victim")
        mallory = AgentConfig.load(enroll(fleetctl, controller, work, f"mallory-{run}", "role=mallory").config_path)
        fleet = Fleet(fleetctl, controller, db, broker_port, victim, mallory, work)
        wait_for_fleet(fleetctl, {fleet.victim.name: "x86_64"})
        fleetctl("deploy", "digits:1.0.0", "--to", "role=victim", "--name", "v1", *DEPLOY)
        assert wait_rollout(fleetctl, "v1")["state"] == "SUCCEEDED", controller.log()
        assert fleet.victim.serving() == "1.0.0", fleet.victim.log()
        yield fleet
    finally:
        victim.stop()
        controller.stop()
        db.dispose()


def test_reading_what_is_not_its_own_gets_nothing(fleet):
    victim = fleet.victim.name
    login = fleet.login()
    try:
        assert login.refused is None
        refused = ["#", f"{protocol.TOPIC_ROOT}/+/reported", f"{protocol.TOPIC_ROOT}/{victim}/desired",
                   f"{protocol.TOPIC_ROOT}/{victim}/#", f"$share/edgefleet/{protocol.TOPIC_ROOT}/+/events"]
        assert {f: login.subscribe(f) for f in refused} == dict.fromkeys(refused, False)
        assert login.subscribe(protocol.topic(fleet.mallory.device_id, Channel.DESIRED))  # its own: granted
        time.sleep(QUIET_S)
        assert login.messages == [], "the attacker read another device's traffic"
    finally:
        login.close()


def test_a_retained_rollback_on_another_devices_desired_is_not_taken(fleet):
    victim = fleet.victim.name
    statuses = fleet.device(victim).reported["models"]
    login = fleet.login()
    try:
        entry = Desired(device=victim, generation=10**12, action=Action.ROLLBACK, model="digits")
        rollback = DesiredSet(device=victim, generation=10**12, models=(entry,))
        login.publish(protocol.topic(victim, Channel.DESIRED), rollback, retain=True)
        time.sleep(QUIET_S)
    finally:
        login.close()
    assert fleet.victim.serving() == "1.0.0"
    assert fleet.device(victim).reported["models"] == statuses
    assert "rollback" not in fleet.victim.log().lower()


def test_forged_events_telemetry_and_status_of_another_device_are_not_ingested(fleet):
    victim = fleet.victim.name
    before = fleet.device(victim)
    events = fleet.events(victim)
    login = fleet.login()
    try:
        forged = {
            Channel.EVENTS: Event(device=victim, boot=before.boot, seq=10**6, generation=1,
                                  state=ExecutionState.SUCCEEDED, deployment="v1", detail="forged"),
            Channel.TELEMETRY: Telemetry(device=victim, boot=before.boot, seq=10**6, kind=TelemetryKind.HEARTBEAT,
                                         heartbeat=heartbeat(uptime_s=4242.0)),
            Channel.STATUS: Status(device=victim, boot=10**9, online=False),
            Channel.REPORTED: Reported(device=victim, boot=10**9, seq=0,
                                       models=(ModelStatus(model="digits", generation=10**9),)),
        }
        for channel, message in forged.items():
            login.publish(protocol.topic(victim, channel), message, retain=channel in protocol.RETAINED)
            # its own topic, naming the victim in the body: the bridge drops the mismatch
            login.publish(protocol.topic(fleet.mallory.device_id, channel), message)
        time.sleep(QUIET_S)
    finally:
        login.close()
    after = fleet.device(victim)
    assert (after.boot, after.online) == (before.boot, True)
    assert after.reported["models"] == before.reported["models"]
    assert fleet.events(victim) == events
    assert 4242.0 not in fleet.uptimes(victim)
    fleet.still_ingesting(victim)


def test_taking_over_another_client_id_or_the_controllers_is_refused(fleet):
    victim = fleet.victim.name
    tries = {
        "the victim's client id": fleet.login(client_id=victim),
        "the controller's client id": fleet.login(client_id=reserved_client_id(socket.gethostname())),
        "a will on the victim's status": fleet.login(will_topic=protocol.topic(victim, Channel.STATUS)),
        "anonymous": Login(fleet.broker_port, None, None, f"anon-{uuid.uuid4().hex[:6]}"),
        "the controller's login": Login(fleet.broker_port, CONTROLLER_USER, fleet.mallory.mqtt_password,
                                        reserved_client_id("x")),
    }
    for login in tries.values():
        login.close()
    assert {what: login.refused is not None for what, login in tries.items()} == dict.fromkeys(tries, True)
    assert fleet.device(victim).online
    fleet.still_ingesting(victim)


def test_a_removed_devices_session_is_closed_at_once(fleet):
    name = f"gone-{uuid.uuid4().hex[:6]}"
    config = AgentConfig.load(fleet.enroll(name, "role=gone").config_path)
    login = fleet.login(config)
    try:
        login.publish(protocol.topic(name, Channel.STATUS), Status(device=name, boot=1, online=True))
        wait_for(lambda: (d := fleet.device(name)) and d.online, 10, f"{name} online")
        fleet.fleetctl("devices", "remove", name, "--yes")  # returns once the broker closed the session
        assert login.closed.wait(5), "the removed device's session stayed open"
        time.sleep(2)  # paho reconnects on its own: the broker must refuse it
        assert not login.client.is_connected() and login.refused is not None
    finally:
        login.close()
    again = fleet.login(config)
    assert again.refused is not None, "a removed device logged in again"
    time.sleep(1)
    assert fleet.device(name) is None


def test_a_first_connect_gets_only_its_own_retained_desired_state(fleet):
    name = f"fresh-{uuid.uuid4().hex[:6]}"
    agent = fleet.enroll(name, "role=fresh")
    login = fleet.login(AgentConfig.load(agent.config_path))
    try:
        assert login.subscribe(protocol.topic(name, Channel.DESIRED))
        time.sleep(1)
        assert login.messages == [], "a first connect was handed another device's retained desired state"
    finally:
        login.close()
    agent.start()
    try:
        wait_for(lambda: (d := fleet.device(name)) and d.online, 30, f"{name} online", agent.log)
        time.sleep(QUIET_S)
        assert fleet.events(name) == 0 and agent.serving() is None, agent.log()
    finally:
        agent.stop()


def test_a_devices_own_claims_are_bounded(fleet):
    mallory = fleet.mallory.device_id
    login = fleet.login()
    try:
        login.subscribe(protocol.topic(mallory, Channel.DESIRED))
        hardware = HardwareProfile(arch="x86_64", memory_mb=4096).to_dict()
        login.publish(protocol.topic(mallory, Channel.REPORTED),
                      Reported(device=mallory, boot=1, seq=1, hardware=hardware), retain=True)
        login.publish(protocol.topic(mallory, Channel.STATUS), Status(device=mallory, boot=1, online=True))
        wait_for(lambda: (d := fleet.device(mallory)) and d.hardware_class == "x86_64", 10, "mallory's hardware")
        fleet.fleetctl("deploy", "digits:1.0.0", "--to", "role=mallory", "--name", "m1", *DEPLOY)
        wait_for(lambda: login.messages, 20, "mallory's desired state", fleet.controller.log)
        sent = DesiredSet.from_json(open_envelope(login.messages[-1][1]).payload)
        claims = [
            Event(device=mallory, boot=1, seq=2, generation=sent.generation + 1, state=ExecutionState.SUCCEEDED,
                  deployment="m1", detail="a generation never sent"),
            Status(device=mallory, boot=10**6, online=False),
            Telemetry(device=mallory, boot=1, seq=3, kind=TelemetryKind.HEARTBEAT, heartbeat=Heartbeat(
                uptime_s=7.0, active=(), counters=counter_snapshot(), samples_pending=2**60)),
            Reported(device=mallory, boot=1, seq=4, models=(  # a success with nothing running to show for it
                ModelStatus(model="digits", generation=sent.generation, outcome=ExecutionState.SUCCEEDED),)),
        ]
        for claim in claims:
            channel = {Event: Channel.EVENTS, Status: Channel.STATUS, Telemetry: Channel.TELEMETRY,
                       Reported: Channel.REPORTED}[type(claim)]
            login.publish(protocol.topic(mallory, channel), claim)
        time.sleep(QUIET_S)
        with fleet.db.reading() as session:
            execution = session.scalars(sa.select(Execution).filter_by(device_id=mallory, rollout_id="m1")).one()
            assert execution.state is not ExecutionState.SUCCEEDED
        assert fleet.device(mallory).boot == 1  # (online may lapse: mallory sends no heartbeats)
        assert fleet.events(mallory) == 0 and 7.0 not in fleet.uptimes(mallory)
    finally:
        login.close()
        fleet.fleetctl("rollout", "abort", "m1", check=False)


def test_a_normal_update_still_succeeds(fleet):
    fleet.fleetctl("deploy", "digits:1.1.0", "--to", "role=victim", "--name", "v2", *DEPLOY)
    assert wait_rollout(fleet.fleetctl, "v2")["state"] == "SUCCEEDED", fleet.controller.log()
    assert fleet.victim.serving() == "1.1.0", fleet.victim.log()
