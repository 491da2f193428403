"""``POST /v1/enroll``: a device trades a one-time token for its identity.

The device sends the public half of the ed25519 key pair it generated and its
hardware profile; it receives its device token, MQTT credentials, the trusted
TUF root and the repository URLs. The token is spent by one conditional UPDATE,
so two devices racing with the same token cannot both win.
"""
from __future__ import annotations

import base64
import binascii
from typing import Any, cast

import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field, field_validator

from edgefleet.common.hardware import HardwareProfile

from ..db.models import Device, EnrollmentToken, utcnow
from ..errors import Conflict, NotFound, Unauthorized, Unavailable
from ..store import REPOSITORY_PREFIX
from ..tokens import DEVICE_PREFIX, hash_mqtt_password, hash_token, new_token
from .audit import record
from .auth import MAX_TOKEN_CHARS
from .deps import ApiContext, get_ctx

router = APIRouter(tags=["enrollment"])

ROOT_KEY = f"{REPOSITORY_PREFIX}/metadata/root.json"


def normalize_public_key(text: str) -> str:
    """An ed25519 public key as PEM (SubjectPublicKeyInfo) or base64 of its 32 raw bytes -> PEM."""
    try:
        if text.lstrip().startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.encode())
        else:
            key = Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
    except (ValueError, binascii.Error, TypeError) as e:
        raise ValueError(f"device_public_key is not an ed25519 public key (PEM or base64 raw): {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("device_public_key must be an ed25519 key")
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


class EnrollRequest(BaseModel):
    token: str = Field(min_length=1, max_length=MAX_TOKEN_CHARS)
    device_public_key: str = Field(max_length=1000, description="ed25519 public key: PEM, or base64 of 32 bytes")
    hardware: dict[str, Any] = Field(description="HardwareProfile.to_dict() of the device")

    _key = field_validator("device_public_key")(normalize_public_key)

    @field_validator("hardware")
    @classmethod
    def _profile(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            return HardwareProfile.from_dict(value).to_dict()
        except (TypeError, ValueError) as e:
            raise ValueError(f"hardware is not a hardware profile: {e}") from None


class MqttCredentials(BaseModel):
    url: str
    username: str
    password: str


class EnrollResponse(BaseModel):
    device_id: str
    device_token: str
    mqtt: MqttCredentials
    trusted_root: str = Field(description="root.json the device trusts from now on")
    metadata_url: str
    target_base_url: str


def _spend(session: sa.orm.Session, token_hash: str) -> EnrollmentToken:
    """Mark the token used, or say precisely why it cannot be."""
    now = utcnow()
    spent = cast(sa.CursorResult[Any], session.execute(
        sa.update(EnrollmentToken)
        .where(
            EnrollmentToken.token_hash == token_hash,
            EnrollmentToken.used_at.is_(None),
            EnrollmentToken.expires_at > now,
        )
        .values(used_at=now)
    ))
    row = session.get(EnrollmentToken, token_hash)
    if row is None:
        raise Unauthorized("enrollment token is not valid: ask the operator for one (`fleetctl devices enroll NAME`)")
    if spent.rowcount != 1:
        if row.used_at is not None:
            raise Conflict(f"enrollment token for {row.device_id!r} was already used: create a new one")
        raise Unauthorized(f"enrollment token for {row.device_id!r} expired: create a new one")
    return row


def _trusted_root(ctx: ApiContext) -> str:
    try:
        return ctx.store.get_bytes(ROOT_KEY).decode()
    except NotFound:
        raise Unavailable(f"the repository has no {ROOT_KEY}: run `fleetctl init` on the controller") from None


@router.post("/v1/enroll", response_model=EnrollResponse, summary="Enroll a device with a one-time token")
def enroll(request: EnrollRequest, ctx: ApiContext = Depends(get_ctx)) -> EnrollResponse:
    trusted_root = _trusted_root(ctx)
    device_token = new_token(DEVICE_PREFIX)
    mqtt_password = new_token("")
    with ctx.db.unit_of_work() as session:
        token = _spend(session, hash_token(request.token))
        device = session.get(Device, token.device_id)
        if device is None:
            raise NotFound(f"device {token.device_id!r} was removed after its token was issued: create a new token")
        device.token_hash = hash_token(device_token)
        device.mqtt_password_hash = hash_mqtt_password(mqtt_password)
        device.public_key = request.device_public_key
        device.hardware = request.hardware
        device.hardware_class = request.hardware["hardware_class"]
        device.enrolled_at = utcnow()
        record(session, f"device:{device.id}", "device.enroll", device.id, hardware_class=device.hardware_class)
        device_id = device.id
    public = ctx.config.public_url.rstrip("/")
    return EnrollResponse(
        device_id=device_id,
        device_token=device_token,
        mqtt=MqttCredentials(url=ctx.config.effective_broker_url, username=device_id, password=mqtt_password),
        trusted_root=trusted_root,
        metadata_url=f"{public}/{REPOSITORY_PREFIX}/metadata/",
        target_base_url=f"{public}/{REPOSITORY_PREFIX}/targets/",
    )
