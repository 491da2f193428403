"""``fleet-agent enroll``: trade a one-time token for this device's identity.

Generates the device's ed25519 key pair, POSTs ``/v1/enroll`` with the public
half and the hardware profile, then writes the agent config, trusts the
returned TUF root, and asks (device token, CSR) for the MQTT client certificate
of a key it makes for that (see ``identity``). Every file is written atomically,
the keys and config 0600.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.common.errors import ProtocolError
from edgefleet.common.fs import atomic_write
from edgefleet.common.hardware import HardwareProfile
from edgefleet.common.protocol import check_device_id

from .api import post_json
from .config import AgentConfig
from .errors import AgentError, RemoteError
from .fetch import trust_root
from .identity import IdentityFiles, request_certificate

CONFIG_FILE = "agent.toml"
KEY_FILE = "device-key.pem"


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


def enroll(controller_url: str, token: str, state_dir: Path, profile: HardwareProfile) -> Enrollment:
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    key = device_key(state_dir)
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    controller_url = controller_url.rstrip("/")
    answer = post_json(
        f"{controller_url}/v1/enroll",
        {"token": token, "device_public_key": public.decode(), "hardware": profile.to_dict()},
        "enrollment",
    )
    files = IdentityFiles.under(state_dir)
    try:
        mqtt = answer["mqtt"]
        config = AgentConfig(
            device_id=check_device_id(answer["device_id"]),
            state_dir=state_dir,
            controller_url=controller_url,
            broker_url=str(mqtt["url"]),
            mqtt_username=str(mqtt["username"]),
            mqtt_password=str(mqtt["password"]),
            mqtt_ca_file=str(files.ca),
            mqtt_cert_file=str(files.certificate),
            mqtt_key_file=str(files.key),
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
    try:
        request_certificate(controller_url, config.device_id, config.device_token, files)
    except AgentError as e:
        raise type(e)(f"enrolled as {config.device_id} ({path} written) but got no MQTT certificate: {e}; "
                      "`fleet-agent run` asks again") from e
    return Enrollment(config, path)
