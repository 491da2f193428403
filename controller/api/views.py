"""Read models the dashboard draws (any operator may read them): who is calling, the fleet at
a glance, a rollout's live stage and timeline, a device's trends. Each answer is bounded: the
newest rows only, however long the fleet has run. (A model's latency/accuracy frontier is
``GET /v1/models/{name}/{version}/frontier``.)"""
from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Path, Query
from sqlalchemy.orm import Session

from edgefleet.common.errors import ProtocolError
from edgefleet.common.protocol import DEVICE_ID, ExecutionState, ModelCounters, TelemetryKind

from ..db.models import (
    AuditEntry,
    Benchmark,
    Device,
    EventRecord,
    GateResult,
    Rollout,
    TelemetryRecord,
    utcnow,
)
from ..errors import NotFound
from ..reported import serving
from ..roles import Role
from ..rollout import status
from .auth import Operator, require_viewer
from .deps import ApiContext, get_ctx
from .rollouts import RolloutId

router = APIRouter(prefix="/v1", tags=["dashboard"])

TIMELINE_ROWS = 100       # newest entries of a rollout's timeline
HISTORY_ROWS = 50         # newest activations and benchmarks of a device


@router.get("/whoami", summary="The calling token's name and role")
def whoami(operator: Operator = Depends(require_viewer)) -> dict[str, Any]:
    return {"name": operator.name, "role": operator.role.value, "controls": operator.role.allows(Role.DEPLOYER)}


@router.get("/fleet", summary="Devices per hardware class: online, offline, and what they serve")
def fleet(_: Operator = Depends(require_viewer), ctx: ApiContext = Depends(get_ctx)) -> dict[str, Any]:
    classes: dict[str, dict[str, Any]] = defaultdict(lambda: {"devices": 0, "online": 0, "serving": Counter()})
    with ctx.db.reading() as session:
        for cls, online, reported in session.execute(sa.select(Device.hardware_class, Device.online, Device.reported)):
            group = classes[cls or "unknown"]
            group["devices"] += 1
            group["online"] += int(online)
            models = serving(reported)
            group["serving"].update(
                [f"{m['model']} {m['version']} {m['variant']}" for m in models] if models else ["nothing"])
    return {
        "devices": sum(g["devices"] for g in classes.values()),
        "online": sum(g["online"] for g in classes.values()),
        "classes": [{"hardware_class": cls, "devices": g["devices"], "online": g["online"],
                     "serving": dict(g["serving"].most_common())} for cls, g in sorted(classes.items())],
    }


@router.get("/rollouts/{rollout_id}/live", summary="A rollout's current stage (gates, bake time left) and timeline")
def rollout_live(
    rollout_id: str = RolloutId, _: Operator = Depends(require_viewer), ctx: ApiContext = Depends(get_ctx),
) -> dict[str, Any]:
    with ctx.db.reading() as session:
        return {**status.live_stage(session, rollout_id, utcnow()), "timeline": timeline(session, rollout_id)}


def timeline(session: Session, rollout_id: str) -> list[dict[str, Any]]:
    """Newest first: the operators' actions, each stage's verdict, the devices' update events."""
    rollout = session.get_one(Rollout, rollout_id)
    entries = [_entry(rollout.created_at, "rollout", f"created by {rollout.created_by}")]
    if rollout.state.terminal:
        entries.append(_entry(rollout.updated_at, "rollout", f"{rollout.state.value}: {rollout.detail}"))
    for ts, actor, action in session.execute(
        sa.select(AuditEntry.ts, AuditEntry.actor, AuditEntry.action)
        .where(AuditEntry.target == rollout_id, AuditEntry.action != "rollout.create")
        .order_by(AuditEntry.id.desc()).limit(TIMELINE_ROWS)
    ):
        entries.append(_entry(ts, "operator", f"{action.removeprefix('rollout.')} by {actor}"))
    judged: dict[tuple[int, Any], list[str]] = defaultdict(list)
    for stage, ts, cls, gate, verdict in session.execute(
        sa.select(GateResult.stage, GateResult.ts, GateResult.hardware_class, GateResult.gate, GateResult.verdict)
        .where(GateResult.rollout_id == rollout_id).order_by(GateResult.id)
    ):
        judged[(stage, ts)].append(f"{gate} on {cls or 'all'} {verdict.value}")
    for (stage, ts), verdicts in judged.items():
        failed = [v for v in verdicts if v.endswith(" FAIL")]
        text = f"stage {stage + 1} " + (f"failed: {'; '.join(failed)}" if failed else f"passed {len(verdicts)} gate(s)")
        entries.append(_entry(ts, "stage", text))
    for ts, device, state, detail in session.execute(
        sa.select(EventRecord.ts, EventRecord.device_id, EventRecord.state, EventRecord.detail)
        .where(EventRecord.deployment == rollout_id).order_by(EventRecord.id.desc()).limit(TIMELINE_ROWS)
    ):
        entries.append(_entry(ts, "device", f"{device} {state}" + (f": {detail}" if detail else "")))
    entries.sort(key=lambda e: e["ts"], reverse=True)
    return entries[:TIMELINE_ROWS]


def _entry(ts: datetime, kind: str, text: str) -> dict[str, Any]:
    return {"ts": ts, "kind": kind, "text": text}


@router.get("/devices/{device_id}/trends", summary="A device's latency and errors over time, benchmarks, model history")
def device_trends(
    device_id: str = Path(pattern=DEVICE_ID.pattern),
    points: int = Query(300, ge=1, le=2000, description="newest counters reports to read"),
    _: Operator = Depends(require_viewer), ctx: ApiContext = Depends(get_ctx),
) -> dict[str, Any]:
    with ctx.db.reading() as session:
        if session.get(Device, device_id) is None:
            raise NotFound(f"device {device_id!r} is unknown: see `fleetctl devices list`")
        rows = list(session.execute(
            sa.select(TelemetryRecord.ts, TelemetryRecord.boot, TelemetryRecord.data)
            .where(TelemetryRecord.device_id == device_id, TelemetryRecord.kind == TelemetryKind.COUNTERS.value)
            .order_by(TelemetryRecord.ts.desc(), TelemetryRecord.id.desc()).limit(points)
        ))
        benchmarks = [
            {"ts": b.ts, "model": b.model, "version": b.version, "variant": b.variant, "p50_ms": b.p50_ms,
             "p99_ms": b.p99_ms, "baseline_p99_ms": b.baseline_p99_ms}
            for b in session.scalars(sa.select(Benchmark).where(Benchmark.device_id == device_id)
                                     .order_by(Benchmark.ts.desc()).limit(HISTORY_ROWS))
        ]
        history = [
            {"ts": e.ts, "state": e.state, "model": e.model, "version": e.version, "variant": e.variant,
             "deployment": e.deployment}
            for e in session.scalars(
                sa.select(EventRecord).where(
                    EventRecord.device_id == device_id,
                    EventRecord.state.in_([ExecutionState.SUCCEEDED.value, ExecutionState.ROLLED_BACK.value]))
                .order_by(EventRecord.boot.desc(), EventRecord.seq.desc()).limit(HISTORY_ROWS))
        ]
    return {"traffic": traffic(reversed(rows)), "benchmarks": benchmarks, "history": history}


def traffic(rows: Iterable[Any]) -> list[dict[str, Any]]:
    """Requests, errors and latency quantiles between consecutive counters reports, oldest first.

    Counters are cumulative per load of a model (boot, ``since``): each point is the growth
    since the previous report of the same load, so a restart or a swap starts a new series."""
    last: dict[tuple[int, float], ModelCounters] = {}
    points = []
    for ts, boot, data in rows:
        try:
            now = ModelCounters.from_dict(data)
        except ProtocolError:  # stored by an older release in another shape: skip the point, keep the chart
            continue
        before = last.get((boot, now.since))
        last[(boot, now.since)] = now
        if before is None or before.latency_buckets_ms != now.latency_buckets_ms:
            continue
        counts = [max(0, a - b) for a, b in zip(now.latency_counts, before.latency_counts, strict=True)]
        points.append({
            "ts": ts, "model": now.model.model, "version": now.model.version, "variant": now.model.variant,
            "requests": max(0, now.requests - before.requests), "errors": max(0, now.failures - before.failures),
            "p50_ms": quantile(now.latency_buckets_ms, counts, 0.5),
            "p99_ms": quantile(now.latency_buckets_ms, counts, 0.99),
        })
    return points


def quantile(bounds: tuple[float, ...], counts: list[int], q: float) -> float | None:
    """The q-quantile of a histogram (upper bounds, the last count +Inf), interpolated within
    its bucket as Prometheus does; in the +Inf bucket, the largest finite bound."""
    total = sum(counts)
    if not total or not bounds:
        return None
    rank, below = q * total, 0
    for i, n in enumerate(counts):
        if n and below + n >= rank:
            if i == len(bounds):
                return bounds[-1]
            lower = bounds[i - 1] if i else 0.0
            return lower + (bounds[i] - lower) * (rank - below) / n
        below += n
    return bounds[-1]
