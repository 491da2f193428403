"""Initial schema: devices, enrollment, variants, rollouts and executions, ingest, audit, leader lock.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Frozen copies of the shapes used by controller/db/models.py at this revision.
DEVICE_ID = sa.String(63)
NAME = sa.String(128)
ID = sa.String(64)
STATE = sa.String(16)
HASH = sa.String(128)
PATH = sa.String(512)
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def json(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.JSON(), nullable=nullable)


def fk(column: str, table: str, ref: str, ondelete: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        [column], [f"{ref}.id"], ondelete=ondelete, name=f"fk_{table}_{column}_{ref}"
    )


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("id", DEVICE_ID, nullable=False),
        json("labels"),
        json("hardware"),
        sa.Column("hardware_class", NAME, nullable=True),
        sa.Column("online", sa.Boolean(), nullable=False),
        sa.Column("boot", sa.Integer(), nullable=False),
        ts("last_seen", nullable=True),
        ts("enrolled_at"),
        sa.Column("token_hash", HASH, nullable=True),
        sa.Column("mqtt_password_hash", sa.String(255), nullable=True),
        sa.Column("public_key", sa.Text(), nullable=True),
        json("reported", nullable=True),
        json("desired", nullable=True),
        sa.Column("desired_generation", sa.Integer(), nullable=False),
        sa.Column("last_event_boot", sa.Integer(), nullable=False),
        sa.Column("last_event_seq", sa.Integer(), nullable=False),
        sa.Column("last_telemetry_boot", sa.Integer(), nullable=False),
        sa.Column("last_telemetry_seq", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_devices"),
        sa.UniqueConstraint("token_hash", name="uq_devices_token_hash"),
    )
    op.create_index("ix_devices_hardware_class", "devices", ["hardware_class"])

    op.create_table(
        "enrollment_tokens",
        sa.Column("token_hash", HASH, nullable=False),
        sa.Column("device_id", DEVICE_ID, nullable=False),
        ts("created_at"),
        ts("expires_at"),
        ts("used_at", nullable=True),
        sa.PrimaryKeyConstraint("token_hash", name="pk_enrollment_tokens"),
    )
    op.create_index("ix_enrollment_tokens_device_id", "enrollment_tokens", ["device_id"])

    op.create_table(
        "variants",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model", NAME, nullable=False),
        sa.Column("version", NAME, nullable=False),
        sa.Column("variant", NAME, nullable=False),
        sa.Column("target_path", PATH, nullable=False),
        sa.Column("release", sa.Integer(), nullable=False),
        json("requirements"),
        json("accuracy"),
        sa.Column("preference", sa.Integer(), nullable=False),
        sa.Column("golden_path", PATH, nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=True),
        sa.Column("p99_ms", sa.Double(), nullable=True),
        ts("published_at"),
        sa.PrimaryKeyConstraint("id", name="pk_variants"),
        sa.UniqueConstraint("target_path", name="uq_variants_target_path"),
        sa.UniqueConstraint("model", "version", "variant", name="uq_variants_model_version_variant"),
    )

    op.create_table(
        "rollouts",
        sa.Column("id", ID, nullable=False),
        sa.Column("model", NAME, nullable=False),
        sa.Column("version", NAME, nullable=False),
        sa.Column("selector", sa.Text(), nullable=False),
        json("spec"),
        sa.Column("state", STATE, nullable=False),
        sa.Column("stage", sa.Integer(), nullable=False),
        ts("stage_started_at", nullable=True),
        sa.Column("created_by", NAME, nullable=False),
        ts("created_at"),
        ts("updated_at"),
        sa.Column("supersedes", ID, nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_rollouts"),
        sa.ForeignKeyConstraint(
            ["supersedes"], ["rollouts.id"], ondelete="SET NULL", name="fk_rollouts_supersedes_rollouts"
        ),
    )
    op.create_index("ix_rollouts_state", "rollouts", ["state"])

    op.create_table(
        "executions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("rollout_id", ID, nullable=False),
        sa.Column("device_id", DEVICE_ID, nullable=False),
        sa.Column("stage", sa.Integer(), nullable=False),
        sa.Column("variant", NAME, nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("state", STATE, nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        json("previous", nullable=True),
        ts("created_at"),
        ts("updated_at"),
        ts("next_attempt_at", nullable=True),
        ts("deadline_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_executions"),
        fk("rollout_id", "executions", "rollouts", "CASCADE"),
        fk("device_id", "executions", "devices", "CASCADE"),
        sa.UniqueConstraint("rollout_id", "device_id", name="uq_executions_rollout_id_device_id"),
    )
    op.create_index("ix_executions_device_id", "executions", ["device_id"])
    op.create_index("ix_executions_state", "executions", ["state"])

    op.create_table(
        "events",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("device_id", DEVICE_ID, nullable=False),
        sa.Column("boot", sa.Integer(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("deployment", ID, nullable=True),
        sa.Column("state", STATE, nullable=False),
        sa.Column("model", NAME, nullable=True),
        sa.Column("version", NAME, nullable=True),
        sa.Column("variant", NAME, nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        json("data"),
        ts("ts"),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
        fk("device_id", "events", "devices", "CASCADE"),
        sa.UniqueConstraint("device_id", "boot", "seq", name="uq_events_device_id_boot_seq"),
    )
    op.create_index("ix_events_deployment", "events", ["deployment"])

    op.create_table(
        "telemetry",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("device_id", DEVICE_ID, nullable=False),
        sa.Column("kind", STATE, nullable=False),
        sa.Column("boot", sa.Integer(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        json("data"),
        ts("ts"),
        sa.PrimaryKeyConstraint("id", name="pk_telemetry"),
        fk("device_id", "telemetry", "devices", "CASCADE"),
    )
    op.create_index("ix_telemetry_device_id_ts", "telemetry", ["device_id", "ts"])
    op.create_index("ix_telemetry_ts", "telemetry", ["ts"])

    op.create_table(
        "benchmarks",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("device_id", DEVICE_ID, nullable=False),
        sa.Column("hardware_class", NAME, nullable=False),
        sa.Column("model", NAME, nullable=False),
        sa.Column("version", NAME, nullable=False),
        sa.Column("variant", NAME, nullable=False),
        sa.Column("p50_ms", sa.Double(), nullable=False),
        sa.Column("p99_ms", sa.Double(), nullable=False),
        sa.Column("throughput", sa.Double(), nullable=True),
        ts("ts"),
        sa.PrimaryKeyConstraint("id", name="pk_benchmarks"),
    )
    op.create_index(
        "ix_benchmarks_model_version_variant_hardware_class",
        "benchmarks", ["model", "version", "variant", "hardware_class"],
    )
    op.create_index("ix_benchmarks_ts", "benchmarks", ["ts"])

    op.create_table(
        "samples",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("device_id", DEVICE_ID, nullable=False),
        sa.Column("hardware_class", NAME, nullable=True),
        sa.Column("model", NAME, nullable=False),
        sa.Column("version", NAME, nullable=False),
        sa.Column("variant", NAME, nullable=False),
        sa.Column("store_key", PATH, nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("low_confidence", sa.Integer(), nullable=False),
        sa.Column("top1_mean", sa.Double(), nullable=True),
        ts("ts"),
        sa.PrimaryKeyConstraint("id", name="pk_samples"),
        sa.UniqueConstraint("store_key", name="uq_samples_store_key"),
    )
    op.create_index("ix_samples_device_id", "samples", ["device_id"])
    op.create_index("ix_samples_model_version_ts", "samples", ["model", "version", "ts"])

    op.create_table(
        "gate_results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("rollout_id", ID, nullable=False),
        sa.Column("stage", sa.Integer(), nullable=False),
        sa.Column("hardware_class", NAME, nullable=True),
        sa.Column("gate", ID, nullable=False),
        sa.Column("value", sa.Double(), nullable=True),
        sa.Column("threshold", sa.Double(), nullable=True),
        sa.Column("verdict", STATE, nullable=False),
        ts("ts"),
        sa.PrimaryKeyConstraint("id", name="pk_gate_results"),
        fk("rollout_id", "gate_results", "rollouts", "CASCADE"),
    )
    op.create_index("ix_gate_results_rollout_id_stage", "gate_results", ["rollout_id", "stage"])

    op.create_table(
        "bad_variants",
        sa.Column("model", NAME, nullable=False),
        sa.Column("version", NAME, nullable=False),
        sa.Column("variant", NAME, nullable=False),
        sa.Column("hardware_class", NAME, nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        ts("created_at"),
        sa.PrimaryKeyConstraint("model", "version", "variant", "hardware_class", name="pk_bad_variants"),
    )

    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", NAME, nullable=False),
        sa.Column("token_hash", HASH, nullable=False),
        sa.Column("role", sa.String(32), nullable=False),
        ts("created_at"),
        ts("revoked_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_tokens"),
        sa.UniqueConstraint("token_hash", name="uq_api_tokens_token_hash"),
    )

    op.create_table(
        "audit_log",
        sa.Column("id", BIG_ID, nullable=False),
        ts("ts"),
        sa.Column("actor", NAME, nullable=False),
        sa.Column("action", ID, nullable=False),
        sa.Column("target", PATH, nullable=False),
        json("detail"),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
    )
    op.create_index("ix_audit_log_ts", "audit_log", ["ts"])

    op.create_table(
        "leader_lock",
        sa.Column("name", ID, nullable=False),
        sa.Column("holder", sa.String(255), nullable=False),
        ts("expires_at"),
        sa.PrimaryKeyConstraint("name", name="pk_leader_lock"),
    )


def downgrade() -> None:
    # Children before parents: executions, events, telemetry and gate results reference others.
    for table in (
        "leader_lock", "audit_log", "api_tokens", "bad_variants", "gate_results", "samples",
        "benchmarks", "telemetry", "events", "executions", "rollouts", "variants",
        "enrollment_tokens", "devices",
    ):
        op.drop_table(table)
