"""Operator endpoints for published models, read from the variants table (one row per signed model file)."""
from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel

from edgefleet.common.protocol import NAME

from ..db.catalog import ModelVersion, model_versions
from ..errors import NotFound
from ..mirror import mirror_targets
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


class SyncOut(BaseModel):
    added: int   # signed variants new to the catalog


@router.post("/sync", response_model=SyncOut, summary="Mirror newly signed targets into the catalog")
def sync_models(ctx: ApiContext = Depends(get_ctx), operator: Operator = Depends(require_deployer)) -> SyncOut:
    added = mirror_targets(ctx.db, Repository(ctx.config.home, ctx.store, Expiry.from_config(ctx.config)))
    if added:
        with ctx.db.unit_of_work() as session:
            record_operator(session, operator, "models.sync", added=added)
    return SyncOut(added=added)
