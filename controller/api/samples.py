"""``POST /v1/devices/{id}/samples``: a device uploads one shard of sampled production data.

The body is an ``.npz`` shard as ``controller.dataset.decode_shard`` reads it (arrays
sharing their first axis, no pickles, bounded expansion). It is validated before
it is stored under
``samples/<model>/<version>/<device>/<ts>.npz`` and indexed in the samples table.
"""
from __future__ import annotations

from fastapi import APIRouter, Depends, Header, Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from edgefleet.common.protocol import NAME

from ..dataset import decode_shard
from ..db.models import Device, Sample, utcnow
from ..errors import InvalidInput
from ..store import SAMPLES_PREFIX
from .auth import require_device
from .deps import ApiContext, get_ctx

router = APIRouter(tags=["samples"])

# Decompressed arrays may be this many times the upload limit (bounds zip bombs).
MAX_EXPANSION = 4


def _name(value: str, header: str) -> str:
    if not NAME.match(value):
        raise InvalidInput(f"header {header} {value!r} must be 1-128 of letters, digits, '_', '.', '-'")
    return value


class SampleOut(BaseModel):
    key: str
    count: int
    bytes: int


@router.post("/v1/devices/{device_id}/samples", response_model=SampleOut, status_code=201,
             summary="Upload a sample shard (device token)")
async def upload_samples(
    request: Request,
    device: Device = Depends(require_device),
    model: str = Header(alias="X-Edgefleet-Model", max_length=128),
    version: str = Header(alias="X-Edgefleet-Version", max_length=128),
    variant: str = Header(alias="X-Edgefleet-Variant", max_length=128),
    ctx: ApiContext = Depends(get_ctx),
) -> SampleOut:
    body = await request.body()  # bounded by the BodyLimit middleware (config.max_upload_bytes)
    names = (_name(model, "X-Edgefleet-Model"), _name(version, "X-Edgefleet-Version"),
             _name(variant, "X-Edgefleet-Variant"))
    return await run_in_threadpool(_store_shard, ctx, device, names, body)


def _store_shard(ctx: ApiContext, device: Device, names: tuple[str, str, str], body: bytes) -> SampleOut:
    model, version, variant = names
    shard = decode_shard(body, MAX_EXPANSION * ctx.config.max_upload_bytes)
    now = utcnow()
    key = f"{SAMPLES_PREFIX}/{model}/{version}/{device.id}/{now.strftime('%Y%m%dT%H%M%S.%fZ')}.npz"
    ctx.store.put_bytes(key, body)
    try:
        with ctx.db.unit_of_work() as session:
            session.add(Sample(
                device_id=device.id, hardware_class=device.hardware_class, model=model, version=version,
                variant=variant, store_key=key, count=shard.rows, bytes=len(body),
                low_confidence=int(shard.low.sum()),
                top1_mean=float(shard.top1.mean()) if shard.top1 is not None and shard.rows else None, ts=now,
            ))
    except Exception:
        ctx.store.delete(key)  # no unindexed shard left behind; the device retries
        raise
    return SampleOut(key=key, count=shard.rows, bytes=len(body))
