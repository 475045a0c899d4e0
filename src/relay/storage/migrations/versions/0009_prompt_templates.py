"""Prompt templates and their versions.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision: str | None = "0008"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "prompt_templates",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("project_id", sa.String(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("archived_at", sa.BigInteger(), nullable=True),
        sa.Column("latest_version", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["project_id"], ["projects.id"], name="fk_prompt_templates_project_id_projects"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_prompt_templates"),
    )
    op.create_index("ix_prompt_templates_project_id_id", "prompt_templates", ["project_id", "id"])
    op.create_table(
        "prompt_template_versions",
        sa.Column("prompt_id", sa.String(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["prompt_id"],
            ["prompt_templates.id"],
            name="fk_prompt_template_versions_prompt_id_prompt_templates",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("prompt_id", "version", name="pk_prompt_template_versions"),
    )


def downgrade() -> None:
    op.drop_table("prompt_template_versions")
    op.drop_index("ix_prompt_templates_project_id_id", table_name="prompt_templates")
    op.drop_table("prompt_templates")
