"""SQLAlchemy's dialects of the two databases, for their `INSERT ... ON CONFLICT`: PostgreSQL's
is imported on first use (about 2 MB a process), which a SQLite process never makes."""

from __future__ import annotations

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

__all__ = ["postgresql", "sqlite"]
