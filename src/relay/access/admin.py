"""Admin operations on projects, keys and prompt templates, shared by the admin API and
`relay admin`. Each change writes its audit row in the same transaction (who, what, when;
never a key)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import Connection, insert, select, update

from relay.access.keys import KEY_PREFIX, digest, new_key
from relay.access.listing import Cursor, ResponseSearch, as_page, costs, newest_first
from relay.errors import InvalidRequest, NotFound
from relay.ids import new_id
from relay.models.policy import NO_POLICY, Policy
from relay.models.prompts import MAX_TEMPLATE_BYTES, TemplateContent
from relay.storage import prompts
from relay.storage.conversations import view as conversation_view
from relay.storage.database import Database
from relay.storage.tables import api_keys, audit_log, conversations, projects, responses

PROJECT_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_TIME = 2**53  # unix seconds: far beyond any expiry, within every column type
MAX_PAGE = 100
RESPONSE_STATUSES = ("queued", "in_progress", "completed", "incomplete", "failed", "cancelled")


class ProjectCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    # Optional: a config file's tenant name, to give that tenant limits and budgets.
    id: str | None = Field(default=None, pattern=PROJECT_ID.pattern)
    policy: Policy = NO_POLICY


class ProjectUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=200)
    policy: dict[str, Any] | None = None  # changes; a null lifts that limit


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    project_id: str = Field(min_length=1, max_length=64)
    name: str = Field(default="", max_length=200)
    projects: list[str] = Field(default_factory=list)
    models: list[str] | None = None
    policy: Policy = NO_POLICY
    expires_at: int | None = Field(default=None, ge=0, le=MAX_TIME)  # unix seconds


class KeyUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=200)
    projects: list[str] | None = None
    models: list[str] | None = None
    policy: dict[str, Any] | None = None
    expires_at: int | None = Field(default=None, ge=0, le=MAX_TIME)


class PromptCreate(TemplateContent):
    name: str = Field(min_length=1, max_length=200)


def parse(model: type[BaseModel], body: Any) -> Any:
    """A request body as `model`, or a 400 naming the first bad field."""
    try:
        return model.model_validate(body)
    except ValidationError as error:
        first = error.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(step) for step in first["loc"])
        raise InvalidRequest(f"Invalid '{where}': {first['msg']}.", param=where) from None


def _policy(changes: dict[str, Any] | None, current: Policy) -> Policy:
    if changes is None:
        return current
    try:
        return current.updated(changes)
    except ValidationError as error:
        first = error.errors(include_url=False, include_input=False)[0]
        where = "policy." + ".".join(str(step) for step in first["loc"])
        raise InvalidRequest(f"Invalid '{where}': {first['msg']}.", param=where) from None


def project_view(row: Any) -> dict[str, Any]:
    return {
        "object": "project",
        "id": row.id,
        "name": row.name,
        "created_at": row.created_at,
        "archived_at": row.archived_at,
        "status": "archived" if row.archived_at is not None else "active",
        "policy": orjson.loads(row.policy),
    }


def key_view(row: Any) -> dict[str, Any]:
    return {
        "object": "api_key",
        "id": row.id,
        "name": row.name,
        "redacted_value": f"{KEY_PREFIX}{row.prefix}...",
        "project_id": row.project_id,
        "projects": orjson.loads(row.projects),
        "models": None if row.models is None else orjson.loads(row.models),
        "policy": orjson.loads(row.policy),
        "created_at": row.created_at,
        "expires_at": row.expires_at,
        "revoked_at": row.revoked_at,
        "last_used_at": row.last_used_at,
        "status": "revoked" if row.revoked_at is not None else "active",
    }


def response_summary(row: Any, cost_nanos: int | None) -> dict[str, Any]:
    """A stored response as a list shows it: what it was, how it ended and what it cost (None:
    not settled yet), not its items (GET .../responses/{id} and its input_items have those)."""
    body = orjson.loads(row.body)
    return {
        "object": "response.summary",
        "id": row.id,
        "created_at": row.created_at,
        "status": row.status,
        "model": row.model,
        "previous_response_id": row.previous_response_id,
        "background": bool(body.get("background")),
        "usage": body.get("usage"),
        "error": body.get("error"),
        "metadata": body.get("metadata") or {},
        "session_id": row.session_id,
        "cost_usd": None if cost_nanos is None else cost_nanos / 1e9,
    }


def _audit(conn: Connection, actor: str, action: str, target: str, detail: Any) -> None:
    conn.execute(
        insert(audit_log).values(
            at=int(time.time()),
            actor=actor,
            action=action,
            target=target,
            detail=orjson.dumps(detail).decode(),
        )
    )


def _project_row(conn: Connection, project_id: str) -> Any:
    row = conn.execute(select(projects).where(projects.c.id == project_id)).first()
    if row is None:
        raise NotFound(f"Project '{project_id[:100]}' not found.", code="project_not_found")
    return row


def _template(spec: TemplateContent) -> dict[str, Any]:
    """A version's content as stored, within its size bound."""
    content = spec.stored()
    if not content["instructions"] and not content["messages"]:
        raise InvalidRequest(
            "A prompt template needs instructions or messages.", param="instructions"
        )
    if len(orjson.dumps(content)) > MAX_TEMPLATE_BYTES:
        raise InvalidRequest(
            f"A prompt template may hold at most {MAX_TEMPLATE_BYTES} bytes of JSON."
        )
    return content


def _key_row(conn: Connection, key_id: str) -> Any:
    row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).first()
    if row is None:
        raise NotFound(f"API key '{key_id[:100]}' not found.", code="api_key_not_found")
    return row


def _page(conn: Connection, table: Any, where: list[Any], after: str | None, limit: int) -> Any:
    query = select(table).where(*where).order_by(table.c.id).limit(limit + 1)
    if after is not None:
        query = query.where(table.c.id > after)
    return conn.execute(query).all()


def page(data: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    shown = data[:limit]
    return {
        "object": "list",
        "data": shown,
        "first_id": shown[0]["id"] if shown else None,
        "last_id": shown[-1]["id"] if shown else None,
        "has_more": len(data) > limit,
    }


class Admin:
    """Every admin operation; `actor` names who asked (an admin key's name, or the CLI)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def create_project(self, actor: str, body: Any) -> dict[str, Any]:
        spec: ProjectCreate = parse(ProjectCreate, body)

        def work(conn: Connection) -> dict[str, Any]:
            project_id = spec.id or new_id("proj")
            if conn.execute(select(projects.c.id).where(projects.c.id == project_id)).first():
                raise InvalidRequest(
                    f"Project '{project_id}' already exists.", param="id", code="project_exists"
                )
            conn.execute(
                insert(projects).values(
                    id=project_id,
                    name=spec.name,
                    created_at=int(time.time()),
                    archived_at=None,
                    policy=spec.policy.to_json(),
                )
            )
            _audit(conn, actor, "project.created", project_id, spec.model_dump(exclude_none=True))
            return project_view(_project_row(conn, project_id))

        return await self.db.write(work)

    async def list_projects(self, after: str | None, limit: int) -> dict[str, Any]:
        rows = await self.db.read(lambda conn: _page(conn, projects, [], after, limit))
        return page([project_view(row) for row in rows], limit)

    async def get_project(self, project_id: str) -> dict[str, Any]:
        return await self.db.read(lambda conn: project_view(_project_row(conn, project_id)))

    async def project_names(self, project_ids: Iterable[str]) -> dict[str, str]:
        """Each project's name, for pages that list projects; one without a row (a config
        file's tenant) is named by its id."""
        wanted = sorted(set(project_ids))
        query = select(projects.c.id, projects.c.name).where(projects.c.id.in_(wanted))
        rows = await self.db.read(lambda conn: conn.execute(query).all()) if wanted else []
        return {project_id: project_id for project_id in wanted} | {
            row.id: row.name for row in rows
        }

    async def update_project(self, actor: str, project_id: str, body: Any) -> dict[str, Any]:
        spec: ProjectUpdate = parse(ProjectUpdate, body)

        def work(conn: Connection) -> dict[str, Any]:
            row = _project_row(conn, project_id)
            policy = _policy(spec.policy, Policy.from_json(row.policy))
            conn.execute(
                update(projects)
                .where(projects.c.id == project_id)
                .values(name=spec.name or row.name, policy=policy.to_json())
            )
            _audit(conn, actor, "project.updated", project_id, spec.model_dump(exclude_none=True))
            return project_view(_project_row(conn, project_id))

        return await self.db.write(work)

    async def archive_project(self, actor: str, project_id: str) -> dict[str, Any]:
        """Archived, not deleted: its responses and usage stay; its keys stop working."""

        def work(conn: Connection) -> dict[str, Any]:
            row = _project_row(conn, project_id)
            if row.archived_at is None:
                conn.execute(
                    update(projects)
                    .where(projects.c.id == project_id)
                    .values(archived_at=int(time.time()))
                )
                _audit(conn, actor, "project.archived", project_id, {})
            return project_view(_project_row(conn, project_id))

        return await self.db.write(work)

    async def create_key(self, actor: str, body: Any) -> dict[str, Any]:
        """The new key, whose `value` is shown this once."""
        spec: KeyCreate = parse(KeyCreate, body)
        value, prefix = new_key()

        def work(conn: Connection) -> dict[str, Any]:
            for project_id in [spec.project_id, *spec.projects]:
                if _project_row(conn, project_id).archived_at is not None:
                    raise InvalidRequest(
                        f"Project '{project_id}' is archived.", code="project_archived"
                    )
            key_id = "key_" + prefix
            conn.execute(
                insert(api_keys).values(
                    id=key_id,
                    prefix=prefix,
                    digest=digest(value),
                    name=spec.name,
                    project_id=spec.project_id,
                    projects=orjson.dumps(spec.projects).decode(),
                    models=None if spec.models is None else orjson.dumps(spec.models).decode(),
                    policy=spec.policy.to_json(),
                    created_at=int(time.time()),
                    expires_at=spec.expires_at,
                )
            )
            _audit(conn, actor, "key.created", key_id, spec.model_dump(exclude_none=True))
            return {**key_view(_key_row(conn, key_id)), "value": value}

        return await self.db.write(work)

    async def list_keys(
        self, project_id: str | None, after: str | None, limit: int
    ) -> dict[str, Any]:
        where = [] if project_id is None else [api_keys.c.project_id == project_id]
        rows = await self.db.read(lambda conn: _page(conn, api_keys, where, after, limit))
        return page([key_view(row) for row in rows], limit)

    async def get_key(self, key_id: str) -> dict[str, Any]:
        return await self.db.read(lambda conn: key_view(_key_row(conn, key_id)))

    async def update_key(self, actor: str, key_id: str, body: Any) -> dict[str, Any]:
        spec: KeyUpdate = parse(KeyUpdate, body)

        def work(conn: Connection) -> dict[str, Any]:
            row = _key_row(conn, key_id)
            for project_id in spec.projects or []:
                _project_row(conn, project_id)
            changes: dict[str, Any] = {
                "policy": _policy(spec.policy, Policy.from_json(row.policy)).to_json()
            }
            if spec.name is not None:
                changes["name"] = spec.name
            if spec.projects is not None:
                changes["projects"] = orjson.dumps(spec.projects).decode()
            if "models" in spec.model_fields_set:
                changes["models"] = (
                    None if spec.models is None else orjson.dumps(spec.models).decode()
                )
            if "expires_at" in spec.model_fields_set:
                changes["expires_at"] = spec.expires_at
            conn.execute(update(api_keys).where(api_keys.c.id == key_id).values(**changes))
            _audit(conn, actor, "key.updated", key_id, spec.model_dump(exclude_unset=True))
            return key_view(_key_row(conn, key_id))

        return await self.db.write(work)

    async def revoke_key(self, actor: str, key_id: str) -> dict[str, Any]:
        def work(conn: Connection) -> dict[str, Any]:
            row = _key_row(conn, key_id)
            if row.revoked_at is None:
                conn.execute(
                    update(api_keys)
                    .where(api_keys.c.id == key_id)
                    .values(revoked_at=int(time.time()))
                )
                _audit(conn, actor, "key.revoked", key_id, {})
            return key_view(_key_row(conn, key_id))

        return await self.db.write(work)

    async def create_prompt(self, actor: str, project_id: str, body: Any) -> dict[str, Any]:
        """A new template of the project, at version 1."""
        spec: PromptCreate = parse(PromptCreate, body)
        content = _template(spec)

        def work(conn: Connection) -> dict[str, Any]:
            if _project_row(conn, project_id).archived_at is not None:
                raise InvalidRequest(
                    f"Project '{project_id}' is archived.", code="project_archived"
                )
            prompt_id = prompts.create(conn, project_id, spec.name, content)
            view = prompts.view(conn, project_id, prompt_id)
            detail = {"project_id": project_id, "name": spec.name, "version": "1"}
            _audit(conn, actor, "prompt.created", prompt_id, detail)
            return view

        return await self.db.write(work)

    async def list_prompts(self, project_id: str, after: str | None, limit: int) -> dict[str, Any]:
        def work(conn: Connection) -> list[dict[str, Any]]:
            _project_row(conn, project_id)
            return prompts.page(conn, project_id, after, limit)

        return page(await self.db.read(work), limit)

    async def get_prompt(
        self, project_id: str, prompt_id: str, version: str | None
    ) -> dict[str, Any]:
        """A version of the project's template (the latest when `version` is None)."""
        return await self.db.read(lambda conn: prompts.view(conn, project_id, prompt_id, version))

    async def add_prompt_version(
        self, actor: str, project_id: str, prompt_id: str, body: Any
    ) -> dict[str, Any]:
        """The template's next version: earlier ones never change."""
        content = _template(parse(TemplateContent, body))

        def work(conn: Connection) -> dict[str, Any]:
            version = str(prompts.add_version(conn, project_id, prompt_id, content))
            detail = {"project_id": project_id, "version": version}
            _audit(conn, actor, "prompt.version_created", prompt_id, detail)
            return prompts.view(conn, project_id, prompt_id, version)

        return await self.db.write(work)

    async def archive_prompt(self, actor: str, project_id: str, prompt_id: str) -> dict[str, Any]:
        """Archived, not deleted: its versions stay readable here; requests naming it are
        refused."""

        def work(conn: Connection) -> dict[str, Any]:
            if prompts.archive(conn, project_id, prompt_id):
                _audit(conn, actor, "prompt.archived", prompt_id, {"project_id": project_id})
            return prompts.view(conn, project_id, prompt_id)

        return await self.db.write(work)

    async def list_responses(
        self, project_id: str, cursor: Cursor, limit: int, search: ResponseSearch
    ) -> dict[str, Any]:
        """A project's stored responses (deleted ones left out), newest first, that meet
        `search`, each with its cost. Any tenant's, a config file's included: no project row
        is needed."""

        def work(conn: Connection) -> dict[str, Any]:
            inside = search.inside(conn.dialect.name)
            listed = newest_first(
                conn, responses, project_id, search.columns(), cursor, limit, inside
            )
            cost = costs(conn, project_id, [row.id for row in listed.rows])
            data = [response_summary(row, cost.get(row.id)) for row in listed.rows]
            return as_page(data, listed, cursor)

        return await self.db.read(work)

    async def response_cost(self, project_id: str, response_id: str) -> int | None:
        """What a project's response cost, in nano-dollars (None: not settled yet)."""
        found = await self.db.read(lambda conn: costs(conn, project_id, [response_id]))
        return found.get(response_id)

    async def list_conversations(
        self, project_id: str, cursor: Cursor, limit: int
    ) -> dict[str, Any]:
        """A project's conversations (deleted ones left out), newest first, as GET
        /v1/conversations/{id} shows each."""

        def work(conn: Connection) -> dict[str, Any]:
            listed = newest_first(conn, conversations, project_id, [], cursor, limit)
            return as_page([conversation_view(row) for row in listed.rows], listed, cursor)

        return await self.db.read(work)

    async def note(self, actor: str, action: str, target: str) -> None:
        """An admin's action elsewhere than on projects and keys (cancelling a project's
        response), in the audit log."""
        await self.db.write(lambda conn: _audit(conn, actor, action, target, {}))

    async def audit(
        self,
        after: int | None,
        limit: int,
        *,
        action: str | None = None,
        actor: str | None = None,
        target: str | None = None,
    ) -> dict[str, Any]:
        """Newest first; `after`: an entry id, to page on to older ones; each filter an exact
        match."""
        where = [
            column == value
            for column, value in (
                (audit_log.c.action, action),
                (audit_log.c.actor, actor),
                (audit_log.c.target, target),
            )
            if value is not None
        ]

        def work(conn: Connection) -> list[Any]:
            query = select(audit_log).where(*where).order_by(audit_log.c.id.desc()).limit(limit + 1)
            if after is not None:
                query = query.where(audit_log.c.id < after)
            return list(conn.execute(query).all())

        rows = await self.db.read(work)
        data = [
            {
                "object": "audit_log",
                "id": row.id,
                "at": row.at,
                "actor": row.actor,
                "action": row.action,
                "target": row.target,
                "detail": orjson.loads(row.detail),
            }
            for row in rows
        ]
        return page(data, limit)
