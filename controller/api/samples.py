"""``POST /v1/devices/{id}/samples``: a device uploads one shard of sampled production data.

The body is an ``.npz`` (numpy arrays, no pickles) whose arrays share a leading
axis, one row per sample. Optional arrays feed the index: ``top1`` (float, the
top-1 probability of each sample) and ``low_confidence`` (bool, why it was kept).
The shard is validated before it is stored under
``samples/<model>/<version>/<device>/<ts>.npz`` and indexed in the samples table.
"""
from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass

import numpy as np
from fastapi import APIRouter, Depends, Header, Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from edgefleet.agent.protocol import NAME

from ..db.models import Device, Sample, utcnow
from ..errors import InvalidInput
from ..store import SAMPLES_PREFIX
from .auth import require_device
from .deps import ApiContext, get_ctx
from .limits import PayloadTooLarge

router = APIRouter(tags=["samples"])

# Decompressed arrays may be this many times the upload limit (bounds zip bombs).
MAX_EXPANSION = 4
MAX_ARRAYS = 64


@dataclass(frozen=True)
class ShardSummary:
    count: int
    low_confidence: int
    top1_mean: float | None


def inspect_shard(body: bytes, max_bytes: int) -> ShardSummary:
    """Validate an uploaded npz without unpickling anything; InvalidInput says what is wrong."""
    try:
        with zipfile.ZipFile(io.BytesIO(body)) as archive:
            members = archive.infolist()
    except zipfile.BadZipFile as e:
        raise InvalidInput(f"sample shard is not an npz archive: {e}") from None
    if not members or len(members) > MAX_ARRAYS:
        raise InvalidInput(f"sample shard must hold 1..{MAX_ARRAYS} arrays, it holds {len(members)}")
    expanded = sum(m.file_size for m in members)
    if expanded > MAX_EXPANSION * max_bytes:
        raise PayloadTooLarge(f"sample shard expands to {expanded} bytes; the limit is {MAX_EXPANSION * max_bytes}")
    try:
        with np.load(io.BytesIO(body), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise InvalidInput(f"sample shard has an unreadable array: {e}") from None
    rows = {name: a.shape[0] for name, a in arrays.items() if a.ndim >= 1}
    if not rows or len(set(rows.values())) != 1:
        raise InvalidInput(f"sample shard arrays must share their first dimension, got {rows}")
    count = next(iter(rows.values()))
    top1 = arrays.get("top1")
    low = arrays.get("low_confidence")
    for name, array in (("top1", top1), ("low_confidence", low)):
        if array is not None and array.shape != (count,):
            raise InvalidInput(f"sample shard array {name!r} must have shape ({count},), got {array.shape}")
    if top1 is not None and not np.issubdtype(top1.dtype, np.floating):
        raise InvalidInput(f"sample shard array 'top1' must be floating point, got {top1.dtype}")
    return ShardSummary(
        count=count,
        low_confidence=int(np.count_nonzero(low)) if low is not None else 0,
        top1_mean=float(top1.mean()) if top1 is not None and count else None,
    )


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
    summary = inspect_shard(body, ctx.config.max_upload_bytes)
    now = utcnow()
    key = f"{SAMPLES_PREFIX}/{model}/{version}/{device.id}/{now.strftime('%Y%m%dT%H%M%S.%fZ')}.npz"
    ctx.store.put_bytes(key, body)
    try:
        with ctx.db.unit_of_work() as session:
            session.add(Sample(
                device_id=device.id, hardware_class=device.hardware_class, model=model, version=version,
                variant=variant, store_key=key, count=summary.count, bytes=len(body),
                low_confidence=summary.low_confidence, top1_mean=summary.top1_mean, ts=now,
            ))
    except Exception:
        ctx.store.delete(key)  # no unindexed shard left behind; the device retries
        raise
    return SampleOut(key=key, count=summary.count, bytes=len(body))
