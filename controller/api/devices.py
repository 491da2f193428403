"""Operator endpoints for devices: list, show, label, remove, and enrollment tokens."""
from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Path, Query, Response
from pydantic import BaseModel, Field, field_validator

from edgefleet.common.mqtt import BrokerURL
from edgefleet.common.protocol import DEVICE_ID

from ..db.models import Device, EnrollmentToken, EventRecord, utcnow
from ..errors import Conflict, NotFound
from ..reported import serving
from ..rollout.selector import Selector
from ..tokens import ENROLL_PREFIX, hash_token, new_token
from .audit import record_operator
from .auth import Operator, require_admin, require_operator
from .certificates import last_certificate_expiry
from .deps import ApiContext, get_ctx

router = APIRouter(prefix="/v1/devices", tags=["devices"], dependencies=[Depends(require_operator)])

LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,62}$")
LABEL_VALUE = re.compile(r"^[A-Za-z0-9_.:-]{0,63}$")
DEFAULT_ENROLL_TTL_S = 24 * 3600
MAX_ENROLL_TTL_S = 30 * 24 * 3600

DeviceId = Path(pattern=DEVICE_ID.pattern, description="device id (1-63 letters, digits, '.', '_', '-')")


class ActiveModel(BaseModel):
    model: str
    version: str
    variant: str
    release: int = 0
    memory_kb: int | None = Field(None, description="resident memory the version took when it loaded")


class DeviceOut(BaseModel):
    id: str
    labels: dict[str, str]
    hardware_class: str | None
    online: bool
    enrolled: bool
    last_seen: datetime | None
    enrolled_at: datetime
    active: list[ActiveModel] = Field(description="every model the device serves, by name")

    @classmethod
    def of(cls, device: Device) -> DeviceOut:
        return cls(**_summary(device))


class DeviceDetail(DeviceOut):
    hardware: dict[str, Any]
    boot: int
    reported: dict[str, Any] | None
    desired: dict[str, Any] | None
    public_key: str | None

    @classmethod
    def of(cls, device: Device) -> DeviceDetail:
        return cls(
            **_summary(device),
            hardware=dict(device.hardware),
            boot=device.boot,
            reported=device.reported,
            desired=device.desired,
            public_key=device.public_key,
        )


def _summary(device: Device) -> dict[str, Any]:
    return {
        "id": device.id,
        "labels": dict(device.labels),
        "hardware_class": device.hardware_class,
        "online": device.online,
        "enrolled": device.token_hash is not None,
        "last_seen": device.last_seen,
        "enrolled_at": device.enrolled_at,
        "active": [ActiveModel(**model) for model in serving(device.reported)],
    }


def _check_labels(labels: dict[str, str]) -> dict[str, str]:
    for key, value in labels.items():
        if not LABEL_KEY.match(key):
            raise ValueError(f"label key {key!r} must be 1-63 of letters, digits, '_', '.', '/', '-'")
        if not LABEL_VALUE.match(value):
            raise ValueError(f"label {key}={value!r}: values are up to 63 of letters, digits, '_', '.', ':', '-'")
    return labels


class LabelChange(BaseModel):
    set: dict[str, str] = Field(default_factory=dict, max_length=64, description="labels to add or change")
    remove: list[str] = Field(default_factory=list, max_length=64, description="label keys to remove")

    _valid = field_validator("set")(_check_labels)


class EnrollTokenRequest(BaseModel):
    labels: dict[str, str] = Field(default_factory=dict, max_length=64)
    ttl_s: int = Field(DEFAULT_ENROLL_TTL_S, ge=60, le=MAX_ENROLL_TTL_S, description="token lifetime (seconds)")

    _valid = field_validator("labels")(_check_labels)


class EnrollTokenOut(BaseModel):
    device_id: str
    token: str = Field(description="one-time enrollment token: give it to `fleet-agent enroll --token`")
    expires_at: datetime


def _device(session: sa.orm.Session, device_id: str) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        raise NotFound(f"device {device_id!r} is unknown: see `fleetctl devices list`")
    return device


@router.get("", response_model=list[DeviceOut], summary="List devices")
def list_devices(
    selector: str = Query("", max_length=1000, description="label selector, e.g. site=berlin,hw.arch=aarch64"),
    ctx: ApiContext = Depends(get_ctx),
) -> list[DeviceOut]:
    wanted = Selector.parse(selector) if selector else None
    with ctx.db.reading() as session:
        devices = session.scalars(sa.select(Device).order_by(Device.id))
        return [DeviceOut.of(d) for d in devices if wanted is None or wanted.matches(d.labels, d.hardware)]


@router.get("/{device_id}", response_model=DeviceDetail, summary="Show one device")
def show_device(device_id: str = DeviceId, ctx: ApiContext = Depends(get_ctx)) -> DeviceDetail:
    with ctx.db.unit_of_work() as session:
        return DeviceDetail.of(_device(session, device_id))


class EventOut(BaseModel):
    boot: int
    seq: int
    generation: int
    deployment: str | None
    state: str
    model: str | None
    version: str | None
    variant: str | None
    detail: str
    data: dict[str, Any]
    ts: datetime


@router.get("/{device_id}/events", response_model=list[EventOut], summary="A device's update events, oldest first")
def device_events(
    device_id: str = DeviceId,
    deployment: str | None = Query(None, max_length=128, description="only events of this rollout"),
    limit: int = Query(200, ge=1, le=5000),
    ctx: ApiContext = Depends(get_ctx),
) -> list[EventOut]:
    with ctx.db.unit_of_work() as session:
        _device(session, device_id)
        query = sa.select(EventRecord).where(EventRecord.device_id == device_id)
        if deployment is not None:
            query = query.where(EventRecord.deployment == deployment)
        newest = query.order_by(EventRecord.boot.desc(), EventRecord.seq.desc()).limit(limit)
        return [EventOut.model_validate(e, from_attributes=True) for e in reversed(list(session.scalars(newest)))]


@router.patch("/{device_id}/labels", response_model=DeviceOut, summary="Set and remove labels")
def label_device(
    change: LabelChange,
    device_id: str = DeviceId,
    operator: Operator = Depends(require_admin),
    ctx: ApiContext = Depends(get_ctx),
) -> DeviceOut:
    with ctx.db.unit_of_work() as session:
        device = _device(session, device_id)
        labels = {k: v for k, v in device.labels.items() if k not in change.remove}
        device.labels = {**labels, **change.set}
        record_operator(session, operator, "device.label", device_id, set=change.set, remove=change.remove)
        return DeviceOut.of(device)


@router.delete("/{device_id}", status_code=204, summary="Remove a device, revoke its identity, close its MQTT session")
def remove_device(
    device_id: str = DeviceId,
    operator: Operator = Depends(require_admin),
    ctx: ApiContext = Depends(get_ctx),
) -> Response:
    with ctx.db.reading() as session:
        _device(session, device_id)
    # Before: a broker that keeps its own identities (Mosquitto) refuses the device while its
    # record, the only handle for a retry, still exists. After: a broker that reads credentials
    # from the database closes a session opened meanwhile.
    ctx.broker_admin.revoke(device_id)
    with ctx.db.unit_of_work() as session:
        session.delete(_device(session, device_id))
        session.execute(sa.delete(EnrollmentToken).where(EnrollmentToken.device_id == device_id))
        record_operator(session, operator, "device.remove", device_id)
    ctx.broker_admin.revoke(device_id)
    return Response(status_code=204)


def _refuse_a_live_certificate(session: sa.orm.Session, ctx: ApiContext, device_id: str) -> None:
    """On a TLS broker the certificate's name is the whole login, and the broker cannot tell a
    removed device's certificate from a new one under the same id: the id waits until it expires."""
    if not BrokerURL.parse(ctx.config.effective_broker_url).tls:
        return
    valid_until = last_certificate_expiry(session, device_id)
    if valid_until is not None and valid_until > utcnow():
        raise Conflict(f"device id {device_id!r} was removed and a certificate issued to it is valid until "
                       f"{valid_until.isoformat(timespec='seconds')}: the broker would take it again; "
                       "enroll the device under a new id, or after that time")


@router.post(
    "/{device_id}/enroll-token", response_model=EnrollTokenOut, status_code=201,
    summary="Create a one-time enrollment token (creates the device record if new)",
)
def create_enroll_token(
    request: EnrollTokenRequest,
    device_id: str = DeviceId,
    operator: Operator = Depends(require_admin),
    ctx: ApiContext = Depends(get_ctx),
) -> EnrollTokenOut:
    token = new_token(ENROLL_PREFIX)
    expires_at = utcnow() + timedelta(seconds=request.ttl_s)
    with ctx.db.unit_of_work() as session:
        device = session.get(Device, device_id)
        if device is None:
            _refuse_a_live_certificate(session, ctx, device_id)
            session.add(Device(id=device_id, labels=request.labels))
        elif request.labels:
            device.labels = {**device.labels, **request.labels}
        session.add(EnrollmentToken(token_hash=hash_token(token), device_id=device_id, expires_at=expires_at))
        record_operator(
            session, operator, "device.enroll-token", device_id,
            labels=request.labels, expires_at=expires_at.isoformat(),
        )
    return EnrollTokenOut(device_id=device_id, token=token, expires_at=expires_at)
