"""`fleetctl controller run` as a real process: with no configuration (embedded broker,
SQLite, local store) and with Mosquitto, PostgreSQL and an S3 server (moto)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import paho.mqtt.client as paho
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.common.hardware import HardwareProfile
from edgefleet.common.protocol import Channel, ModelRef, ModelStatus, Reported, Status, topic
from edgefleet.controller.cli import main
from edgefleet.controller.config import EMBEDDED_BROKER_HOST, EMBEDDED_BROKER_PORT
from edgefleet.controller.db.session import Database
from tests.conftest import free_port, reachable
from tests.test_store_s3 import make_bucket, s3_endpoint  # noqa: F401  (module-scoped moto server fixture)

FLEETCTL = [sys.executable, "-c", "from edgefleet.controller.cli import main; main()"]
START_TIMEOUT_S = 40.0
STOP_TIMEOUT_S = 20.0


class Controller:
    def __init__(self, home: Path, port: int, log: Path):
        self.home, self.url, self.log = home, f"http://127.0.0.1:{port}", log
        self.process: subprocess.Popen | None = None
        self.extra_env: dict[str, str] = {}

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "EDGEFLEET_HOME": str(self.home), **self.extra_env}

    def fleetctl(self, *args: str) -> str:
        done = subprocess.run([*FLEETCTL, *args], env=self.env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"fleetctl {' '.join(args)}: {done.stderr}"
        return done.stdout

    def start(self) -> None:
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([*FLEETCTL, "controller", "run"], env=self.env,
                                            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"controller exited:\n{self.tail()}"
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        pytest.fail(f"controller did not answer within {START_TIMEOUT_S}s:\n{self.tail()}")

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"controller ignored SIGTERM:\n{self.tail()}")

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])

    def api(self) -> httpx.Client:
        token = (self.home / "operator-token").read_text().strip()
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)


@pytest.fixture
def controller(tmp_path) -> Iterator[Controller]:
    port = free_port()
    running = Controller(tmp_path / "home", port, tmp_path / "controller.log")
    yield running
    if running.process is not None and running.process.poll() is None:
        running.process.kill()
        running.process.wait()


def write_config(home: Path, **settings: object) -> None:
    home.mkdir(parents=True, exist_ok=True)
    lines = []
    for key, value in settings.items():
        if isinstance(value, dict):
            continue
        lines.append(f"{key} = {json.dumps(value)}")
    for key, value in settings.items():
        if isinstance(value, dict):
            lines.append(f"[{key}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in value.items()]
    (home / "config.toml").write_text("\n".join(lines) + "\n")


def enroll_device(controller: Controller, name: str) -> dict:
    issued = json.loads(controller.fleetctl("devices", "enroll", name, "--label", "site=lab", "--format", "json"))
    public = Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    hardware = HardwareProfile(arch="x86_64", cpu_count=2).to_dict()
    response = httpx.post(f"{controller.url}/v1/enroll",
                          json={"token": issued["token"], "device_public_key": public, "hardware": hardware})
    assert response.status_code == 200, response.text
    return response.json()


def mqtt_session(url: str, username: str | None, password: str | None) -> paho.Client | None:
    """A connected client, or None when the broker refused the login."""
    host, _, port = url.removeprefix("mqtt://").partition(":")
    # A device's client id is its device id (the embedded broker insists).
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=username or f"anonymous-{time.monotonic_ns()}")
    if username:
        client.username_pw_set(username, password)
    answered, accepted = threading.Event(), []

    def on_connect(_client, _userdata, _flags, reason_code, _properties) -> None:
        accepted.append(not reason_code.is_failure)
        answered.set()

    client.on_connect = on_connect
    client.connect(host, int(port))
    client.loop_start()
    if not answered.wait(10) or not accepted[0]:
        client.loop_stop()
        client.disconnect()
        return None
    return client


def report_online(client: paho.Client, device: str) -> None:
    messages = [
        (Channel.STATUS, Status(device=device, boot=1, online=True)),
        (Channel.REPORTED, Reported(device=device, boot=1, seq=1, models=(
            ModelStatus(model="digits", generation=0, memory_kb=20480,
                        active=ModelRef(model="digits", version="1.0.0", variant="cpu-fp32")),
            ModelStatus(model="ocr-cls", generation=0, active=ModelRef(model="ocr-cls", version="2", variant="cpu-int8")),
        ))),
    ]
    for channel, message in messages:
        client.publish(topic(device, channel), message.to_json(), qos=1, retain=True).wait_for_publish(10)


def wait_for_device(controller: Controller, device: str) -> dict:
    deadline = time.monotonic() + 20
    with controller.api() as api:
        while time.monotonic() < deadline:
            shown = api.get(f"/v1/devices/{device}").json()
            if shown["online"] and shown["active"]:
                return shown
            time.sleep(0.2)
    pytest.fail(f"device {device} never showed up online through the bridge:\n{controller.tail()}")


def check_round_trip(controller: Controller, device: str) -> None:
    """Enroll over the API, report over MQTT with the issued credentials, read back over the API."""
    enrolled = enroll_device(controller, device)
    mqtt = enrolled["mqtt"]
    client = mqtt_session(mqtt["url"], mqtt["username"], mqtt["password"])
    assert client is not None, f"broker refused the enrolled device's login:\n{controller.tail()}"
    try:
        report_online(client, device)
        shown = wait_for_device(controller, device)
    finally:
        client.publish(topic(device, Channel.STATUS), b"", qos=1, retain=True).wait_for_publish(10)
        client.publish(topic(device, Channel.REPORTED), b"", qos=1, retain=True).wait_for_publish(10)
        client.loop_stop()
        client.disconnect()
    assert shown["active"] == [
        {"model": "digits", "version": "1.0.0", "variant": "cpu-fp32", "release": 0, "memory_kb": 20480},
        {"model": "ocr-cls", "version": "2", "variant": "cpu-int8", "release": 0, "memory_kb": None}]
    assert shown["labels"] == {"site": "lab"}
    with controller.api() as api:
        assert [d["id"] for d in api.get("/v1/devices").json()] == [device]


def test_runs_with_no_configuration(controller):
    if reachable(EMBEDDED_BROKER_HOST, EMBEDDED_BROKER_PORT):
        pytest.fail(f"port {EMBEDDED_BROKER_PORT} (the embedded broker's) is taken; stop what listens there")
    port = int(controller.url.rsplit(":", 1)[1])
    # Only the API port moves off the default, so that tests never collide with a running controller.
    write_config(controller.home, api_port=port, public_url=controller.url)
    controller.fleetctl("init")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:  # what systemd would listen on
        notify.bind(str(controller.home / "notify.sock"))
        notify.settimeout(10)
        controller.extra_env = {"NOTIFY_SOCKET": str(controller.home / "notify.sock"), "WATCHDOG_USEC": "200000"}
        controller.start()
        assert notify.recv(4096).startswith(b"READY=1")
        assert notify.recv(4096) == b"WATCHDOG=1"
    assert (controller.home / "controller.db").exists()
    assert (controller.home / "store" / "repository" / "metadata" / "root.json").exists()

    check_round_trip(controller, "pi-embedded")
    broker = f"mqtt://{EMBEDDED_BROKER_HOST}:{EMBEDDED_BROKER_PORT}"
    assert mqtt_session(broker, None, None) is None, "the embedded broker let an anonymous client in"
    assert mqtt_session(broker, "pi-embedded", "wrong-password") is None

    with controller.api() as api:
        assert [a["action"] for a in api.get("/v1/audit").json()] == ["device.enroll", "device.enroll-token"]
    assert controller.stop() == 0
    assert "did not stop cleanly" not in controller.tail()
    assert not reachable(EMBEDDED_BROKER_HOST, EMBEDDED_BROKER_PORT), "embedded broker still listening after stop"


def test_runs_with_mosquitto_postgresql_and_s3(controller, mosquitto_url, postgres_url, s3_endpoint):
    bucket = make_bucket(s3_endpoint)
    port = int(controller.url.rsplit(":", 1)[1])
    write_config(controller.home, api_port=port, public_url=controller.url, database_url=postgres_url,
                 broker_url=mosquitto_url,
                 store={"kind": "s3", "bucket": bucket, "prefix": "fleet", "endpoint_url": s3_endpoint})
    controller.fleetctl("init")
    assert not (controller.home / "store").exists(), "init wrote the repository to the local store"
    controller.start()

    root = httpx.get(f"{controller.url}/repository/metadata/root.json")
    assert root.status_code == 307 and root.headers["location"].startswith(f"{s3_endpoint}/{bucket}/fleet/")
    fetched = httpx.get(f"{controller.url}/repository/metadata/root.json", follow_redirects=True)
    assert fetched.status_code == 200 and fetched.json()["signed"]["_type"] == "root"
    assert httpx.get(f"{controller.url}/repository/metadata/nope.json").status_code == 404

    check_round_trip(controller, "pi-external")
    assert controller.stop() == 0


def test_refuses_an_out_of_date_schema(tmp_path):
    env = {"EDGEFLEET_HOME": str(tmp_path / "home")}
    runner = CliRunner()
    for args in (["init"], ["db", "downgrade", "base", "--yes"]):
        assert runner.invoke(main, args, env=env).exit_code == 0
    result = runner.invoke(main, ["controller", "run"], env=env)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"error: database schema is at nothing (empty database), code needs {Database('sqlite://').head_revision()}: "
        "run `fleetctl db upgrade`"]
