"""Benchmarks carry the previous version's p99 measured in the same paired run.

The activation gate times the new and the serving model query by query in turn;
keeping that baseline lets the rollout gate compare like with like (same device,
same moment) instead of against figures taken earlier under other load.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("benchmarks") as batch:
        batch.add_column(sa.Column("baseline_p99_ms", sa.Double(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("benchmarks") as batch:
        batch.drop_column("baseline_p99_ms")
