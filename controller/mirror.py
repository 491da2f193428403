"""The variants table mirrors the signed TUF targets.

The repository is the source of truth: ``fleetctl bundle publish`` signs where
the bundle is built, and the controller learns of new targets by re-reading the
signed metadata (on start, on a schedule, and when the CLI asks after a publish).
Every pass is idempotent: it inserts what is missing and never rewrites a row.
"""
from __future__ import annotations

import logging

import sqlalchemy as sa

from edgefleet.common.protocol import target_path

from .db.models import Variant
from .db.session import Database
from .signing import Repository

log = logging.getLogger(__name__)


def mirror_targets(db: Database, repository: Repository) -> int:
    """Add a variants row for every signed model target not yet mirrored; returns how many."""
    infos = repository.targets()
    lengths = repository.target_lengths()
    with db.unit_of_work() as session:
        known = set(session.scalars(sa.select(Variant.target_path)))
        added = 0
        for info in infos:
            path = target_path(info.model, info.version, info.variant)
            if path in known:
                continue
            session.add(Variant(
                model=info.model, version=info.version, variant=info.variant, target_path=path,
                release=info.release, requirements=info.requirements.to_dict(), accuracy=info.accuracy,
                preference=info.preference, golden_path=info.golden, size_bytes=lengths.get(path),
                p99_ms=info.p99_ms,
            ))
            added += 1
    if added:
        log.info("mirrored %d newly signed variant(s) into the catalog", added)
    return added
