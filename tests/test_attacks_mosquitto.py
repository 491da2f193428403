"""Attacks on the production path: a real Mosquitto started from `fleetctl broker config
mosquitto` (TLS, client certificates from the fleet CA, dynamic security), a real
`fleetctl controller run` and real `fleet-agent` processes enrolled with a CSR.

The attacker holds one enrolled device's certificate and key (dev-a's); every case asserts
that the broker refused it, that nothing reached the other device or the controller, and
that the fleet keeps working (an update succeeds, devices stay online).
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterator

import paho.mqtt.client as paho
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.enums import CallbackAPIVersion

from demo.scenario import Controller, Fleetctl, ScenarioError, wait_rollout
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.enroll import enroll
from edgefleet.agent.errors import RemoteError
from edgefleet.agent.identity import IdentityFiles, request_certificate
from edgefleet.common.hardware import HardwareProfile
from edgefleet.common.identity import private_pem
from edgefleet.common.protocol import (
    Channel,
    Desired,
    DesiredSet,
    Event,
    ExecutionState,
    Status,
    Telemetry,
    TelemetryKind,
    topic,
)
from edgefleet.controller.errors import ControllerError
from edgefleet.controller.pki import CONTROLLER_IDENTITY, FleetCA
from tests.conftest import free_port
from tests.support.messages import heartbeat
from tests.support.mosquitto import REPLICA, Identity, TlsFleet, tls_fleet
from tests.support.mqtt import wait_until

pytestmark = pytest.mark.slow

NOT_AUTHORIZED = "Not authorized"
ROLLOUT = ["--stages", "100%", "--min-devices-per-stage", "1", "--device-timeout", "2m",
           "--max-p99-regression", "1000%", "--bake", "0s"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, digits) -> Iterator[TlsFleet]:
    tmp = tmp_path_factory.mktemp("tls-fleet")
    fleetctl = Fleetctl(tmp / "home")
    bundle = tmp / "digits-1.0.0"
    with tls_fleet(tmp, ("dev-a", "dev-b"), before_start=lambda: (
        fleetctl("bundle", "build", str(digits.model), "--name", "digits", "--version", "1.0.0",
                 "--variant", "cpu-fp32", "--eval", str(digits.eval_data), "-o", str(bundle)),
        fleetctl("bundle", "publish", str(bundle)),
    )) as running:
        yield running


def test_enrollment_with_a_csr_gives_a_certificate_the_broker_takes(fleet):
    ca = FleetCA.load(fleet.home)
    identity = fleet.identity("dev-b")
    assert identity.key is not None and identity.key.stat().st_mode & 0o777 == 0o600
    certificate = x509.load_pem_x509_certificate(identity.cert.read_bytes())
    certificate.verify_directly_issued_by(ca.certificate)
    assert certificate.subject.rfc4514_string() == "CN=dev-b"
    log = fleet.broker_log.read_text()
    assert "as dev-a (p5" in log and "u'dev-a'" in log and "u'dev-b'" in log  # identity = username = client id


def test_an_update_reaches_the_devices_over_tls_and_succeeds(fleet):
    fleet.fleetctl("deploy", "digits:1.0.0", "--to", "fleet=tls", "--name", "tls-1", *ROLLOUT)
    status = wait_rollout(fleet.fleetctl, "tls-1", timeout=180)
    assert status["state"] == "SUCCEEDED", status
    def serving_everywhere() -> bool:
        return all(agent.serving() == "1.0.0" for agent in fleet.agents.values())

    assert wait_until(serving_everywhere, 30), [agent.log() for agent in fleet.agents.values()]


def test_one_devices_certificate_reads_nothing_of_others(fleet):
    attacker = fleet.client(fleet.identity("dev-a"))
    try:
        assert attacker.connected
        assert attacker.subscribe("#", "edgefleet/v1/#", "edgefleet/v1/+/desired", "edgefleet/v1/dev-b/desired",
                                  "edgefleet/v1/dev-b/telemetry", "$SYS/#") == [NOT_AUTHORIZED] * 6
        assert attacker.subscribe("edgefleet/v1/dev-a/desired") == ["Granted QoS 1"]  # its own: allowed
        # dev-b keeps sending heartbeats (every 2 s) and has a retained desired state and status
        seen_before = fleet.device("dev-b")["last_seen"]
        assert wait_until(lambda: fleet.device("dev-b")["last_seen"] != seen_before, 15)
        assert all(t.startswith("edgefleet/v1/dev-a/") for t, _ in attacker.messages), attacker.messages
    finally:
        attacker.close()


def _evil(device: str) -> bytes:
    """A desired set no director signed, of an install no rollout made."""
    entry = Desired(device=device, generation=10**12, deployment="evil", model="digits", version="6.6.6",
                    variant="cpu-fp32", target="digits/6.6.6/cpu-fp32.onnx")
    return DesiredSet(device=device, generation=10**12, models=(entry,)).to_json()


def _forgeries(boot: int) -> dict[Channel, tuple[bytes, bool]]:
    now = time.time()
    return {
        Channel.DESIRED: (_evil("dev-b"), True),
        Channel.EVENTS: (Event(device="dev-b", boot=boot, seq=10**6, generation=10**12, state=ExecutionState.SUCCEEDED,
                               deployment="evil", ts=now).to_json(), False),
        Channel.STATUS: (Status(device="dev-b", boot=boot + 1000, online=False, ts=now).to_json(), True),
        Channel.TELEMETRY: (Telemetry(device="dev-b", boot=boot + 1000, seq=1, kind=TelemetryKind.HEARTBEAT,
                                      heartbeat=heartbeat(), ts=now).to_json(), False),
    }


def test_publishing_as_another_device_is_refused_and_nothing_is_ingested(fleet):
    before = fleet.device("dev-b")
    attacker = fleet.client(fleet.identity("dev-a"))
    try:
        for channel, (payload, retain) in _forgeries(before["boot"]).items():
            assert attacker.publish(topic("dev-b", channel), payload, retain) == NOT_AUTHORIZED, channel
        # and on its own desired topic: the controller's channel
        own = _evil("dev-a")
        assert attacker.publish(topic("dev-a", Channel.DESIRED), own, retain=True) == NOT_AUTHORIZED
    finally:
        attacker.close()
    time.sleep(3)  # dev-b's next heartbeats arrive meanwhile
    after = fleet.device("dev-b")
    assert after["online"] and after["boot"] == before["boot"]
    assert not [e for e in fleet.events("dev-b") if e["deployment"] == "evil" or e["generation"] >= 10**12]
    assert "evil" not in str(after["desired"])
    assert "evil" not in fleet.agents["dev-b"].log() and "evil" not in fleet.agents["dev-a"].log()


@pytest.mark.parametrize("client_id", ["dev-b", CONTROLLER_IDENTITY, f"{CONTROLLER_IDENTITY}:{REPLICA}",
                                       "edgefleet-controller"])
def test_another_client_id_is_replaced_by_the_certificates_own(fleet, client_id):
    """use_username_as_clientid: the broker names the session after the certificate, so no one
    can take over (and kick off) another device's or the controller's session."""
    seen_before = fleet.device("dev-b")["last_seen"]
    attacker = fleet.client(fleet.identity("dev-a"), client_id=client_id)
    try:
        assert attacker.connected
        assert attacker.subscribe("edgefleet/v1/+/events") == [NOT_AUTHORIZED]
    finally:
        attacker.close()
    log = fleet.broker_log.read_text()
    assert f"Client {client_id} already connected" not in log
    # the controller still ingests (dev-b's heartbeats move last_seen) and dev-b is still online
    assert wait_until(lambda: fleet.device("dev-b")["last_seen"] != seen_before, 15)
    assert fleet.device("dev-b")["online"]


def test_a_second_replica_has_its_own_identity_and_neither_closes_the_others_session(fleet):
    """Replicas share the fleet's share group; with one certificate between them, the broker
    (client id = certificate name) would close one's session whenever the other connects."""
    folder = fleet.home / "mqtt" / REPLICA
    port = free_port()
    replica = Controller(fleet.home, f"http://127.0.0.1:{port}", name=f"replica-{REPLICA}", env={
        "EDGEFLEET_API_PORT": str(port),
        "EDGEFLEET_MQTT_CERT_FILE": str(folder / "controller.pem"),
        "EDGEFLEET_MQTT_KEY_FILE": str(folder / "controller-key.pem"),
    })
    identity = f"{CONTROLLER_IDENTITY}:{REPLICA}"
    try:
        replica.start()
        assert wait_until(lambda: f"as {identity} (p5" in fleet.broker_log.read_text(), 15), replica.log()
        seen = [fleet.device("dev-b")["last_seen"]]
        for _ in range(2):  # heartbeats keep arriving through the shared subscription, both replicas connected
            assert wait_until(lambda: fleet.device("dev-b")["last_seen"] != seen[-1], 15)
            seen.append(fleet.device("dev-b")["last_seen"])
    finally:
        replica.stop()
        # Retired for good: end its session, or the broker keeps queueing its share of the
        # group's messages for it (a clean start with no session expiry replaces the session).
        fleet.client(Identity(folder / "controller.pem", folder / "controller-key.pem", fleet.identity("dev-a").ca),
                     client_id=identity).close()
    log = fleet.broker_log.read_text()
    assert f"Client {CONTROLLER_IDENTITY} already connected" not in log
    assert f"Client {identity} already connected" not in log
    seen_before = fleet.device("dev-b")["last_seen"]  # the first replica alone still ingests
    assert wait_until(lambda: fleet.device("dev-b")["last_seen"] != seen_before, 15)


def test_joining_the_controllers_share_group_is_refused(fleet):
    attacker = fleet.client(fleet.identity("dev-a"))
    try:
        shared = [f"$share/{fleet.share_group}/edgefleet/v1/+/{c}" for c in ("events", "telemetry", "reported")]
        assert attacker.subscribe(*shared, "$share/other/edgefleet/v1/dev-a/desired") == [NOT_AUTHORIZED] * 4
        seen_before = fleet.device("dev-b")["last_seen"]
        assert wait_until(lambda: fleet.device("dev-b")["last_seen"] != seen_before, 15)
        assert attacker.messages == []
    finally:
        attacker.close()


def test_no_certificate_another_ca_and_plain_mqtt_are_refused(fleet, tmp_path):
    ca = fleet.identity("dev-a").ca
    no_certificate = fleet.client(Identity(None, None, ca))
    assert not no_certificate.connected
    # a certificate for "dev-b" from a CA of the attacker's own
    other = FleetCA.ensure(tmp_path / "other", name="attacker CA")
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "k.pem").write_bytes(private_pem(key))
    (tmp_path / "c.pem").write_text(other.issue(key.public_key(), "dev-b", 3600).pem)
    forged = fleet.client(Identity(tmp_path / "c.pem", tmp_path / "k.pem", ca), client_id="dev-b")
    assert not forged.connected
    log = fleet.broker_log.read_text()
    assert "peer did not return a certificate" in log and "certificate verify failed" in log
    anonymous = paho.Client(CallbackAPIVersion.VERSION2, client_id="anonymous")
    answers: list[str] = []
    anonymous.on_connect = lambda _c, _u, _f, reason, _p: answers.append(str(reason))
    try:
        anonymous.connect("127.0.0.1", fleet.port)
        anonymous.loop_start()
        time.sleep(2)
    except OSError:
        pass
    finally:
        anonymous.loop_stop()
    assert answers == []  # plain MQTT on the TLS port never gets a CONNACK
    assert fleet.device("dev-b")["online"]


def test_removing_a_device_closes_its_session_at_once_and_refuses_it(fleet, tmp_path):
    """dev-c (enrolled with a CSR, certificate valid for 30 days) is connected when it is removed."""
    token = fleet.fleetctl.json("devices", "enroll", "dev-c")["token"]
    enroll(fleet.controller.url, token, tmp_path / "dev-c", HardwareProfile(arch="x86_64", cpu_count=1))
    identity = Identity.of_agent(tmp_path / "dev-c")
    device = fleet.client(identity, client_id="dev-c")
    try:
        assert device.connected
        assert device.subscribe("edgefleet/v1/dev-c/desired") == ["Granted QoS 1"]
        assert device.publish(topic("dev-c", Channel.STATUS),
                              Status(device="dev-c", boot=1, online=True, ts=time.time()).to_json(), True) == "Success"
        assert wait_until(lambda: fleet.device("dev-c")["online"], 10)
        fleet.fleetctl("devices", "remove", "dev-c", "--yes")
        assert wait_until(lambda: device.disconnects, 5), "the removed device's session stayed open"
        assert device.disconnects == ["Administrative action"]  # closed by the revocation, not a timeout
    finally:
        device.close()
    again = fleet.client(identity, client_id="dev-c")
    try:
        # Mosquitto 2.0.11 admits a CA-signed certificate at the TLS layer; with no dynsec client
        # left, everything it asks for is denied
        assert again.subscribe("edgefleet/v1/dev-c/desired") == [NOT_AUTHORIZED]
        assert again.publish(topic("dev-c", Channel.STATUS),
                             Status(device="dev-c", boot=2, online=True, ts=time.time()).to_json(), True) \
            == NOT_AUTHORIZED
    finally:
        again.close()
    with pytest.raises(ControllerError, match="unknown"):
        fleet.api.get("/v1/devices/dev-c")
    config = AgentConfig.load(tmp_path / "dev-c" / "agent.toml")  # nor can it renew its certificate
    with pytest.raises(RemoteError, match="HTTP 404"):
        request_certificate(fleet.controller.url, "dev-c", config.device_token, IdentityFiles.under(tmp_path / "dev-c"))
    dynsec = json.loads((fleet.home.parent / "broker" / "dynamic-security.json").read_text())
    assert "dev-c" not in {c["username"] for c in dynsec["clients"]}
    # its certificate is still valid: re-admitting the id would let it back in, so the id waits
    with pytest.raises(ScenarioError, match="device id 'dev-c' was removed and a certificate issued to it is valid"):
        fleet.fleetctl("devices", "enroll", "dev-c")
    with pytest.raises(ControllerError, match="unknown"):
        fleet.api.get("/v1/devices/dev-c")
    assert {"dev-a", "dev-b"} <= {c["username"] for c in dynsec["clients"]}
