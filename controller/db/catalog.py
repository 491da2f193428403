"""Models and versions: a read-only view over the variants table (the one source of truth)."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session

from .models import Variant


@dataclass(frozen=True)
class ModelVersion:
    model: str
    version: str
    release: int
    published_at: datetime
    variants: list[Variant] = field(default_factory=list)   # by preference


def model_versions(session: Session, model: str | None = None, version: str | None = None) -> list[ModelVersion]:
    """Every published (model, version), newest release first within a model."""
    query = sa.select(Variant).order_by(Variant.model, Variant.release.desc(), Variant.preference)
    if model is not None:
        query = query.where(Variant.model == model)
    if version is not None:
        query = query.where(Variant.version == version)
    grouped: dict[tuple[str, str], list[Variant]] = {}
    for row in session.scalars(query):
        grouped.setdefault((row.model, row.version), []).append(row)
    return [
        ModelVersion(
            model=name, version=ver,
            release=max(v.release for v in rows),
            published_at=min(v.published_at for v in rows),
            variants=rows,
        )
        for (name, ver), rows in grouped.items()
    ]

