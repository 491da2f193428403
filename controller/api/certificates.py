"""``POST /v1/devices/{id}/certificate``: a device trades a CSR for its MQTT client certificate.

Authenticated by the device token (enrollment, then every renewal). The CSR must be
signed by its key, name the device as CN and hold an ECDSA P-256 key; the certificate
lives ``device_cert_lifetime_s``. The broker admits the device first (``BrokerAdmin.admit``).
"""
from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from ..db.models import AuditEntry, Device
from ..pki import MAX_CSR_CHARS, FleetCA
from .audit import record
from .auth import require_device
from .deps import ApiContext, get_ctx

router = APIRouter(tags=["certificates"])
ISSUED = "device.certificate"  # the audit action that records each certificate issued


def last_certificate_expiry(session: Session, device_id: str) -> datetime | None:
    """Until when the newest certificate issued to ``device_id`` is valid (the audit log keeps them all)."""
    newest = session.scalars(sa.select(AuditEntry).where(AuditEntry.action == ISSUED, AuditEntry.target == device_id)
                             .order_by(AuditEntry.id.desc()).limit(1)).first()
    if newest is None or not isinstance(newest.detail.get("not_after"), str):
        return None
    return datetime.fromisoformat(newest.detail["not_after"])


class CertificateRequest(BaseModel):
    csr: str = Field(max_length=MAX_CSR_CHARS, description="PEM CSR: CN = the device id, an ECDSA P-256 key")


class CertificateOut(BaseModel):
    certificate: str = Field(description="PEM client certificate for MQTT over TLS")
    ca_certificate: str = Field(description="the fleet CA (it also signs the broker's certificate)")
    not_after: datetime


@router.post("/v1/devices/{device_id}/certificate", response_model=CertificateOut,
             summary="Issue or renew the device's MQTT client certificate (device token)")
def issue_certificate(
    request: CertificateRequest,
    device: Device = Depends(require_device),
    ctx: ApiContext = Depends(get_ctx),
) -> CertificateOut:
    ca = FleetCA.load(ctx.config.home)
    issued = ca.issue_for_device(request.csr, device.id, ctx.config.device_cert_lifetime_s)
    ctx.broker_admin.admit(device.id)
    with ctx.db.unit_of_work() as session:
        record(session, f"device:{device.id}", ISSUED, device.id,
               serial=format(issued.certificate.serial_number, "x"), not_after=issued.not_after.isoformat())
    return CertificateOut(certificate=issued.pem, ca_certificate=ca.certificate_pem, not_after=issued.not_after)
