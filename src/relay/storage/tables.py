"""The schema, as SQLAlchemy Core tables. Alembic migrations (`migrations/`) create it; a change
here needs a new migration (tests/test_storage.py checks that the two agree).

JSON is stored as text serialised with orjson: portable across SQLite and PostgreSQL, and the
database never needs to look inside it.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

responses = Table(
    "responses",
    metadata,
    Column("id", String, primary_key=True),
    Column("tenant", String, nullable=False),
    Column("previous_response_id", String, nullable=True),
    Column("status", String, nullable=False),
    Column("model", String, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    # Set by a soft delete: the response disappears from the API, but a later response that
    # continues from it still reads its items (see SqlStore.load_context).
    Column("deleted_at", BigInteger, nullable=True),
    Column("body", Text, nullable=False),  # the whole response object, output included
)

# Each response stores only its own items: input items (what the request added) and output
# items. A conversation is rebuilt by walking previous_response_id.
response_items = Table(
    "response_items",
    metadata,
    Column(
        "response_id",
        String,
        ForeignKey("responses.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("tenant", String, nullable=False),
    Column("kind", String, nullable=False),  # 'input' sorts before 'output'
    Column("position", Integer, nullable=False),
    Column("item_id", String, nullable=False),
    Column("item", Text, nullable=False),
    PrimaryKeyConstraint("response_id", "kind", "position"),
    CheckConstraint("kind IN ('input', 'output')", name="kind"),
    Index(None, "tenant", "item_id"),
)
