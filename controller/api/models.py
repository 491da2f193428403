"""Operator endpoints for published models, read from the variants table (one row per signed model file)."""
from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel

from edgefleet.common.protocol import NAME

from ..db.catalog import ModelVersion, model_versions
from ..db.models import Device
from ..errors import NotFound
from ..mirror import mirror_targets
from ..rollout.engine import evidence, variant_views
from ..rollout.frontier import frontier
from ..signing import Expiry, Repository
from .audit import record_operator
from .auth import Operator, require_deployer, require_operator
from .deps import ApiContext, get_ctx

router = APIRouter(prefix="/v1/models", tags=["models"], dependencies=[Depends(require_operator)])


class ModelSummary(BaseModel):
    model: str
    versions: list[str]   # newest release first
    latest: str
    variants: list[str]   # variants of the latest version, by preference
    published_at: datetime


class VariantOut(BaseModel):
    variant: str
    target_path: str
    golden_path: str
    size_bytes: int | None
    preference: int
    p99_ms: float | None
    requirements: dict[str, Any]
    accuracy: dict[str, Any]


class VersionOut(BaseModel):
    version: str
    release: int
    published_at: datetime
    variants: list[VariantOut]


class ModelDetail(BaseModel):
    model: str
    versions: list[VersionOut]  # newest release first


def _version(mv: ModelVersion) -> VersionOut:
    return VersionOut(
        version=mv.version,
        release=mv.release,
        published_at=mv.published_at,
        variants=[VariantOut.model_validate(v, from_attributes=True) for v in mv.variants],
    )


@router.get("", response_model=list[ModelSummary], summary="List published models")
def list_models(ctx: ApiContext = Depends(get_ctx)) -> list[ModelSummary]:
    with ctx.db.unit_of_work() as session:
        versions = model_versions(session)
    by_model: dict[str, list[ModelVersion]] = defaultdict(list)
    for mv in versions:
        by_model[mv.model].append(mv)
    return [
        ModelSummary(
            model=model,
            versions=[mv.version for mv in group],
            latest=group[0].version,
            variants=[v.variant for v in group[0].variants],
            published_at=group[0].published_at,
        )
        for model, group in by_model.items()
    ]


@router.get("/{name}", response_model=ModelDetail, summary="Show a model's versions and variants")
def show_model(name: str = Path(pattern=NAME.pattern), ctx: ApiContext = Depends(get_ctx)) -> ModelDetail:
    with ctx.db.unit_of_work() as session:
        versions = model_versions(session, name)
    if not versions:
        raise NotFound(f"model {name!r} is not published: see `fleetctl models list`")
    return ModelDetail(model=name, versions=[_version(mv) for mv in versions])


class FrontierPointOut(BaseModel):
    variant: str
    metric: str | None
    accuracy: float | None
    p50_ms: float | None
    p99_ms: float | None
    devices: int
    on_frontier: bool
    picked: bool
    note: str


class FrontierOut(BaseModel):
    model: str
    version: str
    min_accuracy: float | None
    classes: dict[str, list[FrontierPointOut]]  # hardware class -> every variant of the version


@router.get("/{name}/{version}/frontier", response_model=FrontierOut,
            summary="Latency/accuracy frontier of a model version per hardware class")
def model_frontier(
    name: str = Path(pattern=NAME.pattern), version: str = Path(pattern=NAME.pattern),
    min_accuracy: float | None = Query(None, ge=0, le=1, description="accuracy floor, a fraction"),
    ctx: ApiContext = Depends(get_ctx),
) -> FrontierOut:
    with ctx.db.unit_of_work() as session:
        variants = variant_views(session, name, version)
        if not variants:
            raise NotFound(f"{name}:{version} is not published: see `fleetctl models show {name}`")
        proof = evidence(session, name, version)
        classes = session.scalars(sa.select(Device.hardware_class).distinct().where(
            Device.hardware_class.is_not(None)))
        found = frontier(variants, proof, [c for c in classes if c], min_accuracy)
    return FrontierOut(model=name, version=version, min_accuracy=min_accuracy, classes={
        cls: [FrontierPointOut(**p.to_dict()) for p in points] for cls, points in found.items()})


class SyncOut(BaseModel):
    added: int   # signed variants new to the catalog


@router.post("/sync", response_model=SyncOut, summary="Mirror newly signed targets into the catalog")
def sync_models(ctx: ApiContext = Depends(get_ctx), operator: Operator = Depends(require_deployer)) -> SyncOut:
    added = mirror_targets(ctx.db, Repository(ctx.config.home, ctx.store, Expiry.from_config(ctx.config)))
    if added:
        with ctx.db.unit_of_work() as session:
            record_operator(session, operator, "models.sync", added=added)
    return SyncOut(added=added)
