"""Runs in flight (leases) and the event log of background responses.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("response_id", sa.String(), nullable=False),
        sa.Column("tenant", sa.String(), nullable=False),
        sa.Column("background", sa.Integer(), nullable=False),
        sa.Column("lease_until", sa.BigInteger(), nullable=False),
        sa.Column("cancel_requested", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("response_id", name="pk_runs"),
    )
    op.create_index("ix_runs_lease_until", "runs", ["lease_until"])
    op.create_table(
        "response_events",
        sa.Column("response_id", sa.String(), nullable=False),
        sa.Column("sequence_number", sa.Integer(), nullable=False),
        sa.Column("event", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("response_id", "sequence_number", name="pk_response_events"),
    )


def downgrade() -> None:
    op.drop_table("response_events")
    op.drop_index("ix_runs_lease_until", table_name="runs")
    op.drop_table("runs")
