"""What a worker needs to start a queued background run: its request, session and key.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("request", sa.Text(), nullable=True))
    op.add_column("runs", sa.Column("session_id", sa.String(), nullable=True))
    op.add_column("runs", sa.Column("key_id", sa.String(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("key_id")
        batch.drop_column("session_id")
        batch.drop_column("request")
