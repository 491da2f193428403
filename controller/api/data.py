"""Operator endpoints for sampled production data: the samples index, one shard's bytes
(streamed from the artifact store, local or S3), and statistics for retraining."""
from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from ..dataset import DecodedShard, SampleRecord, decode_shard, summarize
from ..db.models import Sample
from ..errors import InvalidInput, NotFound
from .auth import require_operator
from .deps import ApiContext, get_ctx

router = APIRouter(prefix="/v1/data", tags=["data"], dependencies=[Depends(require_operator)])

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
MAX_ID = 2**63 - 1  # a larger id overflows the database's integer


class SampleOut(BaseModel):
    id: int
    key: str
    device: str
    hardware_class: str | None
    model: str
    version: str
    variant: str
    count: int
    bytes: int
    low_confidence: int
    top1_mean: float | None
    ts: datetime

    @classmethod
    def of(cls, row: Sample) -> SampleOut:
        return cls(id=row.id, key=row.store_key, device=row.device_id, hardware_class=row.hardware_class,
                   model=row.model, version=row.version, variant=row.variant, count=row.count, bytes=row.bytes,
                   low_confidence=row.low_confidence, top1_mean=row.top1_mean, ts=row.ts)


def _utc(since: datetime | None) -> datetime | None:
    """``since`` as an aware UTC datetime: without an offset it is UTC (the database refuses naive ones)."""
    if since is None:
        return None
    try:
        return since.replace(tzinfo=UTC) if since.tzinfo is None else since.astimezone(UTC)
    except OverflowError:
        raise InvalidInput(f"since {since.isoformat()} is out of range") from None


def _query(model: str | None, version: str | None, since: datetime | None) -> sa.Select:
    since = _utc(since)
    query = sa.select(Sample).order_by(Sample.id)
    if model:
        query = query.where(Sample.model == model)
    if version:
        query = query.where(Sample.version == version)
    if since:
        query = query.where(Sample.ts >= since)
    return query


@router.get("/samples", response_model=list[SampleOut], summary="The samples index (keyset pages by id)")
def list_samples(
    model: str | None = Query(None, pattern=NAME_PATTERN),
    version: str | None = Query(None, pattern=NAME_PATTERN),
    since: datetime | None = Query(None, description="ISO 8601; only samples uploaded at or after"),
    after: int = Query(0, ge=0, le=MAX_ID, description="only ids above this (the last id of the previous page)"),
    limit: int = Query(500, ge=1, le=5000),
    ctx: ApiContext = Depends(get_ctx),
) -> list[SampleOut]:
    with ctx.db.unit_of_work() as session:
        rows = session.scalars(_query(model, version, since).where(Sample.id > after).limit(limit))
        return [SampleOut.of(r) for r in rows]


@router.get("/samples/{sample_id}", summary="One uploaded shard (.npz), streamed from the artifact store")
def get_sample(sample_id: int = Path(ge=1, le=MAX_ID), ctx: ApiContext = Depends(get_ctx)) -> StreamingResponse:
    with ctx.db.unit_of_work() as session:
        row = session.get(Sample, sample_id)
        if row is None:
            raise NotFound(f"sample {sample_id} not found; list them with `fleetctl data export --model ...`")
        key, size = row.store_key, row.bytes
    chunks: Iterator[bytes] = ctx.store.open_range(key)
    return StreamingResponse(chunks, media_type="application/octet-stream",
                             headers={"Content-Length": str(size)})


@router.get("/stats", summary="Samples, top-1 confidence and predicted classes per model, version, hardware class")
def stats(
    model: str | None = Query(None, pattern=NAME_PATTERN),
    version: str | None = Query(None, pattern=NAME_PATTERN),
    since: datetime | None = Query(None),
    max_shards: int = Query(1000, ge=1, le=20000, description="read at most this many of the newest shards"),
    ctx: ApiContext = Depends(get_ctx),
) -> dict[str, Any]:
    with ctx.db.unit_of_work() as session:
        total = session.scalar(sa.select(sa.func.count()).select_from(_query(model, version, since).subquery()))
        records = [SampleRecord(row.id, row.store_key, row.device_id, row.model, row.version, row.variant,
                                row.hardware_class, row.ts.isoformat())
                   for row in session.scalars(_query(model, version, since).order_by(None)
                                              .order_by(Sample.id.desc()).limit(max_shards))]
    read = unreadable = 0

    def shards() -> Iterator[tuple[SampleRecord, DecodedShard]]:
        """One decoded shard at a time: memory is bounded by the largest shard, not their number."""
        nonlocal read, unreadable
        for record in records:
            try:
                shard = decode_shard(ctx.store.get_bytes(record.key))  # at most MAX_SHARD_BYTES expanded
            except (InvalidInput, NotFound):
                unreadable += 1
                continue
            read += 1
            yield record, shard
            del shard

    groups = summarize(shards())
    return {"groups": groups, "shards_read": read, "shards_total": total, "unreadable": unreadable}
