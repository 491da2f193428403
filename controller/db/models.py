"""The controller's tables as SQLAlchemy 2 typed models.

The schema itself is created only by the Alembic revisions in ``migrations/``;
these classes describe it for the ORM and must stay in step with the newest
revision (tests/test_migrations.py compares them).

Conventions: timestamps are timezone-aware UTC (:class:`UTCDateTime` also on
SQLite, which stores naive text); dict columns are JSON and track in-place
changes (``device.labels["site"] = "berlin"`` is saved); states are named
enums stored as their string values.
"""
from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.ext.mutable import MutableDict
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from edgefleet.common.protocol import ExecutionState

from ..rollout.states import RolloutState, Verdict

# Deterministic constraint names, so migrations can address them on every database.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Widths shared with the wire contract (protocol.DEVICE_ID, protocol.NAME).
DEVICE_ID_LEN = 63
NAME_LEN = 128
ID_LEN = 64
STATE_LEN = 16


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Aware UTC datetimes in and out; naive input is refused rather than guessed."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value.isoformat()} given; use an aware UTC datetime")
        value = value.astimezone(UTC)
        # SQLite keeps no offset: store UTC wall time.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


JSONDict = MutableDict.as_mutable(sa.JSON())
# Surrogate keys of high-volume tables; SQLite only auto-increments INTEGER PRIMARY KEY.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _state(kind: type[enum.Enum]) -> sa.Enum:
    """A named state stored as its value in a plain VARCHAR (no native enum, no CHECK)."""
    return sa.Enum(
        kind,
        native_enum=False,
        create_constraint=False,
        length=STATE_LEN,
        validate_strings=True,
        values_callable=lambda members: [m.value for m in members],
    )


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSONDict,
    }


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(sa.String(DEVICE_ID_LEN), primary_key=True)  # the device name
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict)
    hardware: Mapped[dict[str, Any]] = mapped_column(default=dict)   # HardwareProfile.to_dict()
    hardware_class: Mapped[str | None] = mapped_column(sa.String(NAME_LEN), index=True)
    online: Mapped[bool] = mapped_column(default=False)
    boot: Mapped[int] = mapped_column(default=0)
    last_seen: Mapped[datetime | None]
    enrolled_at: Mapped[datetime] = mapped_column(default=utcnow)
    token_hash: Mapped[str | None] = mapped_column(sa.String(128), unique=True)
    mqtt_password_hash: Mapped[str | None] = mapped_column(sa.String(255))
    public_key: Mapped[str | None] = mapped_column(sa.Text)
    reported: Mapped[dict[str, Any] | None]          # last protocol.Reported
    desired: Mapped[dict[str, Any] | None]           # last protocol.DesiredSet published
    desired_generation: Mapped[int] = mapped_column(default=0)
    # The generation the broker acknowledged; below desired_generation it is owed again (the outbox).
    desired_sent_generation: Mapped[int] = mapped_column(default=0, server_default="0")
    # Highest (boot, seq) ingested per stream: QoS 1 redeliveries at or below are dropped.
    last_event_boot: Mapped[int] = mapped_column(default=0)
    last_event_seq: Mapped[int] = mapped_column(default=-1)
    last_telemetry_boot: Mapped[int] = mapped_column(default=0)
    last_telemetry_seq: Mapped[int] = mapped_column(default=-1)


class EnrollmentToken(Base):
    __tablename__ = "enrollment_tokens"

    token_hash: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    device_id: Mapped[str] = mapped_column(sa.String(DEVICE_ID_LEN), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]


class Variant(Base):
    """One signed model file (a TUF target); models and versions are views of this table."""

    __tablename__ = "variants"
    __table_args__ = (sa.UniqueConstraint("model", "version", "variant"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    model: Mapped[str] = mapped_column(sa.String(NAME_LEN))
    version: Mapped[str] = mapped_column(sa.String(NAME_LEN))
    variant: Mapped[str] = mapped_column(sa.String(NAME_LEN))
    target_path: Mapped[str] = mapped_column(sa.String(512), unique=True)
    release: Mapped[int]
    requirements: Mapped[dict[str, Any]] = mapped_column(default=dict)
    accuracy: Mapped[dict[str, Any]] = mapped_column(default=dict)
    preference: Mapped[int] = mapped_column(default=0)
    golden_path: Mapped[str] = mapped_column(sa.String(512))
    size_bytes: Mapped[int | None] = mapped_column(sa.BigInteger)
    p99_ms: Mapped[float | None]
    published_at: Mapped[datetime] = mapped_column(default=utcnow)


class Rollout(Base):
    __tablename__ = "rollouts"

    id: Mapped[str] = mapped_column(sa.String(ID_LEN), primary_key=True)
    model: Mapped[str] = mapped_column(sa.String(NAME_LEN))
    version: Mapped[str] = mapped_column(sa.String(NAME_LEN))
    selector: Mapped[str] = mapped_column(sa.Text, default="")
    spec: Mapped[dict[str, Any]] = mapped_column(default=dict)  # stages, bake_s, gates, window …
    state: Mapped[RolloutState] = mapped_column(_state(RolloutState), default=RolloutState.PENDING, index=True)
    stage: Mapped[int] = mapped_column(default=0)
    stage_started_at: Mapped[datetime | None]
    created_by: Mapped[str] = mapped_column(sa.String(NAME_LEN), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    supersedes: Mapped[str | None] = mapped_column(
        sa.String(ID_LEN), sa.ForeignKey("rollouts.id", ondelete="SET NULL")
    )
    detail: Mapped[str] = mapped_column(sa.Text, default="")


class Execution(Base):
    """One device's part in one rollout; never duplicated (UNIQUE rollout, device)."""

    __tablename__ = "executions"
    __table_args__ = (sa.UniqueConstraint("rollout_id", "device_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    rollout_id: Mapped[str] = mapped_column(
        sa.String(ID_LEN), sa.ForeignKey("rollouts.id", ondelete="CASCADE")
    )
    device_id: Mapped[str] = mapped_column(
        sa.String(DEVICE_ID_LEN), sa.ForeignKey("devices.id", ondelete="CASCADE"), index=True
    )
    stage: Mapped[int]
    variant: Mapped[str | None] = mapped_column(sa.String(NAME_LEN))
    reason: Mapped[str] = mapped_column(sa.Text, default="")      # why this variant
    state: Mapped[ExecutionState] = mapped_column(
        _state(ExecutionState), default=ExecutionState.QUEUED, index=True
    )
    detail: Mapped[str] = mapped_column(sa.Text, default="")
    attempt: Mapped[int] = mapped_column(default=0)
    generation: Mapped[int] = mapped_column(default=0)            # generation of the Desired entry sent
    previous: Mapped[dict[str, Any] | None]                       # ModelRef before this rollout
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    next_attempt_at: Mapped[datetime | None]
    deadline_at: Mapped[datetime | None]


class EventRecord(Base):
    """One protocol.Event as received (unique per device boot and sequence number)."""

    __tablename__ = "events"
    __table_args__ = (sa.UniqueConstraint("device_id", "boot", "seq"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    device_id: Mapped[str] = mapped_column(
        sa.String(DEVICE_ID_LEN), sa.ForeignKey("devices.id", ondelete="CASCADE")
    )
    boot: Mapped[int]
    seq: Mapped[int]
    generation: Mapped[int]
    deployment: Mapped[str | None] = mapped_column(sa.String(ID_LEN), index=True)
    state: Mapped[str] = mapped_column(sa.String(STATE_LEN))
    model: Mapped[str | None] = mapped_column(sa.String(NAME_LEN))
    version: Mapped[str | None] = mapped_column(sa.String(NAME_LEN))
    variant: Mapped[str | None] = mapped_column(sa.String(NAME_LEN))
    detail: Mapped[str] = mapped_column(sa.Text, default="")
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    ts: Mapped[datetime] = mapped_column(default=utcnow)


class TelemetryRecord(Base):
    __tablename__ = "telemetry"
    __table_args__ = (sa.Index(None, "device_id", "ts"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    device_id: Mapped[str] = mapped_column(
        sa.String(DEVICE_ID_LEN), sa.ForeignKey("devices.id", ondelete="CASCADE")
    )
    kind: Mapped[str] = mapped_column(sa.String(STATE_LEN))
    boot: Mapped[int]
    seq: Mapped[int]
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    ts: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class Benchmark(Base):
    """On-device latency evidence per hardware class; outlives the device that measured it."""

    __tablename__ = "benchmarks"
    __table_args__ = (sa.Index(None, "model", "version", "variant", "hardware_class"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    device_id: Mapped[str] = mapped_column(sa.String(DEVICE_ID_LEN))
    hardware_class: Mapped[str] = mapped_column(sa.String(NAME_LEN))
    model: Mapped[str] = mapped_column(sa.String(NAME_LEN))
    version: Mapped[str] = mapped_column(sa.String(NAME_LEN))
    variant: Mapped[str] = mapped_column(sa.String(NAME_LEN))
    p50_ms: Mapped[float]
    p99_ms: Mapped[float]
    baseline_p99_ms: Mapped[float | None]   # the replaced version, timed in turn with this one (gate)
    throughput: Mapped[float | None]
    ts: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class Sample(Base):
    """Index of one uploaded sample shard in the artifact store."""

    __tablename__ = "samples"
    __table_args__ = (sa.Index(None, "model", "version", "ts"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    device_id: Mapped[str] = mapped_column(sa.String(DEVICE_ID_LEN), index=True)
    hardware_class: Mapped[str | None] = mapped_column(sa.String(NAME_LEN))
    model: Mapped[str] = mapped_column(sa.String(NAME_LEN))
    version: Mapped[str] = mapped_column(sa.String(NAME_LEN))
    variant: Mapped[str] = mapped_column(sa.String(NAME_LEN))
    store_key: Mapped[str] = mapped_column(sa.String(512), unique=True)
    count: Mapped[int]
    bytes: Mapped[int] = mapped_column(sa.BigInteger)
    low_confidence: Mapped[int] = mapped_column(default=0)
    top1_mean: Mapped[float | None]
    ts: Mapped[datetime] = mapped_column(default=utcnow)


class GateResult(Base):
    __tablename__ = "gate_results"
    __table_args__ = (sa.Index(None, "rollout_id", "stage"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    rollout_id: Mapped[str] = mapped_column(
        sa.String(ID_LEN), sa.ForeignKey("rollouts.id", ondelete="CASCADE")
    )
    stage: Mapped[int]
    hardware_class: Mapped[str | None] = mapped_column(sa.String(NAME_LEN))  # None: whole stage
    gate: Mapped[str] = mapped_column(sa.String(ID_LEN))
    value: Mapped[float | None]
    threshold: Mapped[float | None]
    verdict: Mapped[Verdict] = mapped_column(_state(Verdict))
    ts: Mapped[datetime] = mapped_column(default=utcnow)


class BadVariant(Base):
    __tablename__ = "bad_variants"

    model: Mapped[str] = mapped_column(sa.String(NAME_LEN), primary_key=True)
    version: Mapped[str] = mapped_column(sa.String(NAME_LEN), primary_key=True)
    variant: Mapped[str] = mapped_column(sa.String(NAME_LEN), primary_key=True)
    hardware_class: Mapped[str] = mapped_column(sa.String(NAME_LEN), primary_key=True)
    reason: Mapped[str] = mapped_column(sa.Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(NAME_LEN))
    token_hash: Mapped[str] = mapped_column(sa.String(128), unique=True)
    role: Mapped[str] = mapped_column(sa.String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class AuditEntry(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    ts: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(sa.String(NAME_LEN))
    action: Mapped[str] = mapped_column(sa.String(ID_LEN))
    target: Mapped[str] = mapped_column(sa.String(512), default="")
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)


class LeaderLockRow(Base):
    __tablename__ = "leader_lock"

    name: Mapped[str] = mapped_column(sa.String(ID_LEN), primary_key=True)
    holder: Mapped[str] = mapped_column(sa.String(255))
    expires_at: Mapped[datetime]
