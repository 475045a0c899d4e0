"""Prompt templates in storage: each belongs to a project and holds versions 1, 2, ... that
never change once written. Every read is scoped to the project (the tenant): another
project's template is indistinguishable from a missing one. Each operation is a function of
a connection, run by the caller in its transaction (relay.access.admin writes its audit row
beside the change; relay.engine.prompts reads on the request path)."""

from __future__ import annotations

import time
from typing import Any

import orjson
from sqlalchemy import Connection, bindparam, insert, select, update

from relay.errors import InvalidRequest, NotFound
from relay.ids import new_id
from relay.models.prompts import variables_of
from relay.storage.tables import prompt_template_versions as versions
from relay.storage.tables import prompt_templates as templates

_MAX_VERSION = 2**31 - 1

_OWNED = (templates.c.id == bindparam("pid"), templates.c.project_id == bindparam("t"))
_HEAD = select(templates.c.latest_version, templates.c.archived_at).where(*_OWNED)
_VERSION = select(versions.c.content).where(
    versions.c.prompt_id == bindparam("pid"), versions.c.version == bindparam("v")
)


def version_number(text: str) -> int | None:
    """A version as requests and the admin API name it ("3"), or None when it names none."""
    if not (text.isascii() and text.isdigit()) or text.startswith("0") or len(text) > 10:
        return None
    number = int(text)
    return number if number <= _MAX_VERSION else None


def not_found(prompt_id: str, param: str | None = None) -> NotFound:
    return NotFound(
        f"Prompt with id '{prompt_id[:100]}' not found.", param=param, code="prompt_not_found"
    )


def no_version(prompt_id: str, version: str, param: str | None = None) -> NotFound:
    return NotFound(
        f"Prompt with id '{prompt_id[:100]}' has no version '{version[:20]}'.",
        param=param,
        code="prompt_version_not_found",
    )


def archived(prompt_id: str, param: str | None = None) -> InvalidRequest:
    return InvalidRequest(
        f"Prompt with id '{prompt_id[:100]}' is archived.", param=param, code="prompt_archived"
    )


# --- the request path ------------------------------------------------------------------------


def head(conn: Connection, tenant: str, prompt_id: str) -> tuple[int, bool] | None:
    """(latest version, archived) of the tenant's template; None when it has none by that id."""
    row = conn.execute(_HEAD, {"pid": prompt_id, "t": tenant}).first()
    return None if row is None else (row.latest_version, row.archived_at is not None)


def content(conn: Connection, prompt_id: str, version: int) -> str | None:
    """A version's content (JSON), once its template was found to be the tenant's."""
    row = conn.execute(_VERSION, {"pid": prompt_id, "v": version}).first()
    return None if row is None else str(row.content)


# --- the admin API ---------------------------------------------------------------------------


def _row(conn: Connection, project_id: str, prompt_id: str) -> Any:
    row = conn.execute(select(templates).where(*_OWNED), {"pid": prompt_id, "t": project_id})
    found = row.first()
    if found is None:
        raise not_found(prompt_id)
    return found


def _add_version(conn: Connection, prompt_id: str, version: int, stored: dict[str, Any]) -> None:
    conn.execute(
        insert(versions).values(
            prompt_id=prompt_id,
            version=version,
            created_at=int(time.time()),
            content=orjson.dumps(stored).decode(),
        )
    )


def create(conn: Connection, project_id: str, name: str, stored: dict[str, Any]) -> str:
    """A new template of the project, with `stored` as its version 1; its id."""
    prompt_id = new_id("pmpt")
    conn.execute(
        insert(templates).values(
            id=prompt_id,
            project_id=project_id,
            name=name,
            created_at=int(time.time()),
            archived_at=None,
            latest_version=1,
        )
    )
    _add_version(conn, prompt_id, 1, stored)
    return prompt_id


def add_version(conn: Connection, project_id: str, prompt_id: str, stored: dict[str, Any]) -> int:
    """`stored` as the template's next version; its number. The latest version is moved
    first, in the same transaction: two versions made at once get two numbers (the update
    holds the row on PostgreSQL; SQLite has one writer)."""
    if _row(conn, project_id, prompt_id).archived_at is not None:
        raise archived(prompt_id)
    conn.execute(
        update(templates)
        .where(templates.c.id == prompt_id)
        .values(latest_version=templates.c.latest_version + 1)
    )
    version: int = _row(conn, project_id, prompt_id).latest_version
    _add_version(conn, prompt_id, version, stored)
    return version


def archive(conn: Connection, project_id: str, prompt_id: str) -> bool:
    """Archive the template (its versions stay, requests naming it are refused); False when
    it was archived already."""
    if _row(conn, project_id, prompt_id).archived_at is not None:
        return False
    conn.execute(
        update(templates).where(templates.c.id == prompt_id).values(archived_at=int(time.time()))
    )
    return True


def _summary(row: Any) -> dict[str, Any]:
    return {
        "object": "prompt",
        "id": row.id,
        "project_id": row.project_id,
        "name": row.name,
        "latest_version": str(row.latest_version),
        "created_at": row.created_at,
        "archived_at": row.archived_at,
        "status": "archived" if row.archived_at is not None else "active",
    }


def view(
    conn: Connection, project_id: str, prompt_id: str, version: str | None = None
) -> dict[str, Any]:
    """The template with one version's content (the latest when `version` is None)."""
    row = _row(conn, project_id, prompt_id)
    number = row.latest_version if version is None else version_number(version)
    text = None if number is None else content(conn, prompt_id, number)
    if text is None:
        raise no_version(prompt_id, version or "", param="version")
    found = orjson.loads(text)
    return {
        **_summary(row),
        "version": str(number),
        "instructions": found["instructions"],
        "messages": found["messages"],
        "variables": list(variables_of(found)),
    }


def page(conn: Connection, project_id: str, after: str | None, limit: int) -> list[dict[str, Any]]:
    """The project's templates by id, `limit` + 1 of them (the page and whether more follow);
    summaries, without their content."""
    query = (
        select(templates)
        .where(templates.c.project_id == project_id)
        .order_by(templates.c.id)
        .limit(limit + 1)
    )
    if after is not None:
        query = query.where(templates.c.id > after)
    return [_summary(row) for row in conn.execute(query)]
