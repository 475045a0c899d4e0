"""The schema's revision, read and compared without Alembic.

Every process of `relay serve` opens its database at start-up, and `/readyz` compares the
revision on each probe; the database is nearly always at the revision the code migrates to
already (`relay serve --workers N` migrates once before its workers start). Alembic, with the
Mako templates and Pygments it brings, costs about 10 MB in each process that imports it, so
it is imported only when there is something to migrate (relay.storage.database).

What Alembic itself would answer: the head is the revision no migration revises (Relay's
migrations are one line, so there is one), and the current revision is the row of Alembic's
version table, none when the table is absent.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

from sqlalchemy import Connection, column, inspect, select, table

VERSIONS = Path(__file__).with_name("migrations") / "versions"
# Alembic's version table, as its MigrationContext reads and writes it.
_VERSION_TABLE = "alembic_version"
_VERSION = table(_VERSION_TABLE, column("version_num"))


def current_revision(conn: Connection) -> str | None:
    """The schema revision `conn`'s database is at (None: no schema yet)."""
    if not inspect(conn).has_table(_VERSION_TABLE):
        return None
    revisions = conn.execute(select(_VERSION.c.version_num)).scalars().all()
    if len(revisions) > 1:
        raise RuntimeError(f"the schema is at several revisions at once: {revisions}")
    return revisions[0] if revisions else None


@functools.cache
def head_revision() -> str:
    """The revision the migrations bring a schema to."""
    revisions: set[str] = set()
    revised: set[str] = set()
    for path in VERSIONS.glob("*.py"):
        names = _assigned(path)
        if "revision" not in names:
            continue  # the package's __init__
        revisions.add(str(names["revision"]))
        earlier = names.get("down_revision")  # None, a revision, or several (a merge)
        if isinstance(earlier, str):
            revised.add(earlier)
        elif isinstance(earlier, tuple | list):
            revised.update(str(revision) for revision in earlier)
    heads = revisions - revised
    if len(heads) != 1:
        raise RuntimeError(f"the migrations must end in one revision, not {sorted(heads)}")
    return heads.pop()


def _assigned(path: Path) -> dict[str, object]:
    """The constants a migration's module assigns at its top level (`revision = "0010"`,
    `down_revision: str | None = "0009"`)."""
    found: dict[str, object] = {}
    for statement in ast.parse(path.read_text()).body:
        targets: list[ast.expr]
        if isinstance(statement, ast.AnnAssign) and statement.value is not None:
            targets, value = [statement.target], statement.value
        elif isinstance(statement, ast.Assign):
            targets, value = statement.targets, statement.value
        else:
            continue
        for target in targets:
            if isinstance(target, ast.Name):
                try:
                    found[target.id] = ast.literal_eval(value)
                except ValueError:
                    continue  # not a constant: not one of these
    return found
