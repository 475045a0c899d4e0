"""The schema, as SQLAlchemy Core tables. Alembic migrations (`migrations/`) create it; a change
here needs a new migration (tests/test_storage.py checks that the two agree).

JSON is stored as text serialised with orjson: portable across SQLite and PostgreSQL, and the
database never needs to look inside it.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
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
    false,
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
    # The body's session_id (the request's, or its x-session-id header), kept apart so that
    # a session's responses are found by an index (since 0011).
    Column("session_id", String, nullable=True),
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

# --- Projects, keys, usage and idempotency (relay.access) ------------------------------------
# A project is a tenant: `responses.tenant` holds its id. Limits and budgets are JSON
# (relay.models.policy.Policy), read whole and never queried into.

projects = Table(
    "projects",
    metadata,
    Column("id", String, primary_key=True),
    Column("name", String, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("archived_at", BigInteger, nullable=True),
    Column("policy", Text, nullable=False),
)

# A key is stored as the SHA-256 digest of the whole key, found by its `prefix` (a public part
# of the key) and compared in constant time.
api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String, primary_key=True),
    Column("prefix", String, nullable=False, unique=True),
    Column("digest", String, nullable=False),
    Column("name", String, nullable=False),
    Column("project_id", String, ForeignKey("projects.id"), nullable=False),
    Column("projects", Text, nullable=False),  # JSON list: more projects it may pick
    Column("models", Text, nullable=True),  # JSON list: the models it may use; null: all
    Column("policy", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=True),
    Column("revoked_at", BigInteger, nullable=True),
    Column("last_used_at", BigInteger, nullable=True),
)

# One row per settled response. Costs are integers in nano-dollars: sums stay exact.
usage_ledger = Table(
    "usage_ledger",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created_at", BigInteger, nullable=False),
    Column("day", String, nullable=False),  # UTC, YYYY-MM-DD: what usage groups by
    Column("project_id", String, nullable=False),
    Column("key_id", String, nullable=True),
    Column("model", String, nullable=False),  # as the client asked for it
    Column("route", String, nullable=False),  # the route that served it (a fallback's)
    # ... and which of its deployments (None: nothing was generated, or before 0006).
    Column("deployment", String, nullable=True),
    Column("response_id", String, nullable=False),
    Column("status", String, nullable=False),
    Column("input_tokens", Integer, nullable=False),
    Column("cached_tokens", Integer, nullable=False),
    Column("output_tokens", Integer, nullable=False),
    Column("cost_nanos", BigInteger, nullable=False),
    Column("latency_ms", Integer, nullable=False),
    # The tokens were counted by Relay, the upstream having reported none (since 0007).
    Column("estimated", Boolean, nullable=False, server_default=false()),
    Index(None, "project_id", "day"),
    Index(None, "key_id", "day"),
)

# Running spend per budget period, kept with each ledger write, so that a budget check is one
# indexed read. period: 'day:2026-11-28', 'month:2026-11' or 'total'.
spend = Table(
    "spend",
    metadata,
    Column("scope", String, nullable=False),  # 'project' or 'key'
    Column("owner", String, nullable=False),
    Column("period", String, nullable=False),
    Column("cost_nanos", BigInteger, nullable=False),
    PrimaryKeyConstraint("scope", "owner", "period"),
)

# Answers kept for Idempotency-Key replays, apart from stored responses (store:false too).
idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("project_id", String, nullable=False),
    Column("key", String, nullable=False),
    Column("request_digest", String, nullable=False),
    Column("state", String, nullable=False),  # 'running' or 'done'
    Column("lease_until", BigInteger, nullable=False),  # a running claim lapses after this
    Column("expires_at", BigInteger, nullable=False),
    Column("status_code", Integer, nullable=True),
    Column("media_type", String, nullable=True),
    Column("body", Text, nullable=True),
    PrimaryKeyConstraint("project_id", "key"),
    Index(None, "expires_at"),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", BigInteger, nullable=False),
    Column("actor", String, nullable=False),
    Column("action", String, nullable=False),
    Column("target", String, nullable=False),
    Column("detail", Text, nullable=False),
)

# --- Runs (relay.runs) -----------------------------------------------------------------------
# A response being generated that a client already knows the id of: a background response
# (from its creation) or a stored stream (from its response.created). The process running it
# renews `lease_until`; past it, any instance ends the response as failed, so that no id a
# client was given stays in_progress forever, or vanishes.

runs = Table(
    "runs",
    metadata,
    Column("response_id", String, primary_key=True),
    Column("tenant", String, nullable=False),
    Column("background", Integer, nullable=False),  # 0 or 1
    Column("lease_until", BigInteger, nullable=False),
    Column("cancel_requested", Integer, nullable=False),  # 0 or 1
    # What a worker needs to start a background run handed out through the job queue.
    Column("request", Text, nullable=True),
    Column("session_id", String, nullable=True),
    Column("key_id", String, nullable=True),
    Index(None, "lease_until"),
)

# The events of a background response, in order, for stream resumption.
response_events = Table(
    "response_events",
    metadata,
    Column("response_id", String, nullable=False),
    Column("sequence_number", Integer, nullable=False),
    Column("event", Text, nullable=False),
    PrimaryKeyConstraint("response_id", "sequence_number"),
)

# --- Conversations ---------------------------------------------------------------------------
# A conversation's items in order; `version` grows with every change, so a history cached for
# one version is known to be current. A response continuing a conversation holds it
# (`active_token`, until `active_until`): a second one meanwhile is refused with a 409.

conversations = Table(
    "conversations",
    metadata,
    Column("id", String, primary_key=True),
    Column("tenant", String, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("deleted_at", BigInteger, nullable=True),
    Column("metadata", Text, nullable=False),
    Column("version", Integer, nullable=False),
    Column("next_position", Integer, nullable=False),
    Column("active_token", String, nullable=True),
    Column("active_until", BigInteger, nullable=True),
)

conversation_items = Table(
    "conversation_items",
    metadata,
    Column(
        "conversation_id",
        String,
        ForeignKey("conversations.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("position", Integer, nullable=False),
    Column("item_id", String, nullable=False),
    Column("item", Text, nullable=False),
    PrimaryKeyConstraint("conversation_id", "position"),
    Index(None, "conversation_id", "item_id"),
)

# --- Sealing ---------------------------------------------------------------------------------
# The key that seals on this database, by its fingerprint (never the key): instances sharing the
# database learn at start-up whether they would open each other's sealed items (relay.sealing).

sealing_key = Table(
    "sealing_key",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),  # 1: the one row
    Column("fingerprint", String, nullable=False),
    Column("configured", Boolean, nullable=False),  # from sealing_keys, or generated
    Column("registered_at", BigInteger, nullable=False),
)

# --- Prompt templates (relay.storage.prompts) ------------------------------------------------
# A template belongs to a project; its versions (1, 2, ...) never change once written, so a
# process may keep any version it read. `latest_version` and `archived_at` are what change.

prompt_templates = Table(
    "prompt_templates",
    metadata,
    Column("id", String, primary_key=True),
    Column("project_id", String, ForeignKey("projects.id"), nullable=False),
    Column("name", String, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("archived_at", BigInteger, nullable=True),
    Column("latest_version", Integer, nullable=False),
    Index(None, "project_id", "id"),
)

prompt_template_versions = Table(
    "prompt_template_versions",
    metadata,
    Column(
        "prompt_id",
        String,
        ForeignKey("prompt_templates.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("version", Integer, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("content", Text, nullable=False),  # JSON: instructions and messages
    PrimaryKeyConstraint("prompt_id", "version"),
)

# --- The web console (relay.ui) --------------------------------------------------------------
# A signed-in browser. `id` is the SHA-256 digest of the token its cookie holds (never the
# token: a reader of the database cannot ride a session); `subject` is what signed in, an
# admin key's id or a client key's id (never a key), with the project a client key signed in
# to. The gate reads the key again on every page, so a revoked key's session ends at once.

console_sessions = Table(
    "console_sessions",
    metadata,
    Column("id", String, primary_key=True),
    Column("kind", String, nullable=False),  # 'admin' or 'project'
    Column("subject", String, nullable=False),
    Column("project_id", String, nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    CheckConstraint("kind IN ('admin', 'project')", name="kind"),
    Index(None, "expires_at"),
)

# The console (and the admin API) list a project's responses and conversations newest first
# (by created_at, then id: each index holds both, so a page is read in order and stops), find
# a session's responses and the responses that continue one, and each one's cost.
Index(
    "ix_responses_tenant_created_at_id", responses.c.tenant, responses.c.created_at, responses.c.id
)
Index("ix_conversations_tenant_created_at", conversations.c.tenant, conversations.c.created_at)
Index(
    "ix_responses_tenant_session_id",
    responses.c.tenant,
    responses.c.session_id,
    responses.c.created_at,
    responses.c.id,
)
Index(
    "ix_responses_tenant_previous_response_id",
    responses.c.tenant,
    responses.c.previous_response_id,
    responses.c.created_at,
    responses.c.id,
)
Index("ix_usage_ledger_response_id", usage_ledger.c.response_id)
