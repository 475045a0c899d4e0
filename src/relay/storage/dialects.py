"""SQLAlchemy's dialects of the two databases, for their `INSERT ... ON CONFLICT`: PostgreSQL's
is imported on first use (about 2 MB a process), which a SQLite process never makes. And
`driver_sql`: an insert as the driver's own SQL, for the writes that skip SQLAlchemy's
statement handling."""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING, Any

from sqlalchemy.dialects import sqlite

if TYPE_CHECKING:
    from sqlalchemy.dialects import postgresql
else:

    class _OnFirstUse:
        """A module that is imported when one of its names is first read."""

        def __init__(self, name: str) -> None:
            self._name = name

        def __getattr__(self, attribute: str) -> Any:
            return getattr(importlib.import_module(self._name), attribute)

    postgresql = _OnFirstUse("sqlalchemy.dialects.postgresql")

__all__ = ["driver_sql", "postgresql", "sqlite"]


@functools.lru_cache(maxsize=64)
def driver_sql(statement: Any, keys: tuple[str, ...], dialect: Any) -> tuple[str, list[int]]:
    """`statement` (an insert of the columns `keys`) as `dialect`'s driver's own SQL, and for
    each of its positional parameters where its value is in `keys`. Run with
    `exec_driver_sql` and tuples, a write skips SQLAlchemy's per-statement and per-row work,
    which costs a small write more than the database's own (the usage ledger's batches,
    SQLite's saves)."""
    compiled = statement.compile(dialect=dialect, column_keys=list(keys))
    assert compiled.positiontup is not None, "a driver with positional parameters"
    return str(compiled), [keys.index(name) for name in compiled.positiontup]
