"""Searching a project's responses: each response's session_id as a column (filled from the
stored bodies), and indexes to find a session's responses, the responses that continue one
(previous_response_id) and the usage rows of a response (its cost). The list's index gains
the id it is ordered by last, so that PostgreSQL reads a page in order and stops, as SQLite
did (it sorted the whole project first).

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision: str | None = "0010"
branch_labels: str | None = None
depends_on: str | None = None

# The body's session_id, read by each database's own JSON functions (a body is orjson's text).
_FILL = {
    "sqlite": "UPDATE responses SET session_id = json_extract(body, '$.session_id')",
    "postgresql": "UPDATE responses SET session_id = CAST(body AS JSON) ->> 'session_id'",
}


def upgrade() -> None:
    op.add_column("responses", sa.Column("session_id", sa.String(), nullable=True))
    op.execute(_FILL[op.get_bind().dialect.name])
    # Each ends with the list's order: a session's or a chain's newest come first from it.
    order = ["created_at", "id"]
    op.create_index("ix_responses_tenant_session_id", "responses", ["tenant", "session_id", *order])
    op.create_index(
        "ix_responses_tenant_previous_response_id",
        "responses",
        ["tenant", "previous_response_id", *order],
    )
    op.create_index("ix_responses_tenant_created_at_id", "responses", ["tenant", *order])
    op.drop_index("ix_responses_tenant_created_at", "responses")
    op.create_index("ix_usage_ledger_response_id", "usage_ledger", ["response_id"])


def downgrade() -> None:
    op.drop_index("ix_usage_ledger_response_id", "usage_ledger")
    op.create_index("ix_responses_tenant_created_at", "responses", ["tenant", "created_at"])
    op.drop_index("ix_responses_tenant_created_at_id", "responses")
    op.drop_index("ix_responses_tenant_previous_response_id", "responses")
    op.drop_index("ix_responses_tenant_session_id", "responses")
    with op.batch_alter_table("responses") as batch:
        batch.drop_column("session_id")
