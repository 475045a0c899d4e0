"""The web console's sessions, and indexes to list a project's responses and conversations
newest first.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision: str | None = "0009"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "console_sessions",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("subject", sa.String(), nullable=False),
        sa.Column("project_id", sa.String(), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("kind IN ('admin', 'project')", name="ck_console_sessions_kind"),
        sa.PrimaryKeyConstraint("id", name="pk_console_sessions"),
    )
    op.create_index("ix_console_sessions_expires_at", "console_sessions", ["expires_at"])
    op.create_index("ix_responses_tenant_created_at", "responses", ["tenant", "created_at"])
    op.create_index("ix_conversations_tenant_created_at", "conversations", ["tenant", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_conversations_tenant_created_at", "conversations")
    op.drop_index("ix_responses_tenant_created_at", "responses")
    op.drop_table("console_sessions")
