"""``POST /v1/devices/{id}/certificate``: a device trades a CSR for its MQTT client certificate.

Authenticated by the device token (enrollment, then every renewal). The CSR must be
signed by its key, name the device as CN and hold an ECDSA P-256 key; the certificate
lives ``device_cert_lifetime_s``. The broker admits the device first (``BrokerAdmin.admit``).
"""
from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from ..db.models import Device
from ..pki import MAX_CSR_CHARS, FleetCA
from .audit import record
from .auth import require_device
from .deps import ApiContext, get_ctx

router = APIRouter(tags=["certificates"])


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
        record(session, f"device:{device.id}", "device.certificate", device.id,
               serial=format(issued.certificate.serial_number, "x"), not_after=issued.not_after.isoformat())
    return CertificateOut(certificate=issued.pem, ca_certificate=ca.certificate_pem, not_after=issued.not_after)
