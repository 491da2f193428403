"""Per-device identity: the fleet CA of `fleetctl init`, certificates for devices' CSRs over
the device API, and renewal before expiry that keeps a real agent connected to a real
Mosquitto (TLS, client certificates)."""
from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.enroll import enroll
from edgefleet.common.hardware import HardwareProfile
from edgefleet.common.identity import csr_pem
from edgefleet.controller.cli import main
from edgefleet.controller.pki import CA_CERT_FILE, CA_KEY_FILE, CONTROLLER_IDENTITY, FleetCA, ca_dir
from tests.support.api_server import running_controller
from tests.support.mosquitto import Identity, TlsClient, settings_printed, tls_fleet
from tests.support.mqtt import wait_until

LIFETIME_S = 3600
PROFILE = HardwareProfile(arch="x86_64", cpu_count=2)


def test_init_creates_the_fleet_ca_and_force_keeps_it(tmp_path):
    home = tmp_path / "home"
    runner = CliRunner()
    assert runner.invoke(main, ["init"], env={"EDGEFLEET_HOME": str(home)}).exit_code == 0
    key, cert = ca_dir(home) / CA_KEY_FILE, ca_dir(home) / CA_CERT_FILE
    assert key.stat().st_mode & 0o777 == 0o600 and ca_dir(home).stat().st_mode & 0o777 == 0o700
    ca = x509.load_pem_x509_certificate(cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    public = ca.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1"
    before = key.read_bytes()
    again = runner.invoke(main, ["init", "--force", "--yes"], env={"EDGEFLEET_HOME": str(home)})
    assert again.exit_code == 0, again.output
    assert key.read_bytes() == before and cert.read_bytes() == ca.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("identity")
    with running_controller(tmp / "home", f"sqlite:///{tmp / 'c.db'}", device_cert_lifetime_s=LIFETIME_S) as running:
        yield running


def enrolled(api, tmp_path, name: str) -> AgentConfig:
    """A device enrolled by the agent's own code: its config (the CSR went with it)."""
    with api.client() as client:
        token = client.post(f"/v1/devices/{name}/enroll-token", json={}).json()["token"]
    return enroll(api.url, token, tmp_path / name, PROFILE).config


def ask(api, device: str, token: str | None, csr: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(f"{api.url}/v1/devices/{device}/certificate", json={"csr": csr}, headers=headers)


def test_enrollment_makes_the_key_on_the_device_and_gets_a_client_certificate(api, tmp_path):
    config = enrolled(api, tmp_path, "id-1")
    identity = Identity.of_agent(tmp_path / "id-1")
    assert (config.mqtt_cert_file, config.mqtt_key_file, config.mqtt_ca_file) == (
        str(identity.cert), str(identity.key), str(identity.ca))
    assert identity.key.stat().st_mode & 0o777 == 0o600
    key = serialization.load_pem_private_key(identity.key.read_bytes(), password=None)
    certificate = x509.load_pem_x509_certificate(identity.cert.read_bytes())
    assert certificate.public_key() == key.public_key()  # the CSR's key: it never left the device
    certificate.verify_directly_issued_by(FleetCA.load(api.ctx.config.home).certificate)
    assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "id-1"
    usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    lifetime = certificate.not_valid_after_utc - datetime.now(UTC)
    assert LIFETIME_S - 60 < lifetime.total_seconds() <= LIFETIME_S


def _tampered(csr: str) -> str:
    der = bytearray(x509.load_pem_x509_csr(csr.encode()).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # inside the signature
    body = x509.load_der_x509_csr(bytes(der))
    return body.public_bytes(serialization.Encoding.PEM).decode()


def test_the_controller_checks_every_csr(api, tmp_path):
    config = enrolled(api, tmp_path, "id-2")
    other = enrolled(api, tmp_path, "id-3")
    key = ec.generate_private_key(ec.SECP256R1())
    good = csr_pem(key, "id-2")
    assert ask(api, "id-2", config.device_token, good).status_code == 200
    refused = {
        "names another device": (ask(api, "id-2", config.device_token, csr_pem(key, "id-3")), 400, "not this device"),
        "names the controller": (ask(api, "id-2", config.device_token, csr_pem(key, CONTROLLER_IDENTITY)), 400,
                                 "not this device"),
        "P-384 key": (ask(api, "id-2", config.device_token, _csr(ec.generate_private_key(ec.SECP384R1()), "id-2")),
                      400, "P-256"),
        "RSA key": (ask(api, "id-2", config.device_token,
                        _csr(rsa.generate_private_key(public_exponent=65537, key_size=2048), "id-2")), 400, "P-256"),
        "bad signature": (ask(api, "id-2", config.device_token, _tampered(good)), 400, "signature"),
        "not a CSR": (ask(api, "id-2", config.device_token, "hello"), 400, "not a PEM"),
        "another device's token": (ask(api, "id-2", other.device_token, good), 401, "not valid"),
        "no token": (ask(api, "id-2", None, good), 401, "missing bearer"),
    }
    for case, (response, status, words) in refused.items():
        assert response.status_code == status, (case, response.text)
        assert words in response.json()["error"], (case, response.text)


def _csr(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, name: str) -> str:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    request = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return request.public_bytes(serialization.Encoding.PEM).decode()


@pytest.mark.slow
def test_renewal_before_expiry_keeps_the_device_connected(tmp_path):
    """Certificates live 12 s: the agent renews at 8 s and reconnects with the new one, again
    and again; it never goes offline, and the first certificate is refused once expired."""
    lifetime = 12
    with tls_fleet(tmp_path, ("dev-r",), device_cert_lifetime_s=lifetime) as fleet:
        identity = fleet.identity("dev-r")
        first = identity.cert.read_bytes()
        (tmp_path / "first.pem").write_bytes(first)
        serials: set[int] = set()
        online: list[bool] = []
        deadline = time.monotonic() + 3 * lifetime
        while time.monotonic() < deadline:
            serials.add(x509.load_pem_x509_certificate(identity.cert.read_bytes()).serial_number)
            online.append(fleet.device("dev-r")["online"])
            time.sleep(0.5)
        assert len(serials) >= 3, "the certificate was not renewed twice in three lifetimes"
        assert all(online), "the device went offline during a renewal"
        seen = fleet.device("dev-r")["last_seen"]
        assert wait_until(lambda: fleet.device("dev-r")["last_seen"] != seen, 10), "heartbeats stopped"
        log = fleet.broker_log.read_text()
        assert log.count("as dev-r (p5") >= 3, "the agent did not reconnect with its renewed certificates"
        assert fleet.agents["dev-r"].log().count("MQTT client certificate renewed") >= 2
        refusals = fleet.broker_log.read_text().count("certificate verify failed")
        expired = TlsClient(fleet.port, Identity(tmp_path / "first.pem", identity.key, identity.ca), "dev-r")
        expired.connect()
        assert not expired.connected
        assert fleet.broker_log.read_text().count("certificate verify failed") == refusals + 1
        assert fleet.device("dev-r")["online"]


def test_broker_config_admits_the_enrolled_devices_with_their_own_topics_only(api, tmp_path):
    enrolled(api, tmp_path, "id-4")
    with api.client() as client:  # a token, not yet enrolled: not admitted
        assert client.post("/v1/devices/id-5/enroll-token", json={}).status_code == 201
    out = tmp_path / "broker"
    env = {"EDGEFLEET_HOME": str(api.ctx.config.home), "EDGEFLEET_DATABASE_URL": api.ctx.config.effective_database_url}
    result = CliRunner().invoke(main, ["broker", "config", "mosquitto", "-o", str(out), "--host", "broker.lan",
                                       "--host", "10.0.0.5", "--port", "8884", "--replica", "r2"], env=env)
    assert result.exit_code == 0, result.output
    settings = settings_printed(result.output)
    assert settings["broker_url"] == "mqtts://broker.lan:8884" and settings["broker_admin"] == "mosquitto"
    conf = (out / "mosquitto.conf").read_text().splitlines()
    for line in ("require_certificate true", "use_identity_as_username true", "use_username_as_clientid true",
                 "allow_anonymous false", "max_queued_messages 0", "listener 8884 0.0.0.0"):
        assert line in conf
    assert (out / "server-key.pem").stat().st_mode & 0o777 == 0o600
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(n.value) for n in names] == ["broker.lan", "10.0.0.5"]
    dynsec = json.loads((out / "dynamic-security.json").read_text())
    clients = {c["username"]: c for c in dynsec["clients"]}
    assert {"id-4", CONTROLLER_IDENTITY} <= set(clients) and "id-5" not in clients
    roles = {r["rolename"]: r["acls"] for r in dynsec["roles"]}
    own = {(a["acltype"], a["topic"]) for a in roles[clients["id-4"]["roles"][0]["rolename"]]}
    assert own == {("publishClientSend", f"edgefleet/v1/id-4/{c}") for c in ("reported", "events", "telemetry", "status")} \
        | {("subscribeLiteral", "edgefleet/v1/id-4/desired"), ("publishClientReceive", "edgefleet/v1/id-4/desired")}
    assert dynsec["defaultACLAccess"] == {"publishClientSend": False, "publishClientReceive": False,
                                          "subscribe": False, "unsubscribe": True}
    controller = x509.load_pem_x509_certificate(Path(settings["mqtt_cert_file"]).read_bytes())
    assert controller.subject.rfc4514_string() == f"CN={CONTROLLER_IDENTITY}"
    assert Path(settings["mqtt_key_file"]).stat().st_mode & 0o777 == 0o600
    # a further replica: an identity of its own, with the controller's role, its files beside the first's
    replica_identity = f"{CONTROLLER_IDENTITY}:r2"
    assert clients[replica_identity]["roles"] == clients[CONTROLLER_IDENTITY]["roles"]
    replica_cert = Path(settings["mqtt_cert_file"]).parent / "r2" / "controller.pem"
    assert f"EDGEFLEET_MQTT_CERT_FILE={replica_cert}" in result.output
    replica = x509.load_pem_x509_certificate(replica_cert.read_bytes())
    assert replica.subject.rfc4514_string() == f"CN={replica_identity}"
    refused = CliRunner().invoke(main, ["broker", "config", "mosquitto", "-o", str(tmp_path / "b2"),
                                        "--replica", "no/slash"], env=env)
    assert refused.exit_code == 1 and "replica name 'no/slash' must be" in refused.output
    assert not (tmp_path / "b2").exists()
