"""``fleet-agent enroll``: trade a one-time token for this device's identity.

Generates the device's ed25519 key pair, POSTs ``/v1/enroll`` with the public
half and the hardware profile, then writes the agent config and trusts the
returned TUF root. Every file is written atomically, the key and config 0600.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.common.errors import ProtocolError
from edgefleet.common.fs import atomic_write
from edgefleet.common.hardware import HardwareProfile
from edgefleet.common.protocol import check_device_id

from .config import AgentConfig
from .errors import RemoteError, TransportError
from .fetch import trust_root

CONFIG_FILE = "agent.toml"
KEY_FILE = "device-key.pem"
MAX_RESPONSE_BYTES = 1024 * 1024
TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Enrollment:
    config: AgentConfig
    config_path: Path


def device_key(state_dir: Path) -> Ed25519PrivateKey:
    """The device's key pair, generated once and kept (re-enrolling reuses it)."""
    path = state_dir / KEY_FILE
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise RemoteError(f"{path} is not an ed25519 key; move it away and enroll again")
        return key
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    atomic_write(path, pem)
    return key


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(  # noqa: S310 - the operator's --controller URL
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:  # noqa: S310 - as above
            data = response.read(MAX_RESPONSE_BYTES + 1)
    except urllib.error.HTTPError as e:
        raise RemoteError(f"enrollment refused (HTTP {e.code}): {_detail(e)}") from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise TransportError(f"cannot reach the controller at {url}: {reason}; check --controller") from e
    if len(data) > MAX_RESPONSE_BYTES:
        raise RemoteError(f"enrollment answer from {url} is larger than {MAX_RESPONSE_BYTES} bytes")
    try:
        answer = json.loads(data)
    except ValueError as e:
        raise RemoteError(f"enrollment answer from {url} is not JSON") from e
    if not isinstance(answer, dict):
        raise RemoteError(f"enrollment answer from {url} is not a JSON object")
    return answer


def _detail(e: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(e.read(64 * 1024))
        # the API answers {"error": ...}; FastAPI's own validation errors use "detail"
        detail = (body.get("error") or body.get("detail") or body) if isinstance(body, dict) else body
    except (ValueError, OSError):
        detail = e.reason
    return str(detail).splitlines()[0][:300] if str(detail) else str(e.reason)


def enroll(controller_url: str, token: str, state_dir: Path, profile: HardwareProfile) -> Enrollment:
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    key = device_key(state_dir)
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    controller_url = controller_url.rstrip("/")
    answer = _post(
        f"{controller_url}/v1/enroll",
        {"token": token, "device_public_key": public.decode(), "hardware": profile.to_dict()},
    )
    try:
        mqtt = answer["mqtt"]
        config = AgentConfig(
            device_id=check_device_id(answer["device_id"]),
            state_dir=state_dir,
            controller_url=controller_url,
            broker_url=str(mqtt["url"]),
            mqtt_username=str(mqtt["username"]),
            mqtt_password=str(mqtt["password"]),
            device_token=str(answer["device_token"]),
            metadata_url=str(answer["metadata_url"]),
            target_base_url=str(answer["target_base_url"]),
        )
        root = str(answer["trusted_root"]).encode()
    except ProtocolError as e:
        raise RemoteError(f"enrollment answer: {e}") from None
    except (KeyError, TypeError) as e:
        raise RemoteError(f"enrollment answer lacks {e}; is {controller_url} an edgefleet controller?") from None
    trust_root(state_dir / "tuf", root)
    path = state_dir / CONFIG_FILE
    atomic_write(path, config.to_toml().encode())
    return Enrollment(config, path)
