"""Devices record which desired generation the broker acknowledged.

The rollout engine commits a desired state before publishing it and records the
PUBACK afterwards, so no transaction waits on the broker; a committed state whose
acknowledgement is missing is published again by the next pass.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("desired_sent_generation", sa.Integer(), nullable=False, server_default="0"))
    # Before this column every stored desired state was published inside its own transaction.
    op.execute("UPDATE devices SET desired_sent_generation = desired_generation")


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("desired_sent_generation")
