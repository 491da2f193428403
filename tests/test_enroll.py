"""Device enrollment and the device API (sample uploads), on SQLite and PostgreSQL."""
from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import httpx
import numpy as np
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.common.hardware import HardwareProfile
from edgefleet.controller.db.models import (
    AuditEntry,
    Device,
    EnrollmentToken,
    Sample,
    utcnow,
)
from edgefleet.controller.tokens import verify_mqtt_password
from tests.support.api_server import running_controller
from tests.test_data_export import npz_declaring

HARDWARE = HardwareProfile(arch="aarch64", cpu_count=4, memory_mb=4096,
                           device_model="Raspberry Pi 4 Model B Rev 1.4").to_dict()
SAMPLE_HEADERS = {"X-Edgefleet-Model": "digits", "X-Edgefleet-Version": "1.0.0", "X-Edgefleet-Variant": "cpu-int8"}


@pytest.fixture
def api(tmp_path, database_url):
    """A controller per test, on SQLite and on PostgreSQL."""
    with running_controller(tmp_path / "home", database_url, max_upload_bytes=64 * 1024) as running:
        yield running


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One SQLite-backed controller for tests that touch only their own device."""
    tmp = tmp_path_factory.mktemp("shared")
    with running_controller(tmp / "home", f"sqlite:///{tmp / 'c.db'}", max_upload_bytes=64 * 1024) as running:
        yield running


def public_key_pem() -> str:
    key = Ed25519PrivateKey.generate().public_key()
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def issue(api, device: str, **body) -> str:
    with api.client() as client:
        response = client.post(f"/v1/devices/{device}/enroll-token", json=body)
    assert response.status_code == 201, response.text
    return response.json()["token"]


def enroll(api, token: str, key: str | None = None) -> httpx.Response:
    body = {"token": token, "device_public_key": key or public_key_pem(), "hardware": HARDWARE}
    return httpx.post(f"{api.url}/v1/enroll", json=body)


def test_enrollment_returns_identity_credentials_and_trust(api):
    response = enroll(api, issue(api, "pi-1", labels={"site": "berlin"}))
    assert response.status_code == 200, response.text
    enrolled = response.json()
    assert enrolled["device_id"] == "pi-1"
    assert enrolled["device_token"].startswith("efd_")
    assert enrolled["metadata_url"] == f"{api.ctx.config.public_url}/repository/metadata/"
    assert enrolled["target_base_url"] == f"{api.ctx.config.public_url}/repository/targets/"
    assert json.loads(enrolled["trusted_root"])["signed"]["_type"] == "root"
    assert enrolled["trusted_root"].encode() == api.store.get_bytes("repository/metadata/root.json")
    mqtt = enrolled["mqtt"]
    assert (mqtt["url"], mqtt["username"]) == (api.ctx.config.effective_broker_url, "pi-1")

    with api.db.unit_of_work() as session:
        device = session.get(Device, "pi-1")
        assert device.token_hash and enrolled["device_token"] not in device.token_hash
        assert verify_mqtt_password(mqtt["password"], device.mqtt_password_hash)
        assert not verify_mqtt_password(mqtt["password"] + "x", device.mqtt_password_hash)
        assert device.hardware_class == "rpi-4" and device.labels == {"site": "berlin"}
        assert device.public_key.startswith("-----BEGIN PUBLIC KEY-----")
        actions = session.scalars(sa.select(AuditEntry.action).order_by(AuditEntry.id)).all()
    assert actions == ["device.enroll-token", "device.enroll"]
    with api.client() as client:
        assert client.get("/v1/devices/pi-1").json()["enrolled"] is True


def test_raw_base64_public_key_is_accepted(shared):
    raw = Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert enroll(shared, issue(shared, "raw-key"), key=base64.b64encode(raw).decode()).status_code == 200


def test_reused_token_is_409_and_keeps_the_first_enrollment(api):
    token = issue(api, "pi-1")
    first = enroll(api, token)
    assert first.status_code == 200
    again = enroll(api, token)
    assert again.status_code == 409
    assert "already used" in again.json()["error"]
    with api.db.unit_of_work() as session:
        assert session.get(Device, "pi-1").token_hash is not None
    upload = httpx.post(f"{api.url}/v1/devices/pi-1/samples", content=shard(),
                        headers={**SAMPLE_HEADERS, "Authorization": f"Bearer {first.json()['device_token']}"})
    assert upload.status_code == 201


def test_racing_enrollments_with_one_token_have_one_winner(api):
    token = issue(api, "pi-1")
    with ThreadPoolExecutor(4) as pool:
        codes = sorted(r.status_code for r in pool.map(lambda _: enroll(api, token), range(4)))
    assert codes == [200, 409, 409, 409]


def test_forged_token_is_401(api):
    issue(api, "pi-1")
    for token in ("efe_forged-token-that-was-never-issued", "x"):
        response = enroll(api, token)
        assert response.status_code == 401
        assert "not valid" in response.json()["error"]
    with api.db.unit_of_work() as session:
        assert session.get(Device, "pi-1").token_hash is None


def test_expired_token_is_401(shared):
    token = issue(shared, "expired")
    with shared.db.unit_of_work() as session:
        session.execute(sa.update(EnrollmentToken).where(EnrollmentToken.device_id == "expired")
                        .values(expires_at=utcnow() - timedelta(seconds=1)))
    response = enroll(shared, token)
    assert response.status_code == 401 and "expired" in response.json()["error"]


def test_token_of_a_removed_device_stops_working(shared):
    token = issue(shared, "removed")
    with shared.client() as client:
        assert client.delete("/v1/devices/removed").status_code == 204
    assert enroll(shared, token).status_code == 401


def test_bad_public_key_is_400(shared):
    response = enroll(shared, issue(shared, "bad-key"), key="bm90IGEga2V5")
    assert response.status_code == 400 and "device_public_key" in response.json()["error"]


# --- sample uploads (device token) -----------------------------------------------


def shard(rows: int = 4, **extra: Any) -> bytes:  # Any: savez_compressed(**extra) takes allow_pickle too
    buffer = io.BytesIO()
    np.savez_compressed(buffer, input=np.random.rand(rows, 8).astype(np.float32),
                        output=np.random.rand(rows, 10).astype(np.float32), **extra)
    return buffer.getvalue()


@pytest.fixture
def device(api):
    """(device id, device token) of an enrolled device."""
    enrolled = enroll(api, issue(api, "pi-1")).json()
    return enrolled["device_id"], enrolled["device_token"]


@pytest.fixture(scope="module")
def shared_device(shared):
    enrolled = enroll(shared, issue(shared, "uploader")).json()
    return enrolled["device_id"], enrolled["device_token"]


def upload(api, device_id: str, token: str | None, body: bytes, headers: dict | None = None) -> httpx.Response:
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(f"{api.url}/v1/devices/{device_id}/samples", content=body,
                      headers={**SAMPLE_HEADERS, **auth, **(headers or {})})


def test_sample_shard_is_stored_and_indexed(api, device):
    device_id, token = device
    body = shard(5, top1=np.array([0.9, 0.5, 0.7, 0.8, 0.6]), low_confidence=np.array([0, 1, 0, 0, 1], bool))
    response = upload(api, device_id, token, body)
    assert response.status_code == 201, response.text
    key = response.json()["key"]
    assert key.startswith("samples/digits/1.0.0/pi-1/") and key.endswith(".npz")
    assert api.store.get_bytes(key) == body
    with api.db.unit_of_work() as session:
        row = session.scalar(sa.select(Sample))
        assert (row.store_key, row.count, row.bytes, row.low_confidence, row.variant) == (
            key, 5, len(body), 2, "cpu-int8")
        assert row.top1_mean == pytest.approx(0.7)
        assert row.hardware_class == "rpi-4"


def test_sample_upload_needs_the_devices_own_token(api, device):
    device_id, token = device
    other = enroll(api, issue(api, "pi-2")).json()["device_token"]
    for who, bearer, status in ((device_id, None, 401), (device_id, "efd_forged", 401),
                                (device_id, other, 401), ("ghost", token, 404)):
        response = upload(api, who, bearer, shard())
        assert response.status_code == status, (who, bearer, response.text)
    assert api.store.list("samples") == []


@pytest.mark.parametrize("body, status, words", [
    (b"definitely not a zip", 400, "not a readable npz"),
    (shard(3, labels=np.array([1, 2], np.int64)), 400, "first axis"),
    (b"x" * (65 * 1024), 413, "larger than"),
    (npz_declaring((2**40,)), 400, "declares shape (1099511627776,)"),  # numpy would allocate 8 TiB first
    (npz_declaring((2**40, 0)), 400, "declares shape (1099511627776, 0)"),  # zero bytes, 2**40 rows
])
def test_bad_sample_shards_are_refused(shared, shared_device, body, status, words):
    device_id, token = shared_device
    response = upload(shared, device_id, token, body)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]
    assert shared.store.list("samples") == []


def test_pickled_arrays_are_refused(shared, shared_device):
    device_id, token = shared_device
    buffer = io.BytesIO()
    np.savez(buffer, rows=np.array([{"evil": 1}, None], dtype=object))
    response = upload(shared, device_id, token, buffer.getvalue())
    assert response.status_code == 400 and "not a readable npz" in response.json()["error"]


def test_zip_bomb_is_refused_before_decompressing(shared, shared_device):
    device_id, token = shared_device
    buffer = io.BytesIO()
    np.savez_compressed(buffer, zeros=np.zeros(1024 * 1024, np.uint8))  # 1 MiB in ~1 KiB
    response = upload(shared, device_id, token, buffer.getvalue())
    assert response.status_code == 400 and "expands" in response.json()["error"]


def test_bad_sample_headers_are_400(shared, shared_device):
    device_id, token = shared_device
    response = upload(shared, device_id, token, shard(), headers={"X-Edgefleet-Model": "../../etc"})
    assert response.status_code == 400 and "X-Edgefleet-Model" in response.json()["error"]
